"""The driver on (data, model) meshes of 8 host CPU devices: same Q as one device, shardings kept.

tests/conftest.py asks JAX for 8 CPU devices before any backend starts. Each check quantizes
the same seeded model once on one device and once with `qjax.mesh.shard_params` /
`shard_batch` placements, and compares entry by entry.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import qjax
from qjax import grids, mesh as mesh_lib, models

pytestmark = pytest.mark.skipif(
    len(jax.devices()) < 8, reason="needs 8 devices (tests/conftest.py sets jax_num_cpu_devices)")

MESHES = [(8, 1), (4, 2), (2, 4)]
# Each whole-network run takes ~20 s on 2 cores: (4, 2) in the quick suite, the others slow.
NET_MESHES = [pytest.param((8, 1), marks=pytest.mark.slow), (4, 2),
              pytest.param((2, 4), marks=pytest.mark.slow)]


def make_mesh(shape) -> Mesh:
  return Mesh(np.array(jax.devices()[:8]).reshape(shape), ("data", "model"))


class Block(nn.Module):
  """Pre-LN block as in benchmarks/gpfq_network.py (Dense q/k/v/out, GELU MLP)."""
  dim: int
  heads: int

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    h = nn.LayerNorm()(x)
    q, k, v = (nn.Dense(d, name=n)(h).reshape(b, t, self.heads, d // self.heads)
               for n in ("query", "key", "value"))
    att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // self.heads), -1)
    o = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d)
    x = x + nn.Dense(d, name="out")(o)
    return x + nn.Dense(d, name="mlp_out")(nn.gelu(nn.Dense(4 * d, name="mlp_in")(
        nn.LayerNorm()(x))))


class Transformer(nn.Module):
  blocks: int = 2
  dim: int = 64

  @nn.compact
  def __call__(self, x):
    for i in range(self.blocks):
      x = Block(self.dim, 4, name=f"block{i}")(x)
    return nn.LayerNorm()(x)


@pytest.fixture(scope="module")
def transformer():
  x = np.random.default_rng(0).normal(size=(8, 16, 64)).astype(np.float32)
  model = Transformer()
  return model, model.init(jax.random.key(0), x[:1]), x


def leaves(tree):
  return jax.tree_util.tree_flatten_with_path(tree)[0]


def assert_kept(q, placed):
  """Every output leaf has the sharding of the input leaf."""
  for (path, a), b in zip(leaves(q), jax.tree_util.tree_leaves(placed)):
    assert a.sharding == b.sharding, (jax.tree_util.keystr(path), a.sharding, b.sharding)


def count_diff(a, b) -> tuple[int, int]:
  n = d = 0
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    n += x.size
    d += int((np.asarray(x) != np.asarray(y)).sum())
  return d, n


@pytest.fixture(scope="module")
def gptq_ref(transformer):
  model, v, x = transformer
  return qjax.gptq(v, model.apply, x, bits=3, progress=False)[0]


@pytest.mark.parametrize("shape", NET_MESHES)
def test_gptq_on_mesh_is_one_device_q(transformer, gptq_ref, shape):
  model, v, x = transformer
  mesh = make_mesh(shape)
  vs = mesh_lib.shard_params(v, mesh)
  q, report = qjax.gptq(vs, model.apply, mesh_lib.shard_batch(x, mesh), bits=3, progress=False)
  d, n = count_diff(q, gptq_ref)
  assert d == 0, f"{d} of {n} entries differ from one device on mesh {shape}"
  assert_kept(q, vs)
  if shape[1] > 1:  # the kernels really are split
    spec = q["params"]["block0"]["mlp_in"]["kernel"].sharding.spec
    assert "model" in tuple(spec), spec
  assert all(r.status == "quantized" for r in report.layers)


@pytest.mark.parametrize("shape", MESHES)
def test_rtn_on_mesh_is_one_device_q(transformer, shape):
  _, v, _ = transformer
  spec = grids.GridSpec(4, "channel")
  ref, _ = qjax.quantize_rtn(v, spec)
  vs = mesh_lib.shard_params(v, make_mesh(shape))
  q, _ = qjax.quantize_rtn(vs, spec)
  d, n = count_diff(q, ref)
  assert d == 0, f"{d} of {n} entries differ"


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(4, 2)])
def test_gpfq_on_mesh_matches_one_device(transformer, shape):
  """GPFQ's Grams sum the data shards in another order: equal up to rounding ties, counted."""
  model, v, x = transformer
  ref, r0 = qjax.gpfq(v, model.apply, x, bits=4, progress=False)
  mesh = make_mesh(shape)
  vs = mesh_lib.shard_params(v, mesh)
  q, r1 = qjax.gpfq(vs, model.apply, mesh_lib.shard_batch(x, mesh), bits=4, progress=False)
  assert_kept(q, vs)
  d, n = count_diff(q, ref)
  assert d <= 0.01 * n, f"{d} of {n} entries differ"
  for a, b in zip(r0.layers, r1.layers):
    assert abs(a.error - b.error) <= 0.02 * a.error + 1e-6, (a.path, a.error, b.error)


def test_kernel_bytes_per_device_shrink(transformer):
  """No device holds a whole sharded kernel: weights per device fall by the model-axis size."""
  model, v, x = transformer
  kernels = [w for w in jax.tree_util.tree_leaves(v) if w.ndim == 2]
  one = mesh_lib.per_device_bytes(kernels)
  for shape in MESHES:
    placed = mesh_lib.shard_params(kernels, make_mesh(shape))
    assert mesh_lib.per_device_bytes(placed) == one // shape[1], shape
  # XLA's plan for the forward pass: per-device bytes fall with the devices.
  fwd = lambda p, x: model.apply(p, x)
  mesh = make_mesh((4, 2))
  single = mesh_lib.compiled_bytes(fwd, v, jnp.asarray(x))
  sharded = mesh_lib.compiled_bytes(fwd, mesh_lib.shard_params(v, mesh),
                                    mesh_lib.shard_batch(x, mesh))
  assert sharded < 0.4 * single, (single, sharded)


def test_memory_plan():
  shapes = {"a": (4096, 11008), "b": (11008, 4096)}
  one = mesh_lib.memory_plan(shapes, rows=1024)
  split = mesh_lib.memory_plan(shapes, rows=1024, data=4, model=2)
  assert split.weights * 2 == one.weights == 2 * 2 * 4096 * 11008 * 4
  assert split.hessian == one.hessian == 11008 ** 2 * 4
  assert split.activations * 4 == one.activations
  assert "MiB" in str(split)
  with pytest.raises(ValueError, match="model"):
    mesh_lib.memory_plan(shapes, rows=8, model=0)


def test_kernel_spec_rule():
  assert mesh_lib.kernel_spec((64, 256), 2, "model", 0) == P(None, "model")
  assert mesh_lib.kernel_spec((256, 64), 2, "model", 0) == P("model", None)
  assert mesh_lib.kernel_spec((3, 3, 5, 7), 2, "model", 0) == P()  # nothing divides
  assert mesh_lib.kernel_spec((64,), 2, "model", 0) == P()
  assert mesh_lib.kernel_spec((64, 64), 2, "model", 10 ** 6) == P()  # small: replicated


def test_bad_input():
  mesh = make_mesh((4, 2))
  with pytest.raises(ValueError, match="'fsdp' is not an axis"):
    mesh_lib.shard_params({"w": jnp.ones((8, 8))}, mesh, model_axis="fsdp")
  with pytest.raises(ValueError, match="data_axis='rows'"):
    mesh_lib.shard_batch(jnp.ones((8, 3)), mesh, data_axis="rows")
  with pytest.raises(ValueError, match="6 examples .* 4 devices of mesh axis 'data'"):
    mesh_lib.shard_batch(jnp.ones((6, 3)), mesh)
  with pytest.raises(TypeError, match="mesh must be"):
    mesh_lib.shard_params({"w": jnp.ones((8, 8))}, "mesh")
