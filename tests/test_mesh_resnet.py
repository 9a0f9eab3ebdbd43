"""ResNet-18 on (data, model) meshes of 8 host CPU devices, and the control that sizes the count.

The torchvision port (`qjax.models.torchvision`, He-normal random weights from
`random_state_dict`, 8 seeded 32x32 images) is quantized once on one device and once with
`qjax.mesh.shard_params` / `shard_batch` placements. RTN reads no data: the one-device bits.
GPTQ and GPFQ sum each conv's Hessian / Gram over the data shards, another floating-point order,
so rounding ties can fall the other way, and later layers see the drift. The control: on one
device, the batch with its images permuted (seeded) changes only the order of those sums (the
forward is bitwise the same per image, the exact result identical), and shows how many entries
such ties move. The tiny Llama decoder's mesh count is exactly such a count, ResNet-18's GPTQ
(4, 2) count nearly (1.06x); GPFQ's is 6-8x, and why is at MESH_DIFF.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

import qjax
from qjax import grids, mesh as mesh_lib, models
from qjax.pretrained import torchvision as tv
from test_mesh import assert_kept, make_mesh

pytestmark = pytest.mark.skipif(
    len(jax.devices()) < 8, reason="needs 8 devices (tests/conftest.py sets jax_num_cpu_devices)")

# Every conv's patches at the conv's own strides (patch_p=1): sampled patches would be drawn
# per image position, so a permuted batch would change X, not just the order of its rows.
KW = dict(bits=4, progress=False, apply_kwargs={"train": False}, patch_p=1.0)
METHODS = {"gptq": qjax.gptq, "gpfq": qjax.gpfq}


def diff_per_leaf(a, b) -> dict[str, tuple[int, int]]:
  """Leaf path -> (differing entries, entries), for every leaf of `a`."""
  out = {}
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0],
                          jax.tree_util.tree_leaves(b)):
    out[jax.tree_util.keystr(path)] = (int((np.asarray(x) != np.asarray(y)).sum()), x.size)
  return out


def total(per_leaf) -> tuple[int, int]:
  return sum(d for d, _ in per_leaf.values()), sum(n for _, n in per_leaf.values())


@pytest.fixture(scope="module")
def resnet():
  model = models.get_model("tv_resnet18", num_classes=1000)
  v = tv.from_torchvision("resnet18", tv.random_state_dict("tv_resnet18", seed=0, image_size=32))
  x = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype(np.float32)
  return model, v, x


@pytest.fixture(scope="module")
def runs(resnet):
  """(method, variant) -> (Q, report) on one device, computed on first use; variant 'ref' is the
  batch as given, 'perm' its images in a seeded permuted order, 'dup' images 0-3 twice (a lost
  data shard, same shapes)."""
  model, v, x = resnet
  perm = np.random.default_rng(1).permutation(len(x))
  assert not np.array_equal(perm, np.arange(len(x)))
  batches = {"ref": x, "perm": x[perm], "dup": np.concatenate([x[:4], x[:4]])}
  cache = {}

  def run(method, variant):
    if (method, variant) not in cache:
      cache[method, variant] = METHODS[method](v, model.apply, batches[variant], **KW)
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


FIRST = "['params']['conv1']['kernel']"


def assert_errors_close(r0, r1, factor):
  """Each quantized layer's ||XW - X~Q|| / ||XW|| within `factor` of the reference run's."""
  assert [a.path for a in r0.layers] == [b.path for b in r1.layers]
  for a, b in zip(r0.layers, r1.layers):
    if a.error is not None:
      assert a.error / factor <= b.error <= a.error * factor, (a.path, a.error, b.error)


# The permuted batch on one device (images in another order, sums in another order): measured
# GPTQ 356,747 and GPFQ 264,943 of 11,699,112 entries differ (3.0% / 2.3%). GPTQ from layer1_0
# on, GPFQ only in layer4 and fc (at 32x32 layer4's convs see 8 rows, one per image: a rank-8
# Gram, so its ties go either way); conv1, the first Hessian, is identical in both.
PERM_ERROR_FACTOR = 1.1  # measured worst ratio of a layer's error: GPFQ 1.020, GPTQ 1.046
PERM_CASES = ["gpfq", pytest.param("gptq", marks=pytest.mark.slow)]


@pytest.mark.parametrize("method", PERM_CASES)
def test_permuted_batch_moves_only_ties(runs, method):
  ref, r0 = runs(method, "ref")
  q, r1 = runs(method, "perm")
  per_leaf = diff_per_leaf(q, ref)
  d, n = total(per_leaf)
  assert per_leaf[FIRST][0] == 0, per_leaf[FIRST]
  # Ties exist (so a mesh count of this order is the same effect), and stay a few percent.
  assert 0 < d < 0.05 * n, f"{d} of {n} entries differ"
  if method == "gpfq":
    assert all(d == 0 for k, (d, _) in per_leaf.items() if "layer4" not in k and "fc" not in k)
  assert_errors_close(r0, r1, PERM_ERROR_FACTOR)


@pytest.mark.parametrize("method", PERM_CASES)
def test_lost_data_shard_moves_conv1(runs, method):
  """What the mesh tests' conv1 check catches: half the images read twice changes conv1's Q."""
  ref, _ = runs(method, "ref")
  d, n = diff_per_leaf(runs(method, "dup")[0], ref)[FIRST]
  assert d > 0.01 * n, f"{d} of {n}"


# On a mesh more entries move than under the permuted batch: there the float forward itself
# rounds differently, not only the Gram sums (XLA's CPU convs give other last bits for another
# per-device batch or a split kernel: 36 of ResNet-18's 50 intermediate outputs differ from one
# device on (8, 1), all 50 on (4, 2), none for the permuted batch), so the quantized stream drifts
# from layer1 on and the count is not bounded by the permutation count (measured below). Nor
# does the count catch a lost data shard: images 0-3 twice in place of 0-7 (one device) move
# GPTQ 676,405 entries, GPFQ with half the batch 2,084,262, of the mesh's order. conv1 does: its
# X is the raw images, so float order leaves its Q alone (0 on every mesh and permutation) and
# the duplicated shard moves 462 of its 9,408 GPTQ entries.
# Measured differing entries of 11,699,112 (worst ratio of a layer's error to one device's):
#   GPFQ (8, 1) 1,708,963 (1.27), (4, 2) 2,031,302 (1.35), (2, 4) 2,040,067 (1.25) (only (4, 2)
#   is run here: ~70 s of CPU per case);
#   GPTQ (4, 2) 378,352 (1.04), 1.06x its permuted batch's count (GPTQ (8, 1), (2, 4) not run).
MESH_DIFF = {"gptq": 0.05, "gpfq": 0.25}  # fraction of entries
MESH_ERROR_FACTOR = {"gptq": 1.1, "gpfq": 1.5}
MESH_CASES = [pytest.param(method, (d, m), id=f"{method}-{d}x{m}")
              for method, (d, m) in [("gptq", (4, 2)), ("gpfq", (4, 2))]]


@pytest.mark.slow
@pytest.mark.parametrize("method,shape", MESH_CASES)
def test_on_mesh_is_one_device_q_up_to_rounding(resnet, runs, method, shape):
  model, v, x = resnet
  ref, r0 = runs(method, "ref")
  mesh = make_mesh(shape)
  vs = mesh_lib.shard_params(v, mesh)
  q, r1 = METHODS[method](vs, model.apply, mesh_lib.shard_batch(x, mesh), **KW)
  assert_kept(q, vs)
  per_leaf = diff_per_leaf(q, ref)
  d, n = total(per_leaf)
  assert per_leaf[FIRST][0] == 0, per_leaf[FIRST]
  assert d <= MESH_DIFF[method] * n, (
      f"{method}: {d} of {n} entries differ on mesh {shape}: "
      + ", ".join(f"{k} {c}" for k, (c, _) in per_leaf.items() if c))
  assert_errors_close(r0, r1, MESH_ERROR_FACTOR[method])
  assert all(r.status == "quantized" for r in r1.layers)
