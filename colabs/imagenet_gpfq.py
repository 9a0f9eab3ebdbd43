# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # GPFQ on ImageNet: the paper's Tables 1-3 with torchvision's pretrained models
#
# Zhang, Zhou and Saab (2022, Sec. 3) quantize torchvision's AlexNet, VGG-16, GoogLeNet,
# ResNet-18, ResNet-50 and EfficientNet-B1 with GPFQ at 3-5 bits per weight, every layer, and
# report ImageNet top-1/top-5. This notebook reproduces that on a Colab TPU:
#
# 1. installs qjax (and torch CPU, only to read torchvision's weights);
# 2. mounts the ImageNet you prepared with tensorflow-datasets (qjax never downloads it);
# 3. saves torchvision's pretrained state_dicts as `.safetensors`, which
#    `qjax.pretrained.from_torchvision` converts to the linen models (`tv_resnet18`, ...);
# 4. runs `configs/imagenet_gpfq.py` (the paper's C, m, p and bits per model) and shows the table.
#
# **Colab setup.** Runtime > Change runtime type > TPU. Then, in a first cell:
#
# ```
# !pip install "qjax @ git+<this repository>"
# ```
#
# Colab's image already has torch and torchvision (only used to save the pretrained weights).
#
# ImageNet must be prepared once as array_record (it needs the two tar files from image-net.org
# in `MANUAL_DIR`; about 150 GB of disk, a few hours):
#
# ```
# !tfds build imagenet2012 --manual_dir=MANUAL_DIR --data_dir=DATA_DIR --file_format=array_record
# ```
#
# With `QJAX_SMALL=1` (CI on CPU) the notebook runs the config's smoke mode instead: tfds' mock
# ImageNet (a few random images) and random weights, at small sizes.

# %%
import os
import sys

import jax

SMALL = os.environ.get("QJAX_SMALL") == "1"
IN_COLAB = "google.colab" in sys.modules
# Where ImageNet was prepared (tfds data_dir) and where the converted weights go.
DATA_DIR = os.environ.get("IMAGENET_DATA_DIR", "/content/drive/MyDrive/tensorflow_datasets")
WEIGHTS_DIR = os.environ.get("QJAX_WEIGHTS_DIR", "/content/torchvision_weights")
WORKDIR = os.environ.get("QJAX_WORKDIR", "workdir/imagenet_gpfq")
MODELS = ("alexnet", "vgg16", "googlenet", "resnet18", "resnet50", "efficientnet_b1")
print("backend:", jax.default_backend(), "devices:", jax.device_count(), "small:", SMALL)

# %% [markdown]
# ## 1. ImageNet from Google Drive
#
# The prepared `imagenet2012/5.*.*` folder (array_record) lives under `DATA_DIR`. Copying it to
# the VM's local disk first (`!cp -r`) makes the evaluation faster than reading from Drive.

# %%
if IN_COLAB and not SMALL:
  from google.colab import drive  # pylint: disable=g-import-not-at-top
  drive.mount("/content/drive")

# %% [markdown]
# ## 2. torchvision's pretrained weights as safetensors
#
# torch (CPU) loads each pretrained model once; its state_dict is written with safetensors, which
# qjax reads with NumPy. `from_torchvision` checks that every tensor is used exactly once and has
# the right shape (OIHW -> HWIO, Linear transposed, the flatten order of AlexNet/VGG's first
# Linear permuted to NHWC, BatchNorm statistics into `batch_stats`).

# %%
if not SMALL:
  import torchvision  # pylint: disable=g-import-not-at-top
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(WEIGHTS_DIR, exist_ok=True)
  for name in MODELS:
    path = os.path.join(WEIGHTS_DIR, f"{name}.safetensors")
    if not os.path.exists(path):
      model_t = torchvision.models.get_model(name, weights="IMAGENET1K_V1")
      save_file({k: v.contiguous() for k, v in model_t.state_dict().items()}, path)
    print("weights:", path)

# %% [markdown]
# ## 3. The paper's experiment
#
# Per model (Table 1): C (the alphabet's radius factor, Eq. 19), m (calibration images from the
# training split) and p = 0.25 (the fraction of each image's disjoint conv patches); bits 3, 4, 5
# (GoogLeNet and EfficientNet-B1: 5, as in Table 1). Methods: GPFQ on every layer, MSQ (plain
# rounding onto the same alphabet), and the paper's dagger variant (last layer float, bias
# correction; Table 3). Each model's rows print as it finishes; the run takes hours on a TPU
# (50,000 validation images per evaluation, 10 evaluations per model): set `config.models` or
# `config.eval_examples` to run part of it.

# %%
from qjax import main  # pylint: disable=g-import-not-at-top
from qjax.experiments import imagenet as experiment  # pylint: disable=g-import-not-at-top

config = experiment.default_config()
config.name = "imagenet_gpfq"
if SMALL:
  config.smoke = True                       # mock ImageNet, random weights, tiny sizes
  config.smoke_settings.methods = ("gpfq", "msq")
else:
  config.data_dir = DATA_DIR
  config.weights_dir = WEIGHTS_DIR
  config.models = MODELS
  config.progress = True
rows = main.run(config, WORKDIR)

# %% [markdown]
# ## 4. Next to the paper
#
# `paper_top1` is the paper's top-1 (Table 2 for GPFQ, Table 3 for the dagger variant); `drop`
# is ours, in points below our own float top-1.

# %%
for r in rows:
  print(f"{r['model']:>16} {r['method']:>18} {r['bits']:>3} bits  top-1 {r['top1']:6.2f}  "
        f"top-5 {r['top5']:6.2f}  drop {r['drop']:5.2f}  paper {r['paper_top1']}")

# %%
from IPython.display import Image, display  # pylint: disable=g-import-not-at-top

display(Image(os.path.join(WORKDIR, "accuracy_vs_bits.png")))
