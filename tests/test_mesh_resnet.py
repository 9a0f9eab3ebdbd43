"""ResNet-18 on (data, model) meshes of 8 host CPU devices, with the control that sizes the count.

The torchvision port (`qjax.models.torchvision`, He-normal random weights from
`random_state_dict`, 8 seeded 32x32 images) is quantized once on one device and once with
`qjax.mesh.shard_params` / `shard_batch` placements. RTN reads no data: the one-device bits.
GPTQ and GPFQ sum each conv's Hessian / Gram over the data shards, another floating-point order,
so rounding ties can fall the other way. The control: on one device, the same batch with its
images permuted (a seeded permutation) changes only the order of those sums, the exact result is
the same; the mesh's count of differing entries must be of that order. A wrong shard or a
dropped data shard changes X itself, and half the batch gives a far larger count
(`HALF_BATCH_DIFF`, measured, not run here).
"""
from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import qjax
from qjax import grids, mesh as mesh_lib, models
from qjax.models import llama
from qjax.models import torchvision as tv

pytestmark = pytest.mark.skipif(
    len(jax.devices()) < 8, reason="needs 8 devices (tests/conftest.py sets jax_num_cpu_devices)")

MESHES = [(8, 1), (4, 2), (2, 4)]
# Every conv's patches at the conv's own strides (patch_p=1): sampled patches would be drawn
# per image position, so a permuted batch would change X, not just the order of its rows.
KW = dict(bits=4, progress=False, apply_kwargs={"train": False}, patch_p=1.0)
METHODS = {"gptq": qjax.gptq, "gpfq": qjax.gpfq}


def make_mesh(shape) -> Mesh:
  return Mesh(np.array(jax.devices()[:8]).reshape(shape), ("data", "model"))


def diff_per_leaf(a, b) -> dict[str, tuple[int, int]]:
  """Leaf path -> (differing entries, entries), for every leaf of `a`."""
  out = {}
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0],
                          jax.tree_util.tree_leaves(b)):
    out[jax.tree_util.keystr(path)] = (int((np.asarray(x) != np.asarray(y)).sum()), x.size)
  return out


def total(per_leaf) -> tuple[int, int]:
  return sum(d for d, _ in per_leaf.values()), sum(n for _, n in per_leaf.values())


def assert_kept(q, placed):
  """Every output leaf has the sharding of the input leaf."""
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(q)[0],
                          jax.tree_util.tree_leaves(placed)):
    assert a.sharding == b.sharding, (jax.tree_util.keystr(path), a.sharding, b.sharding)


@pytest.fixture(scope="module")
def resnet():
  model = models.get_model("tv_resnet18", num_classes=1000)
  v = tv.from_torchvision("resnet18", tv.random_state_dict("tv_resnet18", seed=0, image_size=32))
  x = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype(np.float32)
  return model, v, x


@pytest.fixture(scope="module")
def runs(resnet):
  """(method, variant) -> (Q, report) on one device, computed on first use; variant 'ref' is the
  batch as given, 'perm' its images in a seeded permuted order."""
  model, v, x = resnet
  perm = np.random.default_rng(1).permutation(len(x))
  assert not np.array_equal(perm, np.arange(len(x)))
  cache = {}

  def run(method, variant):
    if (method, variant) not in cache:
      cache[method, variant] = METHODS[method](v, model.apply, x if variant == "ref" else x[perm],
                                               **KW)
    return cache[method, variant]
  return run


@pytest.mark.parametrize("shape", [pytest.param((8, 1), marks=pytest.mark.slow), (4, 2),
                                   pytest.param((2, 4), marks=pytest.mark.slow)])
def test_rtn_on_mesh_is_one_device_q(resnet, shape):
  _, v, _ = resnet
  spec = grids.GridSpec(4, "channel")
  ref, _ = qjax.quantize_rtn(v, spec)
  vs = mesh_lib.shard_params(v, make_mesh(shape))
  q, _ = qjax.quantize_rtn(vs, spec)
  d, n = total(diff_per_leaf(q, ref))
  assert d == 0, f"{d} of {n} entries differ on mesh {shape}"
  assert_kept(q, vs)
  if shape[1] > 1:  # the big kernels really are split
    assert "model" in tuple(q["params"]["layer4_1"]["conv2"]["kernel"].sharding.spec)
