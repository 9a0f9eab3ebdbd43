"""torchvision state_dicts -> Flax variables of the linen ports in `qjax.models.torchvision`.

The ports name their submodules after torchvision's module paths ('layer1.0.conv1' ->
'layer1_0/conv1'), so the mapping is mechanical and checked: every tensor is used once, with its
shape checked, and a key that does not fit is a ValueError naming it.

  variables = qjax.pretrained.from_torchvision("resnet18", "resnet18.safetensors")
  logits = qjax.models.get_model("tv_resnet18", num_classes=1000).apply(variables, x, train=False)
"""
from __future__ import annotations

import functools
import math
import os
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qjax.models.torchvision import TORCHVISION_MODELS, registry_name

# The first Linear after a flatten of a spatial map, and that map's torch shape (C, H, W).
_FLATTEN_INPUTS = {"tv_alexnet": ("classifier.1", (256, 6, 6)),
                   "tv_vgg16": ("classifier.0", (512, 7, 7)),
                   "tv_vgg16_bn": ("classifier.0", (512, 7, 7))}

# Keys a torchvision checkpoint holds that eval-mode logits never use: GoogLeNet's auxiliary
# classifiers (its pretrained file keeps them; torchvision drops them after loading).
_UNUSED_PREFIXES = {"tv_googlenet": ("aux1.", "aux2.")}

_LEAVES = {("params", "kernel"): "weight", ("params", "scale"): "weight",
           ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
           ("batch_stats", "var"): "running_var"}


def torch_key(path: Sequence[str], leaf: str) -> str:
  """Flax (module path, leaf) -> torchvision state_dict key ('layer1_0', 'conv1') ->
  'layer1.0.conv1.weight'."""
  return ".".join(re.sub(r"_(\d+)", r".\1", p) for p in path) + "." + leaf


def expected_shapes(name: str, image_size: int = 224) -> dict[str, tuple[str, tuple[str, ...],
                                                                         str, tuple[int, ...]]]:
  """torch key -> (collection, flax module path, flax leaf, flax shape)."""
  return dict(_expected_shapes(registry_name(name), image_size))


@functools.lru_cache(maxsize=None)
def _expected_shapes(name: str, image_size: int) -> tuple:
  model = TORCHVISION_MODELS[registry_name(name)]()
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(
      (1, image_size, image_size, 3), jnp.float32), train=False))
  entries = []
  for collection in ("params", "batch_stats"):
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes.get(collection, {}))[0]:
      keys = tuple(k.key for k in path)
      entries.append((torch_key(keys[:-1], _LEAVES[(collection, keys[-1])]),
                      (collection, keys[:-1], keys[-1], tuple(leaf.shape))))
  # Module paths in natural order (layer2 before layer10), then weight, bias, running stats.
  rank = ("kernel", "scale", "bias", "mean", "var")
  natural = lambda key: [(0, int(s), "") if s.isdigit() else (1, 0, s)
                         for s in key.split(".")[:-1]]
  entries.sort(key=lambda e: (natural(e[0]), rank.index(e[1][2])))
  return tuple(entries)


def random_state_dict(name: str, seed: int = 0, image_size: int = 224) -> dict[str, np.ndarray]:
  """A torchvision-layout state_dict with random weights, built with NumPy (no torch, no compile).

  Conv and Linear weights are He-normal (std sqrt(2 / fan_in)), biases 0; BatchNorm weight 1,
  bias 0, running mean 0, running var 1, num_batches_tracked 0: a well-scaled stand-in for the
  pretrained weights (smoke runs, tests of the converter).
  """
  rng = np.random.default_rng(seed)
  out = {}
  for key, (_, _, leaf, shape) in expected_shapes(name, image_size).items():
    if leaf == "kernel":
      torch_shape = _torch_layout(leaf, shape)
      fan_in = math.prod(torch_shape[1:])
      out[key] = rng.standard_normal(torch_shape, np.float32) * np.float32(np.sqrt(2 / fan_in))
    elif leaf in ("scale", "var"):
      out[key] = np.ones(shape, np.float32)
    else:
      out[key] = np.zeros(shape, np.float32)
    if leaf == "var":
      out[key[:-len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
  return out


def _torch_layout(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The torch shape of a flax leaf: kernels HWIO -> OIHW and (in, out) -> (out, in)."""
  if leaf != "kernel":
    return tuple(shape)
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape[::-1])


def _to_numpy(value: Any, key: str) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor, without importing torch
    value = value.detach().cpu()
    if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
      value = value.float()  # numpy has no bfloat16
    value = value.numpy()
  try:
    return np.asarray(value)
  except Exception as e:  # pylint: disable=broad-except
    raise TypeError(f"state_dict[{key!r}]: cannot convert {type(value).__name__} to an "
                    "array") from e


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A torchvision state_dict from a `.safetensors` file (numpy API, no torch) or a `.pth` /
  `.pt` file (`torch.load(weights_only=True)`; needs torch, the `[torch]` extra)."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise ValueError(f"state_dict file {path!r} not found")
  if path.endswith(".safetensors"):
    from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
    return dict(safetensors_numpy.load_file(path))
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"reading {path!r} needs torch: pip install 'qjax[torch]' (or save the "
                      "state_dict with safetensors.torch.save_file and pass the .safetensors "
                      "file)") from e
  loaded = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(loaded, Mapping):
    raise TypeError(f"{path!r} holds a {type(loaded).__name__}, not a state_dict")
  return {k: _to_numpy(v, k) for k, v in loaded.items()}


def from_torchvision(name: str, state_dict: Mapping[str, Any] | str | os.PathLike,
                     image_size: int = 224) -> dict[str, dict]:
  """Flax variables of `TORCHVISION_MODELS[name]` from a torchvision state_dict.

  Conv weights go OIHW -> HWIO, Linear weights are transposed to (in, out); the first Linear after
  a flatten of a spatial map (AlexNet's classifier.1, VGG's classifier.0) also has its input rows
  permuted from torch's (C, H, W) flatten order to NHWC's (H, W, C). BatchNorm weight/bias go to
  `params` scale/bias, running_mean/var to `batch_stats`; `num_batches_tracked` is ignored (it
  only matters for momentum=None training), and so are GoogLeNet's auxiliary heads.

  Args:
    name: 'resnet18', 'tv_resnet18', ... (see `TORCHVISION_MODELS`).
    state_dict: {key: tensor or array}, or the path of a `.pth` / `.safetensors` file.
    image_size: input side used to infer the expected shapes (only matters for tiny inputs).

  Returns:
    {'params': ..., 'batch_stats': ...} (batch_stats only for models with BatchNorm), float32
    numpy arrays.

  Raises:
    ValueError: naming the first key that does not fit: a key the model does not have (extra, or
      another architecture's), a shape that does not fit, or a key the model needs but the
      state_dict lacks.
  """
  full = registry_name(name)
  if isinstance(state_dict, (str, os.PathLike)):
    state_dict = load_state_dict(state_dict)
  if not isinstance(state_dict, Mapping):
    raise TypeError(f"state_dict must be a mapping or a file path, got {type(state_dict).__name__}")
  expected = expected_shapes(full, image_size)
  flatten_key, chw = _FLATTEN_INPUTS.get(full, (None, None))
  unused = _UNUSED_PREFIXES.get(full, ())
  hint = lambda: _architecture_hint(full, state_dict, expected)
  variables: dict[str, dict] = {}
  used = set()
  for key, value in state_dict.items():
    if key.endswith(".num_batches_tracked") and key[:-len("num_batches_tracked")] + \
        "running_mean" in expected:
      continue
    if key.startswith(unused):
      continue
    if key not in expected:
      raise ValueError(f"from_torchvision({full!r}): unexpected key {key!r}: {full} has no such "
                       f"tensor{hint()}")
    collection, path, leaf, shape = expected[key]
    array = np.asarray(_to_numpy(value, key), np.float32)  # views until the shape is checked
    if array.ndim == 4 and len(shape) == 4:
      array = array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif array.ndim == 2 and len(shape) == 2:
      if flatten_key and key == f"{flatten_key}.weight" and array.shape[1] == math.prod(chw):
        # (out, C*H*W) -> (out, H*W*C): rows of the NHWC flatten.
        array = array.reshape(array.shape[0], *chw).transpose(0, 2, 3, 1).reshape(
            array.shape[0], -1)
      array = array.T
    if array.shape != shape:
      given, want = tuple(_to_numpy(value, key).shape), _torch_layout(leaf, shape)
      # A 2-d weight in (in, out) order (a flax kernel, or a transposed Linear weight) is the
      # usual slip; say so instead of printing the same numbers twice.
      transposed = len(given) == 2 and given == want[::-1] and given != want
      note = "; it looks transposed: pass torch's (out, in) weight" if transposed else ""
      raise ValueError(f"from_torchvision({full!r}): key {key!r} has shape {given}, torch's "
                       f"layout needs {want} (the flax {'/'.join(path)}/{leaf} is {shape})"
                       f"{note}{hint()}")
    node = variables.setdefault(collection, {})
    for p in path:
      node = node.setdefault(p, {})
    node[leaf] = np.array(array, np.float32, order="C")  # a copy: no memory shared with torch
    used.add(key)
  for key in expected:
    if key not in used:
      raise ValueError(f"from_torchvision({full!r}): missing key {key!r} (for "
                       f"{'/'.join(expected[key][1])}/{expected[key][2]}, shape "
                       f"{expected[key][3]}){hint()}")
  return variables


def _architecture_hint(full: str, state_dict: Mapping[str, Any], expected: Mapping) -> str:
  """A note when most keys do not fit: the state_dict is probably another model's."""
  keys = [k for k in state_dict if not k.endswith("num_batches_tracked")]
  fits = sum(1 for k in keys if k in expected and
             math.prod(_to_numpy(state_dict[k], k).shape) == math.prod(expected[k][3]))
  if keys and fits < 0.9 * min(len(keys), len(expected)):
    return (f" (only {fits} of the state_dict's {len(keys)} tensors fit {full}, which has "
            f"{len(expected)}: is it another architecture's state_dict?)")
  return ""


__all__ = ["from_torchvision", "load_state_dict", "random_state_dict", "expected_shapes",
           "torch_key"]
