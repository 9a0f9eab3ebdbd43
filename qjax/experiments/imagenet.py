"""The GPFQ paper's ImageNet experiment: torchvision's pretrained models, quantized, evaluated.

Zhang, Zhou and Saab (Sec. 3, Tables 1-3) quantize every layer of torchvision's AlexNet, VGG-16,
GoogLeNet, ResNet-18, ResNet-50 and EfficientNet-B1 with GPFQ at b = 3, 4, 5 bits (augmented
midrise alphabet, Eq. 17-19, one C per model; m calibration images; conv patches sampled with
p = 0.25) and report top-1/top-5 on the validation set; the variant marked with a dagger
(Table 3) leaves the last layer in float and bias-corrects it. `run(config, workdir)` does this
for `config.models` in sequence: per model the float accuracy, then per bit width GPFQ, MSQ
(plain rounding onto the same alphabet) and, where configured, the dagger variant. Rows carry the
paper's reported top-1 beside ours.

`config.smoke=True` swaps ImageNet for tfds' tiny mock data and the pretrained weights for random
ones, at small sizes (`config.smoke_settings`): the whole path runs in CI in seconds.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import jax
import ml_collections

from qjax import imagenet
from qjax import models
from qjax import pretrained
from qjax.experiments import methods as registry  # `methods` names the configured ones below
from qjax.models import torchvision as tv

# The registry's methods this task runs ('gpfq_lastfloat_bc': the paper's dagger variant).
SUPPORTED = ("gpfq", "msq", "gpfq_lastfloat_bc")

# Torchvision's reported float accuracy of the pretrained weights (IMAGENET1K_V1), top-1/top-5.
TORCHVISION_FLOAT = {"alexnet": (56.522, 79.066), "vgg16": (71.592, 90.382),
                     "vgg16_bn": (73.360, 91.516), "googlenet": (69.778, 89.530),
                     "resnet18": (69.758, 89.078), "resnet50": (76.130, 92.862),
                     "efficientnet_b1": (78.642, 94.186)}

# The paper's numbers. Table 2/3: top-1 float, and per bits (GPFQ, GPFQ with the last layer float
# and bias correction). Table 1 (b = 5): C, m and the top-1/top-5 drop.
PAPER_FLOAT_TOP1 = {"alexnet": 56.52, "vgg16": 71.59, "resnet18": 69.76, "resnet50": 76.13}
PAPER_TOP1 = {
    "alexnet": {3: (53.22, 54.77), 4: (55.15, 55.51), 5: (55.67, 55.94)},
    "vgg16": {3: (69.67, 70.24), 4: (70.70, 70.90), 5: (70.96, 71.05)},
    "resnet18": {3: (65.81, 66.95), 4: (68.13, 68.51), 5: (69.04, 69.18)},
    "resnet50": {3: (70.85, 70.63), 4: (74.21, 74.35), 5: (75.23, 75.26)},
}
PAPER_TABLE1 = {"alexnet": (1.1, 2048, 0.85, 0.33), "googlenet": (1.41, 2048, 0.60, 0.46),
                "vgg16": (0.975, 512, 0.63, 0.32), "resnet18": (1.16, 2048, 0.71, 0.44),
                "resnet50": (1.81, 1024, 0.90, 0.19),
                "efficientnet_b1": (1.6, 1024, 0.76, 0.40)}

# The Dense layers of each model (module-path regex), for mixed precision (`dense_bits`).
DENSE_LAYERS = {"alexnet": r"^classifier_", "vgg16": r"^classifier_", "vgg16_bn": r"^classifier_",
                "resnet18": r"^fc$", "resnet50": r"^fc$", "googlenet": r"^fc$",
                "efficientnet_b1": r"^classifier_"}


def model_settings(name: str, **overrides: Any) -> ml_collections.ConfigDict:
  """The paper's settings for one model (Table 1's C and m, p = 0.25, b = 3, 4, 5)."""
  C, m, _, _ = PAPER_TABLE1.get(name, (1.0, 1024, None, None))
  s = ml_collections.ConfigDict()
  s.bits = (3, 4, 5) if name in PAPER_TOP1 else (5,)
  s.C = C
  s.m = m
  s.p = 0.25                      # fraction of each image's disjoint conv patches (Sec. 3.1)
  s.dense_bits = 0                # > 0: Dense layers at these bits, convs at `bits` (mixed)
  s.resize = 256                  # the paper's preprocessing for every model
  s.crop = 224
  s.interpolation = "bilinear"
  s.update(overrides)
  return s


def default_config() -> ml_collections.ConfigDict:
  """`configs/imagenet_gpfq.py` without its name: every model with the paper's settings."""
  c = ml_collections.ConfigDict()
  c.task = "imagenet"
  c.smoke = False
  c.models = ("alexnet", "vgg16", "googlenet", "resnet18", "resnet50", "efficientnet_b1")
  c.methods = SUPPORTED           # 'gpfq_lastfloat_bc' is the paper's dagger variant (Table 3)
  c.rule = "paper"                # augmented midrise, Eq. 17-19 ('reference': authors' code)
  c.data_dir = ""                 # where imagenet2012 was prepared (array_record)
  c.weights_dir = ""              # <model>.safetensors or <model>.pth from torchvision
  c.calibration_split = "train"
  c.eval_split = "validation"
  c.eval_examples = 0             # 0: the whole split (50,000)
  # The m calibration images go to qjax.gpfq in chunks of this many (0: one batch). Results are
  # the same up to the conv patch draws; device memory holds one chunk's activations at a time.
  c.calibration_batch = 256
  c.batch_size = 250              # evaluation batch, split over the local devices
  c.threads = 16                  # host preprocessing threads
  c.seed = 0                      # calibration draw and patch sampling
  c.progress = False
  c.settings = ml_collections.ConfigDict(
      {full[len("tv_"):]: model_settings(full[len("tv_"):]) for full in tv.TORCHVISION_MODELS})
  # What `smoke=True` changes: mock data, random weights, tiny sizes.
  c.smoke_settings = ml_collections.ConfigDict(dict(
      models=("resnet18",), bits=(4,), m=8, calibration_batch=4, examples=16, eval_examples=16,
      batch_size=8, resize=73, crop=64, methods=SUPPORTED))
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Eager checks naming the offending key."""
  smoke = config.get("smoke", False)
  names = config.smoke_settings.models if smoke else config.models
  for name in names:
    tv.registry_name(name)
    if name not in config.settings:
      raise ValueError(f"config.settings has no entry for model {name!r}")
    s = config.settings[name]
    for b in (config.smoke_settings.bits if smoke else s.bits):
      if not isinstance(b, int) or b < 1:
        raise ValueError(f"config.settings.{name}.bits: bits must be positive ints, got {b!r}")
    m = config.smoke_settings.m if smoke else s.m
    chunk = config.smoke_settings.calibration_batch if smoke else config.calibration_batch
    if chunk and m % chunk and m > chunk:
      raise ValueError(f"config.calibration_batch ({chunk}) must divide config.settings.{name}.m "
                       f"({m}): qjax.gpfq takes equally shaped calibration chunks")
    if not 0 < s.p <= 1:
      raise ValueError(f"config.settings.{name}.p must be in (0, 1], got {s.p}")
    if s.interpolation not in imagenet.INTERPOLATIONS:
      raise ValueError(f"config.settings.{name}.interpolation must be one of "
                       f"{imagenet.INTERPOLATIONS}, got {s.interpolation!r}")
  for m in (config.smoke_settings.methods if smoke else config.methods):
    if m not in SUPPORTED:
      raise ValueError(f"config.methods: unknown method {m!r}; choose from {SUPPORTED}")
  if not smoke and not config.weights_dir:
    raise ValueError("config.weights_dir: the directory with <model>.safetensors (or .pth) "
                     "torchvision weights is required (see colabs/imagenet_gpfq.ipynb); "
                     "--config.smoke=True runs on random weights and mock data")


def _variables(config, name: str, size: int) -> dict:
  """Converted torchvision weights from config.weights_dir, or (smoke) a random init."""
  if config.smoke and not config.weights_dir:
    # Random weights in torchvision's layout, through the converter like real ones.
    return pretrained.from_torchvision(
        name, pretrained.random_state_dict(name, config.seed, size), size)
  for ext in (".safetensors", ".pth"):
    path = os.path.join(config.weights_dir, name + ext)
    if os.path.exists(path):
      return pretrained.from_torchvision(name, path)
  raise ValueError(f"config.weights_dir: no {name}.safetensors or {name}.pth in "
                   f"{config.weights_dir!r}")


def _bits(name: str, s, bits: int):
  """Bits for `qjax.gpfq`: one int, or conv/Dense mixed precision (`dense_bits`)."""
  if s.dense_bits:
    return {DENSE_LAYERS[name]: int(s.dense_bits), "default": int(bits)}
  return int(bits)


def model_rows(config, name: str, eval_source, calib_source) -> list[dict]:
  """Float, then GPFQ / MSQ / dagger rows for each bit width of one model."""
  s = config.settings[name]
  smoke = config.smoke
  bits_list = config.smoke_settings.bits if smoke else s.bits
  methods = config.smoke_settings.methods if smoke else config.methods
  m = config.smoke_settings.m if smoke else s.m
  resize = config.smoke_settings.resize if smoke else s.resize
  crop = config.smoke_settings.crop if smoke else s.crop
  n_eval = config.smoke_settings.eval_examples if smoke else (config.eval_examples or None)
  batch_size = config.smoke_settings.batch_size if smoke else config.batch_size
  model = models.get_model(tv.registry_name(name), num_classes=1000)
  variables = _variables(config, name, crop)
  prep = dict(resize=resize, crop=crop, interpolation=s.interpolation, threads=config.threads)

  def evaluate(v) -> tuple[dict, float]:
    start = time.perf_counter()
    acc = imagenet.evaluate(model.apply, v, eval_source, batch_size=batch_size,
                            num_examples=n_eval, progress=config.progress, **prep)
    return acc, time.perf_counter() - start

  float_acc, float_seconds = evaluate(variables)
  base = dict(model=name, C=float(s.C), m=int(m), p=float(s.p),
              top1_float=round(float_acc["top1"], 2), top5_float=round(float_acc["top5"], 2))
  rows = [dict(method="float", bits=32, **base, top1=base["top1_float"],
               top5=base["top5_float"], drop=0.0, drop5=0.0,
               paper_top1=PAPER_FLOAT_TOP1.get(name, ""), seconds=0.0,
               eval_seconds=round(float_seconds, 2))]
  print(f"{name}: float top-1 {float_acc['top1']:.2f} top-5 {float_acc['top5']:.2f} "
        f"({float_acc['count']} images, {float_seconds:.0f} s)")
  x_calib = imagenet.calibration_batch(calib_source, int(m), seed=config.seed, **prep)
  chunk = config.smoke_settings.calibration_batch if smoke else config.calibration_batch
  if chunk and chunk < m:
    x_calib = [x_calib[i:i + chunk] for i in range(0, int(m), int(chunk))]
  for bits in bits_list:
    for method in methods:
      start = time.perf_counter()
      dagger = method == "gpfq_lastfloat_bc"
      q_vars = registry.run(method, variables, model.apply, x_calib, _bits(name, s, bits),
                            driver=dict(patch_p=s.p, key=jax.random.key(config.seed),
                                        apply_kwargs={"train": False}, progress=config.progress),
                            C=s.C, rule=config.rule).params
      seconds = time.perf_counter() - start
      acc, eval_seconds = evaluate(q_vars)
      paper = PAPER_TOP1.get(name, {}).get(int(bits))
      paper_top1 = "" if paper is None or method == "msq" else paper[int(dagger)]
      rows.append(dict(
          method=method, bits=int(bits), **base, top1=round(acc["top1"], 2),
          top5=round(acc["top5"], 2), drop=round(float_acc["top1"] - acc["top1"], 2),
          drop5=round(float_acc["top5"] - acc["top5"], 2), paper_top1=paper_top1,
          seconds=round(seconds, 2), eval_seconds=round(eval_seconds, 2),
          **({"dense_bits": int(s.dense_bits)} if s.dense_bits else {})))
      print(f"{name} {method} {bits} bits: top-1 {acc['top1']:.2f} (drop "
            f"{rows[-1]['drop']:.2f}), top-5 {acc['top5']:.2f}, quantized in {seconds:.0f} s")
      del q_vars
  return rows


def run(config: ml_collections.ConfigDict, workdir: str
        ) -> tuple[dict[str, list[dict]], str]:
  """Every model of the config in sequence (the runner writes table and plot).

  Args:
    config: `configs/imagenet_gpfq.py`'s config.
    workdir: the run's directory (unused here: weights come from `config.weights_dir`).

  Returns:
    ({model: its rows}, a key naming the data and weights): runs of other models with the same
    key are kept in the results file, so models can be run one at a time.
  """
  del workdir
  validate(config)
  names = config.smoke_settings.models if config.smoke else config.models
  mock = contextlib.nullcontext()
  if config.smoke:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    mock = tfds.testing.mock_data(num_examples=int(config.smoke_settings.examples))
  runs = {}
  with mock:
    eval_source = imagenet.data_source(config.eval_split, config.data_dir or None)
    calib_source = imagenet.data_source(config.calibration_split, config.data_dir or None)
    for name in names:
      runs[name] = model_rows(config, name, eval_source, calib_source)
  key = "smoke" if config.smoke else f"{config.data_dir}|{config.weights_dir}|{config.eval_split}"
  return runs, key


def plot(rows: list[dict], path: str) -> None:
  """Top-1 vs bits, one panel per model: each method, the float line, the paper's points."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = list(dict.fromkeys(r["model"] for r in rows if "model" in r))
  if not names:
    return
  fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.8), squeeze=False)
  for ax, name in zip(axes[0], names):
    mine = [r for r in rows if r.get("model") == name]
    for method in dict.fromkeys(r["method"] for r in mine if r["method"] != "float"):
      pts = sorted((r["bits"], r["top1"]) for r in mine if r["method"] == method)
      ax.plot(*zip(*pts), marker="o", label=method)
    paper = PAPER_TOP1.get(name, {})
    if paper:
      b = sorted(paper)
      ax.plot(b, [paper[k][0] for k in b], "k^", ms=5, label="paper GPFQ")
    float_row = next((r for r in mine if r["method"] == "float"), None)
    if float_row:
      ax.axhline(float_row["top1"], color="k", ls="--", lw=1, label="float")
    ax.set(title=name, xlabel="bits per weight", ylabel="top-1 (%)")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


__all__ = ["run", "plot", "validate", "default_config", "model_settings", "SUPPORTED",
           "PAPER_TOP1", "PAPER_TABLE1", "PAPER_FLOAT_TOP1", "TORCHVISION_FLOAT"]
