"""GPFQ, PSGD and ALQ on 2 x 4 meshes of host CPU devices, in this pytest process.

tests/conftest.py asks JAX for 8 CPU devices (`jax_num_cpu_devices`) before any backend use. Every
check compares the sharded result with the one-device one, and checks where the result lives.
"""
from __future__ import annotations

import re
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

import qjax
from qjax import alq, alphabets, psgd
from qjax._gpfq.layer import gpfq_layer
from qjax._gpfq.sharded import gpfq_layer_sharded

pytestmark = pytest.mark.skipif(
    len(jax.devices()) < 8, reason="needs 8 devices (tests/conftest.py sets jax_num_cpu_devices)")


def auto_mesh() -> Mesh:
  """2 x 4 mesh with Auto axes (GSPMD propagation), as `jax.sharding.Mesh(...)` builds it."""
  return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))


def explicit_mesh() -> Mesh:
  """2 x 4 mesh with Explicit axes (sharding in types), the `jax.make_mesh` default."""
  return jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)


def test_eight_devices():
  assert len(jax.devices()) == 8, jax.devices()
  # Without a mesh, work stays on one device.
  assert len(jnp.ones(3).sharding.device_set) == 1


# ------------------------------------------------------------------------------------------------
# GPFQ


def layer_data(m: int = 64, N0: int = 40, N1: int = 16, seed: int = 0):
  rng = np.random.default_rng(seed)
  W = (rng.normal(size=(N0, N1)) / np.sqrt(N0)).astype(np.float32)
  mix = np.eye(N0) + rng.normal(size=(N0, N0)) / np.sqrt(N0)  # correlated features
  X = np.maximum(rng.normal(size=(m, N0)) @ mix, 0.0).astype(np.float32)
  Xt = (X + 0.1 * rng.normal(size=X.shape)).astype(np.float32)
  return W, X, Xt, alphabets.levels_for(jnp.asarray(W), 3, 1.0)


def assert_same_q(Q: jax.Array, ref: jax.Array, spec: P, levels: jax.Array | None = None) -> None:
  q, r = np.asarray(Q), np.asarray(ref)
  assert (Q.dtype, Q.shape) == (ref.dtype, ref.shape)
  if levels is not None:
    assert np.isin(q, np.asarray(levels)).all(), "entries outside the alphabet"
  assert (q == r).all(), f"{int((q != r).sum())} of {q.size} entries differ from one device"
  assert Q.sharding.spec == spec, f"Q sharded {Q.sharding.spec}, expected {spec}"


@pytest.mark.parametrize("method", ["scan", "gram"])
@pytest.mark.parametrize("same", [False, True])
@pytest.mark.parametrize("m", [64, 61])  # 61 is not a multiple of D = 2 or D M = 8: zero rows pad
def test_gpfq_sharded_equals_one_device(method, same, m):
  W, X, Xt, levels = layer_data(m=m)
  Xt = None if same else Xt
  ref = gpfq_layer(W, X, Xt, levels, method=method, block_size=16)
  Q = gpfq_layer_sharded(W, X, Xt, levels, mesh=auto_mesh(), method=method, block_size=16)
  assert_same_q(Q, ref, P(None, "model"), levels)


def test_gpfq_layer_mesh_argument():
  """`qjax.gpfq_layer(..., mesh=...)` is the sharded layer; the ambient mesh is taken too."""
  W, X, Xt, levels = layer_data()
  ref = gpfq_layer(W, X, Xt, levels, block_size=16)
  assert_same_q(qjax.gpfq_layer(W, X, Xt, levels, block_size=16, mesh=auto_mesh()), ref,
                P(None, "model"), levels)
  with jax.set_mesh(explicit_mesh()):
    assert_same_q(qjax.gpfq_layer(W, X, Xt, levels, block_size=16), ref, P(None, "model"), levels)


class _Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(nn.relu(nn.Dense(32)(x)))  # 10 neurons do not divide over 'model' (4)


def test_gpfq_network_on_mesh():
  """`qjax.gpfq` on a mesh (argument or ambient) gives the one-device kernels."""
  model = _Mlp()
  x = np.random.default_rng(3).normal(size=(96, 24)).astype(np.float32)
  variables = model.init(jax.random.key(0), x[:1])
  ref, _ = qjax.gpfq(variables, model.apply, x, bits=3, progress=False)
  kernels = lambda v: [v["params"][k]["kernel"] for k in ("Dense_0", "Dense_1")]
  got, _ = qjax.gpfq(variables, model.apply, x, bits=3, progress=False, mesh=auto_mesh())
  with jax.set_mesh(explicit_mesh()):
    ambient, _ = qjax.gpfq(variables, model.apply, x, bits=3, progress=False)
  for out, how in ((got, "mesh="), (ambient, "ambient mesh")):
    for name, q, r in zip(("Dense_0", "Dense_1"), kernels(out), kernels(ref)):
      np.testing.assert_array_equal(q, r, err_msg=f"{how}: {name} differs from one device")
  with pytest.raises(ValueError, match="model_axis='neurons'"):  # the mesh options reach layers
    qjax.gpfq(variables, model.apply, x, bits=3, progress=False, mesh=auto_mesh(),
              model_axis="neurons")


def test_gpfq_auto_and_stream():
  W, X, Xt, levels = layer_data()
  mesh = auto_mesh()
  ref = gpfq_layer(W, X, Xt, levels, block_size=16)
  assert_same_q(gpfq_layer_sharded(W, X, Xt, levels, mesh=mesh, block_size=16), ref,
                P(None, "model"), levels)
  chunks = [(X[:24], Xt[:24]), (X[24:], Xt[24:])]
  ref = gpfq_layer(W, chunks, None, levels, block_size=16)
  for fn in (gpfq_layer_sharded, gpfq_layer):
    assert_same_q(fn(W, iter(chunks), None, levels, mesh=mesh, block_size=16), ref,
                  P(None, "model"), levels)


@pytest.mark.parametrize("method", ["scan", "gram"])
def test_gpfq_ambient_explicit_mesh(method):
  """mesh=None takes the mesh of `jax.set_mesh`, eagerly and under an outer jit."""
  W, X, Xt, levels = layer_data()
  mesh = explicit_mesh()
  ref = gpfq_layer(W, X, Xt, levels, method=method, block_size=16)
  with jax.set_mesh(mesh):
    eager = gpfq_layer_sharded(W, X, Xt, levels, method=method, block_size=16)
    jitted = jax.jit(lambda w, x, xt: gpfq_layer_sharded(
        w, x, xt, levels, method=method, block_size=16))(W, X, Xt)
    checked = jax.jit(lambda w, x, xt: gpfq_layer(
        w, x, xt, levels, method=method, block_size=16))(W, X, Xt)
  for Q in (eager, jitted, checked):
    assert_same_q(Q, ref, P(None, "model"), levels)
    assert Q.sharding.mesh.axis_types == mesh.axis_types, "not on the ambient mesh"


def test_gpfq_other_axes():
  """One axis None (not split), and the mesh's axes in the other roles."""
  W, X, Xt, levels = layer_data()
  mesh = auto_mesh()
  ref = gpfq_layer(W, X, Xt, levels, method="scan", block_size=16)
  Q = gpfq_layer_sharded(W, X, Xt, levels, mesh=mesh, method="scan", block_size=16,
                         data_axis=None)
  assert_same_q(Q, ref, P(None, "model"), levels)
  W8 = W[:, :8]
  ref = gpfq_layer(W8, X, Xt, levels, method="gram", block_size=16)
  Q = gpfq_layer_sharded(W8, X, Xt, levels, mesh=mesh, method="gram", block_size=16,
                         data_axis="model", model_axis="data")
  assert_same_q(Q, ref, P(None, "data"), levels)


def test_gpfq_no_mesh_falls_back():
  W, X, Xt, levels = layer_data()
  for fn in (gpfq_layer_sharded, gpfq_layer):
    Q = fn(W, X, Xt, levels, block_size=16)
    assert len(Q.sharding.device_set) == 1, Q.sharding
  np.testing.assert_array_equal(gpfq_layer_sharded(W, X, Xt, levels, block_size=16),
                                gpfq_layer(W, X, Xt, levels, block_size=16))


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(W="narrow"), r"N1=10.*model_axis='model'"),
    (dict(model_axis="tensor"), r"model_axis='tensor' is not an axis"),
    (dict(data_axis="batch"), r"data_axis='batch' is not an axis"),
    (dict(data_axis="model"), r"must differ"),
    (dict(mesh="not a mesh"), r"mesh must be a jax.sharding.Mesh"),
    (dict(method="fast"), r"method must be"),
])
def test_gpfq_mesh_errors(kwargs, pattern):
  """Mesh errors from both entries: `gpfq_layer(mesh=)` and the sharded path itself."""
  W, X, Xt, levels = layer_data()
  args = dict(W=W, X=X, X_tilde=Xt, levels=levels, mesh=auto_mesh())
  args.update(kwargs)
  if isinstance(args["W"], str):  # "narrow": 10 neurons do not divide over 'model' (4)
    args["W"] = W[:, :10]
  for fn in (gpfq_layer, gpfq_layer_sharded):
    a = dict(args)
    with pytest.raises(ValueError, match=pattern):
      fn(a.pop("W"), a.pop("X"), a.pop("X_tilde"), a.pop("levels"), **a)


def test_gpfq_input_errors_on_a_mesh():
  W, X, Xt, levels = layer_data()
  with pytest.raises(ValueError, match=r"X must have shape"):
    gpfq_layer(W, X[:, :7], Xt, levels, mesh=auto_mesh())
  with pytest.raises(ValueError, match=r"X has 0 rows"):
    gpfq_layer(W, X[:0], Xt[:0], levels, mesh=auto_mesh())


class NeuronLevels(NamedTuple):
  """A per-neuron alphabet (L, N1) and a shared offset: split and replicated leaves."""
  levels: jax.Array  # (L, N1), neurons on the last axis: split over 'model'
  offset: jax.Array  # 0-d, shared: replicated

  def round_row(self, z, t):
    del t
    # z holds this shard's columns: the per-neuron leaf must hold the same ones (else a shape
    # error under rank promotion 'raise').
    nearest = jnp.argmin(jnp.abs(z[None, :] - self.levels), axis=0)
    return jnp.take_along_axis(self.levels, nearest[None, :], axis=0)[0] + self.offset


class GroupGrid(NamedTuple):
  """A grid per (group of rows, neuron), as integer grids have: scale (G, N1), group (N0,)."""
  scale: jax.Array  # (G, N1): split over 'model'
  group: jax.Array  # (N0,) int32 group of each row: replicated

  def round_row(self, z, t):
    s = self.scale[self.group[t]]
    return jnp.clip(jnp.round(z / s), -3, 3) * s


@pytest.mark.parametrize("method", ["scan", "gram"])
def test_gpfq_group_rounder_sharded(method):
  W, X, Xt, _ = layer_data()  # N0 = 40: groups of 16 rows, the last one short
  rng = np.random.default_rng(6)
  scale = rng.uniform(0.5, 1.5, size=(3, W.shape[1])) * np.abs(W).max(0) / 3
  rounder = GroupGrid(jnp.asarray(scale, jnp.float32), jnp.arange(40, dtype=jnp.int32) // 16)
  ref = gpfq_layer(W, X, Xt, rounder, method=method, block_size=16)
  Q = gpfq_layer(W, X, Xt, rounder, method=method, block_size=16, mesh=auto_mesh())
  assert_same_q(Q, ref, P(None, "model"))
  assert len(np.unique(np.asarray(Q))) > 7  # the grids differ between groups and neurons


@pytest.mark.parametrize("method", ["scan", "gram"])
def test_gpfq_per_neuron_rounder_sharded(method):
  W, X, Xt, _ = layer_data()
  rng = np.random.default_rng(5)
  levels = np.sort(rng.uniform(-1.0, 1.0, size=(7, W.shape[1])) * np.abs(W).max(0), axis=0)
  levels = levels.astype(np.float32)
  rounder = NeuronLevels(jnp.asarray(levels), jnp.float32(0.0))
  ref = gpfq_layer(W, X, Xt, rounder, method=method, block_size=16)
  Q = gpfq_layer(W, X, Xt, rounder, method=method, block_size=16, mesh=auto_mesh())
  assert_same_q(Q, ref, P(None, "model"))
  assert all(np.isin(np.asarray(Q)[:, j], levels[:, j]).all() for j in range(W.shape[1]))


# ------------------------------------------------------------------------------------------------
# PSGD and ALQ training steps


def mlp_params(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {
      "Dense_0": {"kernel": (rng.normal(size=(16, 32)) / 4).astype(np.float32),
                  "bias": (0.1 * rng.normal(size=(32,))).astype(np.float32)},
      "Dense_1": {"kernel": (rng.normal(size=(32, 8)) / 6).astype(np.float32),
                  "bias": np.zeros((8,), np.float32)},
  }


def batch(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(32, 16)).astype(np.float32)
  y = np.eye(8, dtype=np.float32)[rng.integers(0, 8, 32)]
  return x, y


def loss(params, x, y):
  """Softmax cross-entropy with one-hot labels (no integer gather: fine on Explicit meshes)."""
  h = jax.nn.relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"][None])
  logits = h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"][None]
  return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * y, axis=-1))


def param_spec(leaf) -> P:
  """Parameter sharding: neurons (kernel columns, biases, ALQ groups) over 'model'."""
  if leaf.ndim == 0:
    return P()
  if leaf.ndim == 2 and leaf.shape in ((16, 32), (32, 8)):  # Dense kernels (N0, N1)
    return P(None, "model")
  return P("model", *([None] * (leaf.ndim - 1)))  # biases, ALQ alpha/B/mask/moments (G, ...)


def replicated(leaf) -> P:
  del leaf
  return P()


def place(tree, mesh: Mesh, spec_fn: Callable) -> dict:
  return jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, spec_fn(a))), tree)


def update_all_gathers(compiled) -> list[str]:
  """All-gathers of the optimizer update (the forward/backward pass may gather activations)."""
  return [line.strip() for line in compiled.as_text().splitlines()
          if re.search(r"\ball-gather(-start)?\(", line) and "tx_update" in line]


def assert_close(a, b, what: str) -> None:
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x), np.asarray(y)
    assert (x.dtype, x.shape) == (y.dtype, y.shape), what
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=what)


def _step(tx, grad_fn):
  def step(p, s, x, y):
    g = grad_fn(p, x, y)
    with jax.named_scope("tx_update"):  # tags the update's ops in the compiled HLO
      updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s
  return step


def assert_sharded_step(tx, params, grad_fn, mesh: Mesh, param_specs: Callable, *,
                        explicit: bool) -> None:
  """One jitted step on `mesh` (batch over 'data', params by `param_specs`) == one device.

  Also: updated params and the optimizer state are sharded as the params (with `explicit`, the
  state from `tx.init` too), and the compiled `tx.update` has no all-gather.
  """

  def assert_state_sharded(state, what: str) -> None:
    for a in jax.tree.leaves(state):
      if a.ndim:
        assert a.sharding.is_equivalent_to(NamedSharding(mesh, param_specs(a)), a.ndim), (
            f"{what} leaf {a.shape} sharded {a.sharding}, expected {param_specs(a)}")

  step = _step(tx, grad_fn)
  x, y = batch()
  ref = jax.jit(step)(params, jax.jit(tx.init)(params), x, y)
  with jax.set_mesh(mesh):
    p = place(params, mesh, param_specs)
    xs, ys = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, y))
    if explicit:  # sharding in types: the state follows the params through init
      s = jax.jit(tx.init)(p)
      assert_state_sharded(s, "init state")
    else:  # GSPMD does not propagate into zeros: shard the state as the params
      s = place(jax.jit(tx.init)(p), mesh, param_specs)
    compiled = jax.jit(step).lower(p, s, xs, ys).compile()
    out = compiled(p, s, xs, ys)

  assert_close(out, ref, "step")
  for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(p)):
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (
        f"param sharding {b.sharding.spec} became {a.sharding}")
  assert_state_sharded(out[1], "state")
  gathers = update_all_gathers(compiled)
  assert not gathers, f"{len(gathers)} all-gather(s) in the compiled update: {gathers[:2]}"


def test_psgd_data_parallel():
  assert_sharded_step(psgd.psgd(0.01, bits=4, weight_decay=1e-4), mlp_params(), jax.grad(loss),
                      auto_mesh(), replicated, explicit=False)


def test_psgd_param_sharded():
  assert_sharded_step(psgd.psgd(0.01, bits=4, weight_decay=1e-4), mlp_params(), jax.grad(loss),
                      auto_mesh(), param_spec, explicit=False)


def test_psgd_prune_param_sharded_explicit():
  assert_sharded_step(psgd.psgd(0.01, targets=psgd.zero_targets(), normalized=False),
                      mlp_params(), jax.grad(loss), explicit_mesh(), param_spec, explicit=True)


def alq_params():
  return alq.init(mlp_params(), {"Dense_.*": "channel-wise"}, max_bits=3, sigma=0.0)


def alq_grad(q, x, y):
  return jax.grad(loss)(alq.reconstruct(q), x, y)


ALQ = {"coordinate": alq.coordinate, "basis": alq.basis, "ste": alq.ste}


def test_alq_data_parallel():
  assert_sharded_step(alq.coordinate(1e-3), alq_params(), alq_grad, auto_mesh(), replicated,
                      explicit=False)


@pytest.mark.parametrize("name", ALQ)
def test_alq_param_sharded(name):
  assert_sharded_step(ALQ[name](1e-3), alq_params(), alq_grad, auto_mesh(), param_spec,
                      explicit=False)


@pytest.mark.parametrize("name", ALQ)
def test_alq_param_sharded_explicit(name):
  """Explicit axes: the refit of basis and ste (sort, search, solve) and a state sharded by init."""
  assert_sharded_step(ALQ[name](1e-3), alq_params(), alq_grad, explicit_mesh(), param_spec,
                      explicit=True)


@pytest.mark.parametrize("mesh_fn", [auto_mesh, explicit_mesh])
def test_alq_prune_sharded(mesh_fn):
  """The cross-layer sort may gather (it sorts the per-layer proposals); results must agree."""
  q, tx = alq_params(), alq.coordinate(1e-3)
  x, y = batch()
  state = jax.jit(lambda q: tx.update(alq_grad(q, x, y), tx.init(q), q)[1])(q)
  prune = jax.jit(lambda q, s: alq.prune(q, s, 5, top_k=0.2, learning_rate=1e-3))
  ref = prune(q, state)
  mesh = mesh_fn()
  with jax.set_mesh(mesh):
    out = prune(place(q, mesh, param_spec), place(state, mesh, param_spec))
  assert_close(out, ref, f"prune on {mesh.axis_types}")
