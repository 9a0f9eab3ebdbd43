"""The driver's deterministic reduction (`reduce_chunks`): every mesh gives the one-device Q.

Without it, a deep model drifts on a mesh: XLA sums a data-split Gram's shard partials in its own
order, and a product with a kernel split over the model axis sums partials across devices, so
Q differs from one device's after a few blocks. With `reduce_chunks=C` each Gram is C fixed
chunks added in a fixed order and the segments use every weight whole, so Q must match bit for
bit. On the 4-block model here the default path drifts already (GPTQ 3 bits on (4, 2): 56 of
200,064 Q entries differ, measured when this was written). tests/conftest.py asks JAX for 8 CPU
devices.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import qjax
from qjax import grids, mesh as mesh_lib
from test_mesh import Transformer, make_mesh  # the pre-LN model of benchmarks/gpfq_network.py

pytestmark = pytest.mark.skipif(
    len(jax.devices()) < 8, reason="needs 8 devices (tests/conftest.py sets jax_num_cpu_devices)")

CHUNKS = 8  # divides the 8 x 32 rows of every layer, a multiple of every data-axis size
# (4, 2) splits both the rows and the kernels: the quick suite; the other two are slow.
MESHES = [pytest.param((8, 1), marks=pytest.mark.slow), (4, 2),
          pytest.param((2, 4), marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def transformer():
  x = np.random.default_rng(0).normal(size=(8, 32, 64)).astype(np.float32)
  model = Transformer(4)
  return model, model.init(jax.random.key(0), x[:1]), x


def count_diff(a, b) -> int:
  return sum(int((np.asarray(x) != np.asarray(y)).sum())
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def assert_kept(q, placed):
  """Every output leaf has the sharding of the input leaf."""
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(q)[0],
                          jax.tree_util.tree_leaves(placed)):
    assert a.sharding == b.sharding, (jax.tree_util.keystr(path), a.sharding, b.sharding)


def split_kernels(placed) -> int:
  return sum(not leaf.sharding.is_fully_replicated for leaf in jax.tree_util.tree_leaves(placed))


RUNS = {
    "gptq": lambda p, f, x, **kw: qjax.gptq(p, f, x, bits=3, progress=False, **kw),
    "gpfq": lambda p, f, x, **kw: qjax.gpfq(p, f, x, bits=3, progress=False, **kw),
}


@pytest.fixture(scope="module")
def refs(transformer):
  """One-device Q of each method with the option on (computed once per method)."""
  model, v, x = transformer
  cache = {}

  def get(method):
    if method not in cache:
      cache[method] = RUNS[method](v, model.apply, x, reduce_chunks=CHUNKS)
    return cache[method]
  return get


@pytest.mark.parametrize("method", ["gptq", "gpfq"])
@pytest.mark.parametrize("shape", MESHES)
def test_mesh_gives_one_device_q_exactly(transformer, refs, method, shape):
  model, v, x = transformer
  mesh = make_mesh(shape)
  vs = mesh_lib.shard_params(v, mesh)
  if shape[1] > 1:  # the model axis really splits kernels (incl. mlp_out's fan-in)
    assert split_kernels(vs) >= 4 * 6
  q, report = RUNS[method](vs, model.apply, mesh_lib.shard_batch(x, mesh),
                           reduce_chunks=CHUNKS)
  ref, ref_report = refs(method)
  assert count_diff(q, ref) == 0
  assert_kept(q, vs)
  assert [r.status for r in report.layers].count("quantized") == 4 * 6
  # The report's errors are diagnostics (their sums are not chunked): close, not bitwise.
  np.testing.assert_allclose([r.error for r in report.layers],
                             [r.error for r in ref_report.layers], rtol=1e-4)


@pytest.mark.slow
def test_qronos_mesh_gives_one_device_q_exactly(transformer):
  model, v, x = transformer
  run = lambda p, b: qjax.qronos(p, model.apply, b, bits=3, progress=False,  # noqa: E731
                                 reduce_chunks=CHUNKS)[0]
  ref = run(v, x)
  mesh = make_mesh((4, 2))
  vs = mesh_lib.shard_params(v, mesh)
  q = run(vs, mesh_lib.shard_batch(x, mesh))
  assert count_diff(q, ref) == 0
  assert_kept(q, vs)


def test_rtn_on_deep_mesh_is_one_device_q(transformer):
  _, v, _ = transformer
  spec = grids.GridSpec(3, "channel")
  ref, _ = qjax.quantize_rtn(v, spec)
  vs = mesh_lib.shard_params(v, make_mesh((4, 2)))
  q, _ = qjax.quantize_rtn(vs, spec)
  assert count_diff(q, ref) == 0
  assert_kept(q, vs)


def test_default_is_unchanged_and_exact_mode_close(transformer, refs):
  """reduce_chunks=None is the default path; on one device the chunked Grams only reorder float
  sums, so Q stays a GPTQ solution of about the same error."""
  model, v, x = transformer
  q0, r0 = qjax.gptq(v, model.apply, x, bits=3, progress=False)
  q1, _ = qjax.gptq(v, model.apply, x, bits=3, progress=False, reduce_chunks=None)
  assert count_diff(q0, q1) == 0
  q2, r2 = refs("gptq")
  n = sum(a.size for a in jax.tree_util.tree_leaves(q0))
  assert count_diff(q0, q2) < 0.2 * n
  np.testing.assert_allclose([r.error for r in r2.layers], [r.error for r in r0.layers],
                             rtol=0.05)


def test_exact_tmm_matches_plain_product():
  rng = np.random.default_rng(1)
  a = jnp.asarray(rng.normal(size=(64, 12)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(64, 5)), jnp.float32)
  got = jax.jit(mesh_lib.exact_tmm, static_argnums=2)(a, b, 8)
  assert got.shape == (12, 5)
  np.testing.assert_allclose(got, np.asarray(a, np.float64).T @ np.asarray(b, np.float64),
                             rtol=1e-5, atol=1e-5)
  # Rows split over 4 devices: the chunk partials are summed in the same order (same bits).
  mesh = make_mesh((4, 2))
  rows = NamedSharding(mesh, P("data"))
  split = jax.jit(mesh_lib.exact_tmm, static_argnums=2)(jax.device_put(a, rows),
                                                      jax.device_put(b, rows), 8)
  np.testing.assert_array_equal(np.asarray(split), np.asarray(got))


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "8"])
@pytest.mark.parametrize("method", ["gptq", "gpfq", "qronos"])
def test_bad_reduce_chunks_raise(transformer, method, bad):
  model, v, x = transformer
  with pytest.raises(ValueError, match="reduce_chunks"):
    getattr(qjax, method)(v, model.apply, x, bits=3, progress=False, reduce_chunks=bad)


def test_reduce_chunks_must_fit_rows_and_mesh(transformer):
  model, v, x = transformer
  with pytest.raises(ValueError, match="reduce_chunks=7 must divide the 256 rows"):
    qjax.gptq(v, model.apply, x, bits=3, progress=False, reduce_chunks=7)
  mesh = make_mesh((4, 2))
  with pytest.raises(ValueError, match="reduce_chunks=2 .* multiple of the 4 devices"):
    qjax.gpfq(mesh_lib.shard_params(v, mesh), model.apply, mesh_lib.shard_batch(x, mesh),
              bits=3, progress=False, reduce_chunks=2)


@pytest.mark.slow
def test_gpfq_wide_mesh_gives_one_device_q_exactly():
  """d = 192: GPFQ's default path drifts here (12.91% of Q at 4 bits on (4, 2), measured; the
  d = 64 model above happens to match by default); with the option not one entry differs."""
  x = np.random.default_rng(0).normal(size=(8, 32, 192)).astype(np.float32)
  model = Transformer(4, 192)
  v = model.init(jax.random.key(0), x[:1])
  ref, _ = RUNS["gpfq"](v, model.apply, x, reduce_chunks=CHUNKS)
  mesh = make_mesh((4, 2))
  vs = mesh_lib.shard_params(v, mesh)
  q, _ = RUNS["gpfq"](vs, model.apply, mesh_lib.shard_batch(x, mesh), reduce_chunks=CHUNKS)
  assert count_diff(q, ref) == 0
  assert_kept(q, vs)
