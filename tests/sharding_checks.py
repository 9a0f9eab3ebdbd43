"""Sharding checks on 8 host CPU devices, run as a script by tests/test_sharding.py.

The device count is fixed when JAX starts, so this runs in its own process:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_checks.py [name ...]

Each check prints one line `PASS <name>` or `FAIL <name>: <reason>`; the exit code is the number
of failed checks (capped at 100). With names, only those checks run.
"""
from __future__ import annotations

import os
import re
import sys
import time
import traceback
from typing import Callable

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import qjax  # noqa: E402
from qjax import alq, alphabets, psgd  # noqa: E402
from qjax._gpfq.layer import gpfq_layer  # noqa: E402
from qjax._gpfq.sharded import gpfq_layer_sharded  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")  # as tests/conftest.py

CHECKS: dict[str, Callable[[], None]] = {}


def check(fn: Callable[[], None]) -> Callable[[], None]:
  CHECKS[fn.__name__] = fn
  return fn


def auto_mesh() -> Mesh:
  """2 x 4 mesh with Auto axes (GSPMD propagation), as `jax.sharding.Mesh(...)` builds it."""
  return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))


def explicit_mesh() -> Mesh:
  """2 x 4 mesh with Explicit axes (sharding in types), the `jax.make_mesh` default."""
  return jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)


def spec_of(a: jax.Array) -> P:
  return a.sharding.spec


def expect(cond: bool, msg: str) -> None:
  if not cond:
    raise AssertionError(msg)


# ------------------------------------------------------------------------------------------------
# GPFQ


def layer_data(m: int = 64, N0: int = 40, N1: int = 16, seed: int = 0):
  rng = np.random.default_rng(seed)
  W = (rng.normal(size=(N0, N1)) / np.sqrt(N0)).astype(np.float32)
  mix = np.eye(N0) + rng.normal(size=(N0, N0)) / np.sqrt(N0)  # correlated features
  X = np.maximum(rng.normal(size=(m, N0)) @ mix, 0.0).astype(np.float32)
  Xt = (X + 0.1 * rng.normal(size=X.shape)).astype(np.float32)
  return W, X, Xt, alphabets.levels_for(jnp.asarray(W), 3, 1.0)


def expect_same_q(Q: jax.Array, ref: jax.Array, levels: jax.Array, spec: P) -> None:
  q, r = np.asarray(Q), np.asarray(ref)
  expect(Q.dtype == ref.dtype and Q.shape == ref.shape, f"{Q.dtype}{Q.shape} vs {ref.dtype}"
         f"{ref.shape}")
  expect(np.isin(q, np.asarray(levels)).all(), "entries outside the alphabet")
  expect((q == r).all(), f"{int((q != r).sum())} of {q.size} entries differ from one device")
  expect(spec_of(Q) == spec, f"Q sharded {spec_of(Q)}, expected {spec}")


def _gpfq_equal(method: str, same: bool, m: int = 64) -> None:
  W, X, Xt, levels = layer_data(m=m)
  Xt = None if same else Xt
  ref = gpfq_layer(W, X, Xt, levels, method=method, block_size=16)
  Q = gpfq_layer_sharded(W, X, Xt, levels, mesh=auto_mesh(), method=method, block_size=16)
  expect_same_q(Q, ref, levels, P(None, "model"))


@check
def gpfq_scan():
  _gpfq_equal("scan", same=False)


@check
def gpfq_scan_same():
  _gpfq_equal("scan", same=True)


@check
def gpfq_gram():
  _gpfq_equal("gram", same=False)


@check
def gpfq_gram_same():
  _gpfq_equal("gram", same=True)


@check
def gpfq_rows_padded():
  """m = 61 is not a multiple of D = 2 or D M = 8: zero rows pad it, exactly."""
  _gpfq_equal("scan", same=False, m=61)
  _gpfq_equal("gram", same=False, m=61)


@check
def gpfq_layer_mesh_argument():
  """`qjax.gpfq_layer(..., mesh=...)` is the sharded layer; the ambient mesh is taken too."""
  W, X, Xt, levels = layer_data()
  ref = gpfq_layer(W, X, Xt, levels, block_size=16)
  expect_same_q(qjax.gpfq_layer(W, X, Xt, levels, block_size=16, mesh=auto_mesh()), ref, levels,
                P(None, "model"))
  with jax.set_mesh(explicit_mesh()):
    expect_same_q(qjax.gpfq_layer(W, X, Xt, levels, block_size=16), ref, levels,
                  P(None, "model"))


class _Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(nn.relu(nn.Dense(32)(x)))  # 10 neurons do not divide over 'model' (4)


@check
def gpfq_network_on_mesh():
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
      expect((np.asarray(q) == np.asarray(r)).all(), f"{how}: {name} differs from one device")
  try:  # the mesh options reach every layer
    qjax.gpfq(variables, model.apply, x, bits=3, progress=False, mesh=auto_mesh(),
              model_axis="neurons")
  except ValueError as e:
    expect("model_axis='neurons'" in str(e), str(e))
  else:
    raise AssertionError("model_axis not in the mesh was accepted")


@check
def gpfq_auto_and_stream():
  W, X, Xt, levels = layer_data()
  mesh = auto_mesh()
  ref = gpfq_layer(W, X, Xt, levels, block_size=16)
  expect_same_q(gpfq_layer_sharded(W, X, Xt, levels, mesh=mesh, block_size=16), ref, levels,
                P(None, "model"))
  chunks = [(X[:24], Xt[:24]), (X[24:], Xt[24:])]
  ref = gpfq_layer(W, chunks, None, levels, block_size=16)
  expect_same_q(gpfq_layer_sharded(W, chunks, None, levels, mesh=mesh, block_size=16), ref,
                levels, P(None, "model"))


@check
def gpfq_ambient_explicit_mesh():
  """mesh=None takes the mesh of `jax.set_mesh`, eagerly and under an outer jit."""
  W, X, Xt, levels = layer_data()
  mesh = explicit_mesh()
  for method in ("scan", "gram"):
    ref = gpfq_layer(W, X, Xt, levels, method=method, block_size=16)
    with jax.set_mesh(mesh):
      eager = gpfq_layer_sharded(W, X, Xt, levels, method=method, block_size=16)
      jitted = jax.jit(lambda w, x, xt, method=method: gpfq_layer_sharded(
          w, x, xt, levels, method=method, block_size=16))(W, X, Xt)
    for Q in (eager, jitted):
      expect_same_q(Q, ref, levels, P(None, "model"))
      expect(Q.sharding.mesh.axis_types == mesh.axis_types, "not on the ambient mesh")


@check
def gpfq_other_axes():
  """One axis None (not split), and the mesh's axes in the other roles."""
  W, X, Xt, levels = layer_data()
  mesh = auto_mesh()
  ref = gpfq_layer(W, X, Xt, levels, method="scan", block_size=16)
  Q = gpfq_layer_sharded(W, X, Xt, levels, mesh=mesh, method="scan", block_size=16,
                         data_axis=None)
  expect_same_q(Q, ref, levels, P(None, "model"))
  W8 = W[:, :8]
  ref = gpfq_layer(W8, X, Xt, levels, method="gram", block_size=16)
  Q = gpfq_layer_sharded(W8, X, Xt, levels, mesh=mesh, method="gram", block_size=16,
                         data_axis="model", model_axis="data")
  expect_same_q(Q, ref, levels, P(None, "data"))


@check
def gpfq_no_mesh_falls_back():
  W, X, Xt, levels = layer_data()
  Q = gpfq_layer_sharded(W, X, Xt, levels, block_size=16)
  expect(len(Q.sharding.device_set) == 1, f"expected one device, got {Q.sharding}")
  expect((np.asarray(Q) == np.asarray(gpfq_layer(W, X, Xt, levels, block_size=16))).all(),
         "differs from gpfq_layer")


@check
def gpfq_errors():
  W, X, Xt, levels = layer_data()
  mesh = auto_mesh()
  cases = [
      (dict(W=W[:, :10]), r"N1=10.*model_axis='model'"),
      (dict(model_axis="tensor"), r"model_axis='tensor' is not an axis"),
      (dict(data_axis="batch"), r"data_axis='batch' is not an axis"),
      (dict(data_axis="model"), r"must differ"),
      (dict(X=X[:, :7]), r"X must have shape"),
      (dict(method="fast"), r"method must be"),
  ]
  for kwargs, pattern in cases:
    args = dict(W=W, X=X, X_tilde=Xt, levels=levels, mesh=mesh)
    args.update(kwargs)
    try:
      gpfq_layer_sharded(args.pop("W"), args.pop("X"), args.pop("X_tilde"), args.pop("levels"),
                         **args)
    except ValueError as e:
      expect(re.search(pattern, str(e)) is not None, f"{kwargs}: message {e!s:.200}")
    else:
      raise AssertionError(f"{kwargs}: no ValueError")


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


def place(tree, mesh: Mesh, spec_fn: Callable) -> dict:
  return jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, spec_fn(a))), tree)


def update_all_gathers(compiled) -> list[str]:
  """All-gathers of the optimizer update (the forward/backward pass may gather activations)."""
  return [line.strip() for line in compiled.as_text().splitlines()
          if re.search(r"\ball-gather(-start)?\(", line) and "tx_update" in line]


def expect_close(a, b, what: str) -> None:
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    expect(x.dtype == y.dtype and x.shape == y.shape, f"{what}: {x.dtype}{x.shape} vs "
           f"{y.dtype}{y.shape}")
    expect(np.allclose(x, y, rtol=1e-5, atol=1e-6), f"{what}: max |diff| "
           f"{np.max(np.abs(x.astype(np.float64) - y)):.3g}")


_REFERENCES: dict[str, tuple] = {}  # one-device results by name, shared between checks


def sharded_step(name: str, tx, params, grad_fn, mesh: Mesh, param_specs: Callable, *,
                 explicit: bool) -> None:
  """One jitted step on `mesh` (batch over 'data', params by `param_specs`) == one device.

  Also: updated params and the optimizer state are sharded as the params (with `explicit`, the
  state from `tx.init` too), and the compiled `tx.update` has no all-gather.
  """

  def expect_state_sharded(state, what: str) -> None:
    for a in jax.tree.leaves(state):
      if a.ndim:
        expect(a.sharding.is_equivalent_to(NamedSharding(mesh, param_specs(a)), a.ndim),
               f"{what} leaf {a.shape} sharded {a.sharding}, expected {param_specs(a)}")

  def step(p, s, x, y):
    g = grad_fn(p, x, y)
    with jax.named_scope("tx_update"):  # tags the update's ops in the compiled HLO
      updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  x, y = batch()
  if name not in _REFERENCES:
    _REFERENCES[name] = jax.jit(step)(params, jax.jit(tx.init)(params), x, y)

  with jax.set_mesh(mesh):
    p = place(params, mesh, param_specs)
    xs, ys = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, y))
    if explicit:  # sharding in types: the state follows the params through init
      s = jax.jit(tx.init)(p)
      expect_state_sharded(s, "init state")
    else:  # GSPMD does not propagate into zeros: shard the state as the params
      s = place(jax.jit(tx.init)(p), mesh, param_specs)
    compiled = jax.jit(step).lower(p, s, xs, ys).compile()
    out = compiled(p, s, xs, ys)

  expect_close(out, _REFERENCES[name], "step")
  for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(p)):
    expect(a.sharding.is_equivalent_to(b.sharding, a.ndim),
           f"param sharding {spec_of(b)} became {a.sharding}")
  expect_state_sharded(out[1], "state")
  gathers = update_all_gathers(compiled)
  expect(not gathers, f"{len(gathers)} all-gather(s) in the compiled update: {gathers[:2]}")


def replicated(a) -> P:
  return P()


@check
def psgd_data_parallel():
  sharded_step("psgd", psgd.psgd(0.01, bits=4, weight_decay=1e-4), mlp_params(), jax.grad(loss),
               auto_mesh(), replicated, explicit=False)


@check
def psgd_param_sharded():
  sharded_step("psgd", psgd.psgd(0.01, bits=4, weight_decay=1e-4), mlp_params(), jax.grad(loss),
               auto_mesh(), param_spec, explicit=False)
  sharded_step("psgd_prune", psgd.psgd(0.01, targets=psgd.zero_targets(), normalized=False),
               mlp_params(), jax.grad(loss), explicit_mesh(), param_spec, explicit=True)


def alq_params():
  return alq.init(mlp_params(), {"Dense_.*": "channel-wise"}, max_bits=3, sigma=0.0)


def alq_grad(q, x, y):
  return jax.grad(loss)(alq.reconstruct(q), x, y)


ALQ = {"coordinate": alq.coordinate(1e-3), "basis": alq.basis(1e-3), "ste": alq.ste(1e-3)}


@check
def alq_data_parallel():
  sharded_step("coordinate", ALQ["coordinate"], alq_params(), alq_grad, auto_mesh(), replicated,
               explicit=False)


@check
def alq_param_sharded():
  for name, tx in ALQ.items():
    sharded_step(name, tx, alq_params(), alq_grad, auto_mesh(), param_spec, explicit=False)


@check
def alq_param_sharded_explicit():
  """Explicit axes: the refit of basis and ste (sort, search, solve) and a state sharded by init."""
  for name, tx in ALQ.items():
    sharded_step(name, tx, alq_params(), alq_grad, explicit_mesh(), param_spec, explicit=True)


@check
def alq_prune_sharded():
  """The cross-layer sort may gather (it sorts the per-layer proposals); results must agree."""
  q, tx = alq_params(), alq.coordinate(1e-3)
  x, y = batch()
  state = jax.jit(lambda q: tx.update(alq_grad(q, x, y), tx.init(q), q)[1])(q)
  prune = jax.jit(lambda q, s: alq.prune(q, s, 5, top_k=0.2, learning_rate=1e-3))
  ref = prune(q, state)
  for mesh in (auto_mesh(), explicit_mesh()):
    with jax.set_mesh(mesh):
      out = prune(place(q, mesh, param_spec), place(state, mesh, param_spec))
    expect_close(out, ref, f"prune on {mesh.axis_types}")


def main(names: list[str]) -> int:
  expect(len(jax.devices()) >= 8, f"need 8 devices, got {jax.devices()}")
  failed = 0
  for name in names or list(CHECKS):
    start = time.perf_counter()
    try:
      CHECKS[name]()
      print(f"PASS {name} ({time.perf_counter() - start:.1f} s)", flush=True)
    except Exception as e:  # report every check, keep going
      failed += 1
      detail = "".join(traceback.format_exception_only(e)).strip().replace("\n", " | ")
      print(f"FAIL {name}: {detail[:2000]}", flush=True)
  return min(failed, 100)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
