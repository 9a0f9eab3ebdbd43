"""The driver on (data, model) meshes of 8 host CPU devices: same Q as one device, shardings kept.

tests/conftest.py asks JAX for 8 CPU devices before any backend starts. Each check quantizes
the same seeded model once on one device and once with `qjax.mesh.shard_params` /
`shard_batch` placements, and compares entry by entry.
"""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax._src import array as jax_array  # ArrayImpl._value: every host read of an array
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import qjax
from qjax import grids, mesh as mesh_lib, models
from qjax.models import llama

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


@contextlib.contextmanager
def no_split_fetch():
  """Multi-host stand-in: reading an array split over several devices to the host raises.

  After `jax.distributed.initialize()` an array sharded over every host's devices is not fully
  addressable, and np.asarray / float / .item / jax.device_get of it raise RuntimeError; only a
  replicated value (a reduction's scalar) can be read on every host. One host cannot make such
  an array, so every host read (all go through ArrayImpl._value) of an array that spans more
  than one device and is not fully replicated raises here the way a global array would.
  """
  value = jax_array.ArrayImpl._value

  def guarded(self):
    if len(self.sharding.device_set) > 1 and not self.is_fully_replicated:
      raise RuntimeError(f"Fetching value for `jax.Array` that spans non-addressable devices: "
                         f"shape {self.shape}, sharding {self.sharding}")
    return value.fget(self)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(jax_array.ArrayImpl, "_value", property(guarded))
    yield


@pytest.fixture(scope="module")
def gptq_ref(transformer):
  model, v, x = transformer
  return qjax.gptq(v, model.apply, x, bits=3, progress=False)[0]


@pytest.mark.parametrize("shape", NET_MESHES)
def test_gptq_on_mesh_is_one_device_q(transformer, gptq_ref, shape):
  model, v, x = transformer
  mesh = make_mesh(shape)
  vs = mesh_lib.shard_params(v, mesh)
  with no_split_fetch():
    q, report = qjax.gptq(vs, model.apply, mesh_lib.shard_batch(x, mesh), bits=3,
                          progress=False)
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
  with no_split_fetch():
    q, _ = qjax.quantize_rtn(vs, spec)
  d, n = count_diff(q, ref)
  assert d == 0, f"{d} of {n} entries differ"
  assert_kept(q, vs)


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES)
def test_gpfq_on_mesh_matches_one_device(transformer, shape):
  """GPFQ's Grams sum the data shards in another order, so ties could round apart; on this
  model none do (0 of 100,096 on each mesh since the alphabet's mean is taken in one order)."""
  model, v, x = transformer
  ref, r0 = qjax.gpfq(v, model.apply, x, bits=4, progress=False)
  mesh = make_mesh(shape)
  vs = mesh_lib.shard_params(v, mesh)
  with no_split_fetch():
    q, r1 = qjax.gpfq(vs, model.apply, mesh_lib.shard_batch(x, mesh), bits=4, progress=False)
  assert_kept(q, vs)
  d, n = count_diff(q, ref)
  assert d == 0, f"{d} of {n} entries differ"
  for a, b in zip(r0.layers, r1.layers):
    assert abs(a.error - b.error) <= 0.02 * a.error + 1e-6, (a.path, a.error, b.error)


# A tiny Llama-family decoder (2 blocks, hidden 64, GQA 4 query / 2 key-value heads, SwiGLU,
# tied head left float by skip="embed"), params and tokens sharded: GPTQ and RTN give the
# one-device Q on every mesh, GPFQ up to the count in LLAMA_DIFF.
LLAMA = llama.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=16, tie_word_embeddings=True)
LLAMA_METHODS = {
    "gptq": lambda p, f, x: qjax.gptq(p, f, x, bits=3, skip="embed", progress=False),
    "gpfq": lambda p, f, x: qjax.gpfq(p, f, x, bits=4, skip="embed", progress=False),
    # The deterministic reduction (tests/test_mesh_exact.py): 8 chunks of the 8 x 16 rows.
    "gpfq-exact": lambda p, f, x: qjax.gpfq(p, f, x, bits=4, skip="embed", progress=False,
                                            reduce_chunks=8),
}


@pytest.fixture(scope="module")
def tiny_llama():
  model = llama.Llama(LLAMA)
  tokens = np.random.default_rng(1).integers(0, LLAMA.vocab_size, size=(8, 16)).astype(np.int32)
  return model, model.init(jax.random.key(1), tokens[:1]), tokens


@pytest.fixture(scope="module")
def llama_refs(tiny_llama):
  """The one-device (Q, report) of each method, computed on first use."""
  model, v, tokens = tiny_llama
  cache = {}

  def ref(method):
    if method not in cache:
      cache[method] = LLAMA_METHODS[method](v, model.apply, tokens)
    return cache[method]
  return ref


# GPTQ: the one-device bits on every mesh. GPFQ: 274 of 90,432 entries differ on each mesh (all
# in layers_1/mlp up_proj 16 and down_proj 258; (8, 1) too, so the data-split Gram sums' order,
# not the model split) and no layer's error moves by more than 0.2%. With reduce_chunks: none.
LLAMA_DIFF = {"gptq": 0, "gpfq": 300, "gpfq-exact": 0}
# ~20 s per run on 2 cores: GPTQ (4, 2) in the quick suite, the rest slow.
LLAMA_CASES = [("gptq", (4, 2))] + [pytest.param(m, s, marks=pytest.mark.slow) for m, s in
                                    [("gptq", (8, 1)), ("gptq", (2, 4)), ("gpfq", (8, 1)),
                                     ("gpfq", (4, 2)), ("gpfq", (2, 4)),
                                     ("gpfq-exact", (8, 1)), ("gpfq-exact", (4, 2)),
                                     ("gpfq-exact", (2, 4))]]


@pytest.mark.parametrize("method,shape", LLAMA_CASES)
def test_llama_on_mesh_is_one_device_q(tiny_llama, llama_refs, method, shape):
  model, v, tokens = tiny_llama
  ref, r0 = llama_refs(method)
  mesh = make_mesh(shape)
  vs = mesh_lib.shard_params(v, mesh)
  with no_split_fetch():
    q, r1 = LLAMA_METHODS[method](vs, model.apply, mesh_lib.shard_batch(tokens, mesh))
  d, n = count_diff(q, ref)
  assert d <= LLAMA_DIFF[method], f"{method}: {d} of {n} entries differ on mesh {shape}"
  assert_kept(q, vs)
  if shape[1] > 1:  # the kernels (and the embedding) really are split
    p = q["params"]
    for leaf in (p["layers_1"]["mlp"]["gate_proj"]["kernel"], p["embed_tokens"]["embedding"]):
      assert "model" in tuple(leaf.sharding.spec), leaf.sharding
  assert [r.path for r in r1.layers] == [r.path for r in r0.layers]
  assert sum(r.status == "quantized" for r in r1.layers) == 14  # 7 per block, head float
  for a, b in zip(r0.layers, r1.layers):
    if a.error is not None:
      assert abs(a.error - b.error) <= 0.005 * a.error + 1e-7, (a.path, a.error, b.error)


@pytest.mark.parametrize("shape", [pytest.param((8, 1), marks=pytest.mark.slow), (4, 2),
                                   pytest.param((2, 4), marks=pytest.mark.slow)])
def test_llama_rtn_on_mesh_is_one_device_q(tiny_llama, shape):
  _, v, _ = tiny_llama
  spec = grids.GridSpec(4, "channel")
  ref, _ = qjax.quantize_rtn(v, spec)
  vs = mesh_lib.shard_params(v, make_mesh(shape))
  with no_split_fetch():
    q, _ = qjax.quantize_rtn(vs, spec)
  d, n = count_diff(q, ref)
  assert d == 0, f"{d} of {n} entries differ"
  assert_kept(q, vs)


def test_no_host_read_of_split_arrays(transformer):
  """Multi-host safety: GPTQ, GPFQ and RTN on a sharded 2-block model never read a split
  param or activation to the host (the driver's finite check reduces on the devices)."""
  mesh = make_mesh((4, 2))
  split = jax.device_put(jnp.ones((8, 8)), NamedSharding(mesh, P("data", "model")))
  with no_split_fetch():  # the guard itself: every host read of a split array raises
    for read in (np.asarray, np.array, lambda a: jax.device_get([a]), lambda a: a.tolist()):
      with pytest.raises(RuntimeError, match="non-addressable"):
        read(split)
    assert float(jnp.sum(split)) == 64.0  # a reduction's replicated scalar is readable
  model, v, x = transformer
  vs = mesh_lib.shard_params(v, mesh)
  xs = mesh_lib.shard_batch(x, mesh)
  with no_split_fetch():
    q_gptq, _ = qjax.gptq(vs, model.apply, xs, bits=3, progress=False)
    q_gpfq, _ = qjax.gpfq(vs, model.apply, xs, bits=4, progress=False)
    q_rtn, _ = qjax.quantize_rtn(vs, grids.GridSpec(4, "channel"))
    with pytest.raises(ValueError, match="mlp_in/kernel contains 1 NaN/Inf"):  # on the devices
      bad = jax.tree_util.tree_map(lambda a: a, vs)
      k = bad["params"]["block0"]["mlp_in"]["kernel"]
      bad["params"]["block0"]["mlp_in"]["kernel"] = k.at[0, 0].set(jnp.nan)
      qjax.gptq(bad, model.apply, xs, bits=3, progress=False)
  for q in (q_gptq, q_gpfq, q_rtn):
    assert_kept(q, vs)


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


def test_plan_segments_peak_per_device_falls(transformer):
  """The dry run's per-segment compiled peaks: every mesh of 8 devices holds well under a third
  of the one-device peak (measured 0.29 (8, 1), 0.21 (4, 2), 0.20 (2, 4); 1/8 would be all
  split: the small replicated leaves and per-device buffers are the rest)."""
  model, v, x = transformer
  one = qjax.plan_segments(v, model.apply, x)
  assert len(one) > 4 and all(b > 0 for _, b in one)
  peak = lambda plan: max(b for _, b in plan)  # noqa: E731
  for shape in MESHES:
    mesh = make_mesh(shape)
    plan = qjax.plan_segments(mesh_lib.shard_params(v, mesh), model.apply,
                                  mesh_lib.shard_batch(x, mesh))
    assert [s for s, _ in plan] == [s for s, _ in one], shape  # the same segments
    assert peak(plan) < 0.35 * peak(one), (shape, peak(plan), peak(one))
    assert all(b < 0.6 * a for (_, a), (_, b) in zip(one, plan)), shape  # each segment too


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


def test_reshard_and_replicated_stay_on_devices():
  mesh = make_mesh((4, 2))
  # Seed 5: a split mean of this kernel's per-neuron maxima is 1 ulp off the one-device mean.
  w = jnp.asarray(np.random.default_rng(5).normal(size=(16, 8)).astype(np.float32))
  split = jax.device_put(w, NamedSharding(mesh, P(None, "model")))
  target = NamedSharding(mesh, P("data", None))
  with no_split_fetch():  # a jitted identity: no host copy
    moved = mesh_lib.reshard(split, target)
    whole = mesh_lib.replicated(split)
  assert moved.sharding == target and whole.sharding.is_fully_replicated
  np.testing.assert_array_equal(np.asarray(moved), np.asarray(w))
  np.testing.assert_array_equal(np.asarray(whole), np.asarray(w))
  assert mesh_lib.replicated(w) is w  # one device: unchanged
  # The alphabet's mean over neurons of a split kernel: the one-device bits.
  assert float(qjax.alphabets.paper_step(split, 3, 1.0)) == float(
      qjax.alphabets.paper_step(w, 3, 1.0))


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
