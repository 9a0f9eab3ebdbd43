"""torchvision models in qjax: converted logits equal torchvision's, and the converter's errors.

The slow tests compare with torchvision itself (random weights, random BatchNorm statistics, no
download). torch/torchvision are the `[torch]` extra. How they are installed, and why the import
needs help: pip installs the CPU build of torch 2.13.0 (a ~190 MB wheel) and torchvision 0.28.0
from the package index; that torchvision is built against the CUDA build of torch, so its C++ ops
do not load and `import torchvision` fails with "operator torchvision::nms does not exist". The
classification models use none of those ops, so `_import_torchvision` defines their names (with a
placeholder schema, in a throw-away `torch.library.Library("torchvision", "DEF")`) before the
import. Install command (CI's slow step):

  .venv/bin/pip install torch==2.13.0 torchvision==0.28.0

The fast tests (converter errors) need no torch: they build numpy state_dicts from the Flax shapes.
"""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import models
from qjax import pretrained
from qjax.models import torchvision as tv

INSTALL = "pip install torch==2.13.0 torchvision==0.28.0   # or: pip install 'qjax[torch]'"

# torchvision's registered C++ ops (torchvision/_meta_registrations.py registers fakes for them).
_TORCHVISION_OPS = ("nms", "qnms", "roi_align", "_roi_align_backward", "ps_roi_align",
                    "_ps_roi_align_backward", "roi_pool", "_roi_pool_backward", "ps_roi_pool",
                    "_ps_roi_pool_backward", "qroi_align", "deform_conv2d",
                    "_deform_conv2d_backward")


def _import_torchvision():
  """(torch, torchvision); fails with the install command when CI is set and torch is absent."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    if os.environ.get("CI"):
      pytest.fail(f"torch is needed in CI's slow step: {INSTALL}")
    pytest.skip(f"torch not installed: {INSTALL}")
  if "torchvision" not in sys.modules:
    # A failed import leaves torchvision half-registered, so probe in a subprocess first.
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True,
                           text=True, check=False)
    if probe.returncode != 0:
      if "torchvision::nms does not exist" not in probe.stderr:
        if os.environ.get("CI"):
          pytest.fail(f"import torchvision failed: {probe.stderr[-500:]}\n{INSTALL}")
        pytest.skip(f"torchvision not importable: {INSTALL}")
      lib = torch.library.Library("torchvision", "DEF")  # pylint: disable=unused-variable
      for op in _TORCHVISION_OPS:
        lib.define(f"{op}(Tensor x) -> Tensor")
      _import_torchvision.library = lib  # keep the definitions alive
  import torchvision  # pylint: disable=g-import-not-at-top
  return torch, torchvision


def _torch_model(torch, torchvision, name: str):
  """The torchvision model with random weights and random BatchNorm statistics, in eval mode."""
  torch.manual_seed(0)
  build = {
      "tv_alexnet": lambda: torchvision.models.alexnet(),
      "tv_vgg16": lambda: torchvision.models.vgg16(),
      "tv_vgg16_bn": lambda: torchvision.models.vgg16_bn(),
      "tv_resnet18": lambda: torchvision.models.resnet18(),
      "tv_resnet50": lambda: torchvision.models.resnet50(),
      # As torchvision builds it for the pretrained weights, plus the aux heads the file keeps.
      "tv_googlenet": lambda: torchvision.models.googlenet(transform_input=True,
                                                           aux_logits=True, init_weights=True),
      "tv_efficientnet_b1": lambda: torchvision.models.efficientnet_b1(),
  }[name]
  model = build()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.normal_(0.0, 0.2)
        module.running_var.uniform_(0.5, 2.0)
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0.0, 0.2)
  return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(tv.TORCHVISION_MODELS))
def test_logits_equal_torchvision(name):
  torch, torchvision = _import_torchvision()
  model_t = _torch_model(torch, torchvision, name)
  x = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
  with torch.no_grad():
    want = model_t(torch.from_numpy(x)).numpy()
  variables = pretrained.from_torchvision(name, model_t.state_dict())
  model = models.get_model(name, num_classes=1000)
  with jax.default_matmul_precision("highest"):
    got = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(
        variables, jnp.asarray(x.transpose(0, 2, 3, 1))))
  rel = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
  print(f"{name}: max |qjax - torchvision| / max |torchvision| = {rel:.2e}")
  assert got.shape == want.shape == (2, 1000)
  assert rel < 1e-4, rel


@pytest.mark.slow
def test_from_pth_and_safetensors_files(tmp_path):
  torch, torchvision = _import_torchvision()
  from safetensors import torch as safetensors_torch  # pylint: disable=g-import-not-at-top
  state = _torch_model(torch, torchvision, "tv_resnet18").state_dict()
  torch.save(state, tmp_path / "r18.pth")
  safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()},
                              str(tmp_path / "r18.safetensors"))
  direct = pretrained.from_torchvision("resnet18", state)
  for path in (tmp_path / "r18.pth", str(tmp_path / "r18.safetensors")):
    loaded = pretrained.from_torchvision("resnet18", path)
    jax.tree.map(np.testing.assert_array_equal, loaded, direct)


# ----------------------------------------------------------------------------------------------
# Fast: pooling against NumPy loops, converter errors on synthetic numpy state_dicts.

def _numpy_max_pool(x, k, s, p, ceil_mode):
  n, h, w, c = x.shape
  def size(d):
    out = (d + 2 * p - k + (s - 1 if ceil_mode else 0)) // s + 1
    return out - 1 if ceil_mode and (out - 1) * s >= d + p else out
  out = np.full((n, size(h), size(w), c), -np.inf, np.float32)
  for i in range(out.shape[1]):
    for j in range(out.shape[2]):
      r0, c0 = i * s - p, j * s - p
      win = x[:, max(r0, 0):min(r0 + k, h), max(c0, 0):min(c0 + k, w)]
      out[:, i, j] = win.max(axis=(1, 2))
  return out


@pytest.mark.parametrize("k,s,p,ceil_mode,size", [(3, 2, 0, False, 13), (3, 2, 0, True, 14),
                                                   (3, 2, 1, False, 12), (3, 1, 1, True, 7),
                                                   (2, 2, 0, True, 7), (3, 2, 0, True, 15)])
def test_max_pool_matches_torch_rule(k, s, p, ceil_mode, size):
  x = np.random.default_rng(1).normal(size=(2, size, size + 1, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(tv.max_pool(jnp.asarray(x), k, s, p, ceil_mode)),
                                _numpy_max_pool(x, k, s, p, ceil_mode))


@pytest.mark.parametrize("h,w,out", [(6, 6, (6, 6)), (13, 10, (6, 6)), (9, 9, (7, 7)),
                                     (5, 3, (1, 1))])
def test_adaptive_avg_pool_matches_torch_bins(h, w, out):
  x = np.random.default_rng(2).normal(size=(2, h, w, 3)).astype(np.float32)
  want = np.zeros((2, *out, 3), np.float32)
  for i in range(out[0]):
    for j in range(out[1]):
      r0, r1 = (i * h) // out[0], -(-((i + 1) * h) // out[0])
      c0, c1 = (j * w) // out[1], -(-((j + 1) * w) // out[1])
      want[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
  np.testing.assert_allclose(np.asarray(tv.adaptive_avg_pool(jnp.asarray(x), out)), want,
                             rtol=1e-6, atol=1e-6)


def _synthetic_state_dict(name: str, seed: int = 0,
                          random_keys: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
  """A torchvision-layout state_dict (OIHW, (out, in)) from the Flax shapes: random values, except
  that tensors over 10^5 entries not in `random_keys` are broadcast constants (no memory)."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, (_, _, leaf, shape) in pretrained.torchvision.expected_shapes(name).items():
    torch_shape = {4: lambda s: (s[3], s[2], s[0], s[1]), 2: lambda s: (s[1], s[0])}.get(
        len(shape), lambda s: s)(shape)
    if np.prod(torch_shape) > 1e5 and key not in random_keys:
      out[key] = np.broadcast_to(np.float32(0.01), torch_shape)
    else:
      out[key] = rng.standard_normal(size=torch_shape, dtype=np.float32)
    if leaf == "var":
      out[key] = np.abs(out[key]) + 0.5
      out[key[:-len("running_var")] + "num_batches_tracked"] = np.array(7, np.int64)
  return out


def test_converter_layouts_on_synthetic_resnet18():
  sd = _synthetic_state_dict("tv_resnet18", random_keys=("conv1.weight", "fc.weight"))
  v = pretrained.from_torchvision("resnet18", sd)
  np.testing.assert_array_equal(v["params"]["conv1"]["kernel"],
                                sd["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(v["params"]["fc"]["kernel"], sd["fc.weight"].T)
  np.testing.assert_array_equal(v["params"]["layer2_0"]["downsample_1"]["scale"],
                                sd["layer2.0.downsample.1.weight"])
  np.testing.assert_array_equal(v["batch_stats"]["layer4_1"]["bn2"]["var"],
                                sd["layer4.1.bn2.running_var"])
  assert all(a.dtype == np.float32 for a in jax.tree.leaves(v))


def test_converter_permutes_the_flatten_linear_rows():
  """AlexNet's classifier.1 sees torch's (C, H, W) flatten; qjax flattens NHWC (H, W, C)."""
  sd = _synthetic_state_dict("tv_alexnet", seed=3, random_keys=("classifier.1.weight",))
  v = pretrained.from_torchvision("tv_alexnet", sd)
  feature_map = np.random.default_rng(4).normal(size=(256, 6, 6)).astype(np.float32)  # C, H, W
  want = sd["classifier.1.weight"] @ feature_map.reshape(-1)
  got = feature_map.transpose(1, 2, 0).reshape(-1) @ v["params"]["classifier_1"]["kernel"]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_converter_keeps_depthwise_and_googlenet_aux_rules():
  sd = _synthetic_state_dict("tv_efficientnet_b1")
  v = pretrained.from_torchvision("efficientnet_b1", sd)
  assert v["params"]["features_2_0"]["block_1_0"]["kernel"].shape == (3, 3, 1, 96)
  sd = _synthetic_state_dict("tv_googlenet")
  sd["aux1.fc2.weight"] = np.zeros((1000, 1024), np.float32)  # the pretrained file keeps these
  pretrained.from_torchvision("googlenet", sd)


def test_converter_missing_key_is_named():
  sd = _synthetic_state_dict("tv_resnet18")
  del sd["layer3.1.bn1.running_mean"]
  with pytest.raises(ValueError, match=r"missing key 'layer3\.1\.bn1\.running_mean'"):
    pretrained.from_torchvision("resnet18", sd)


def test_converter_extra_key_is_named():
  sd = _synthetic_state_dict("tv_vgg16")
  sd["classifier.7.weight"] = np.zeros((10, 1000), np.float32)
  with pytest.raises(ValueError, match=r"unexpected key 'classifier\.7\.weight'"):
    pretrained.from_torchvision("vgg16", sd)


def test_converter_num_batches_tracked_only_beside_a_batchnorm():
  sd = _synthetic_state_dict("tv_vgg16")
  sd["features.0.num_batches_tracked"] = np.array(1)
  with pytest.raises(ValueError, match=r"unexpected key 'features\.0\.num_batches_tracked'"):
    pretrained.from_torchvision("vgg16", sd)


def test_converter_wrong_shape_is_named():
  sd = _synthetic_state_dict("tv_resnet18")
  sd["layer1.0.conv2.weight"] = np.zeros((64, 64, 5, 5), np.float32)
  with pytest.raises(ValueError, match=r"key 'layer1\.0\.conv2\.weight' has shape "
                                       r"\(64, 64, 5, 5\)"):
    pretrained.from_torchvision("resnet18", sd)


@pytest.mark.parametrize("source,target,key", [
    ("tv_resnet50", "tv_resnet18", "fc.weight"),            # first key that does not fit
    ("tv_vgg16_bn", "tv_vgg16", "features.1.weight"),
    ("tv_alexnet", "tv_vgg16", "classifier.1.weight"),
])
def test_converter_other_architecture_is_named(source, target, key):
  sd = _synthetic_state_dict(source)
  with pytest.raises(ValueError, match=rf"'{key}'.*another architecture"):
    pretrained.from_torchvision(target, sd)


def test_converter_unknown_model_and_bad_input():
  with pytest.raises(ValueError, match="unknown torchvision model 'resnet19'"):
    pretrained.from_torchvision("resnet19", {})
  with pytest.raises(TypeError, match="state_dict must be a mapping"):
    pretrained.from_torchvision("resnet18", [1, 2])
  with pytest.raises(ValueError, match="not found"):
    pretrained.from_torchvision("resnet18", "/nonexistent/r18.safetensors")


def test_registered_models_run_in_eval_mode():
  for name in tv.TORCHVISION_MODELS:
    assert name in models.MODELS
  model = models.get_model("tv_resnet18", num_classes=1000)
  variables = pretrained.from_torchvision("resnet18", _synthetic_state_dict("tv_resnet18"))
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(
      variables, jnp.zeros((1, 64, 64, 3), jnp.float32))
  assert out.shape == (1, 1000) and out.dtype == jnp.float32


@pytest.mark.slow
def test_preprocess_equals_torchvision_transforms():
  """qjax.imagenet's resize-256 / center-crop-224 / normalise equals torchvision's on PIL images
  (the paper's evaluation transform), for landscape, portrait and small images."""
  torch, torchvision = _import_torchvision()
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from torchvision import transforms  # pylint: disable=g-import-not-at-top
  from qjax import imagenet  # pylint: disable=g-import-not-at-top
  ref = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224),
                            transforms.ToTensor(),
                            transforms.Normalize(imagenet.MEAN, imagenet.STD)])
  rng = np.random.default_rng(5)
  for shape in ((375, 500, 3), (500, 333, 3), (120, 90, 3), (256, 256, 3)):
    img = rng.integers(0, 256, size=shape, dtype=np.uint8)
    want = ref(Image.fromarray(img)).numpy().transpose(1, 2, 0)
    got = np.asarray(imagenet.normalize(jnp.asarray(imagenet.preprocess(img))))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=str(shape))
  del torch, torchvision
