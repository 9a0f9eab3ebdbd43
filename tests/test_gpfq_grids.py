"""qjax.gpfq / qjax.quantize_msq on grids (grid=) and with a choice of quantizer (quantizer=)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import alphabets
from qjax import grids
from qjax._gpfq import rounders

PC4 = grids.GridSpec(4, "channel")  # per-channel symmetric 4-bit


def _mlp(seed=0, n0=12, n1=16, n2=5, m=48):
  k = jax.random.split(jax.random.key(seed), 5)
  params = {"l1": {"kernel": jax.random.normal(k[0], (n0, n1)) / np.sqrt(n0),
                   "bias": 0.1 * jax.random.normal(k[1], (n1,))},
            "l2": {"kernel": jax.random.normal(k[2], (n1, n2)) / np.sqrt(n1),
                   "bias": 0.1 * jax.random.normal(k[3], (n2,))}}
  x = jax.random.normal(k[4], (m, n0))
  return params, x


def _apply(p, x):
  h = jax.nn.relu(x @ p["l1"]["kernel"] + p["l1"]["bias"][None, :])
  return h @ p["l2"]["kernel"] + p["l2"]["bias"][None, :]


def _hidden(p, x):
  return jax.nn.relu(x @ p["l1"]["kernel"] + p["l1"]["bias"][None, :])


def _kernels(p):
  return {n: p[n]["kernel"] for n in ("l1", "l2")}


def test_gpfq_grid_equals_layer_on_own_intermediates():
  """qjax.gpfq(grid=per-channel 4-bit): layer 1 with X = X~ = x, layer 2 with the float / quantized
  hidden layers, each `gpfq_layer` with the layer's grid rounder."""
  params, x = _mlp()
  q, report = qjax.gpfq(params, _apply, x, grid=PC4, progress=False)
  W1, W2 = params["l1"]["kernel"], params["l2"]["kernel"]
  Q1 = qjax.gpfq_layer(W1, x, None, rounders.rounder(grids.fit(W1, PC4), *W1.shape))
  np.testing.assert_array_equal(q["l1"]["kernel"], Q1)
  q1_params = {**params, "l1": {**params["l1"], "kernel": Q1}}
  Q2 = qjax.gpfq_layer(W2, _hidden(params, x), _hidden(q1_params, x), grids.fit(W2, PC4))
  np.testing.assert_array_equal(q["l2"]["kernel"], Q2)
  np.testing.assert_array_equal(q["l1"]["bias"], params["l1"]["bias"])  # biases stay float
  assert [r.bits for r in report.layers] == [4, 4]
  assert report.rule is None and report.C is None
  for r, n in zip(report.layers, ("l1", "l2")):
    assert r.sparsity == pytest.approx(float(np.mean(np.asarray(q[n]["kernel"]) == 0)))
    assert r.error <= r.msq_error + 1e-6  # GPFQ beats RTN on its own calibration data here
  assert "sparse" in str(report)


@pytest.mark.parametrize("spec", [PC4, grids.GridSpec(3, "channel", symmetric=False),
                                  grids.GridSpec(2, "tensor"),
                                  grids.GridSpec(3, "group", 5, symmetric=False),
                                  grids.GridSpec(4, "channel", method="mse")])
def test_every_method_on_the_same_grid(spec):
  """GPFQ, MSQ (grid=) and qjax.quantize_rtn round onto identical levels: every Q is a fixed
  point of the fitted grid's RTN, and MSQ on the grid is exactly quantize_rtn."""
  params, x = _mlp(1, n0=13)
  q_g, _, fitted = qjax.gpfq(params, _apply, x, grid=spec, progress=False, return_grids=True)
  q_m, _ = qjax.quantize_msq(params, _apply, x, grid=spec, progress=False)
  q_r, rtn_grids = qjax.quantize_rtn(params, spec)
  for n, W in _kernels(params).items():
    grid = grids.fit(W, spec)
    np.testing.assert_array_equal(fitted[n].scale, grid.scale)
    np.testing.assert_array_equal(rtn_grids[n].scale, grid.scale)
    np.testing.assert_array_equal(grid.round(q_g[n]["kernel"]), q_g[n]["kernel"])
    np.testing.assert_array_equal(q_m[n]["kernel"], q_r[n]["kernel"])
    np.testing.assert_array_equal(q_m[n]["kernel"], grid.round(W))


def test_grid_rules_and_float_layers():
  params, x = _mlp(2)
  q, report = qjax.gpfq(params, _apply, x, grid={"l1": grids.GridSpec(3, "channel"),
                                                 "l2": None}, progress=False)
  np.testing.assert_array_equal(q["l2"]["kernel"], params["l2"]["kernel"])
  assert [r.status for r in report.layers] == ["quantized", "float"]
  assert report.layers[0].bits == 3
  g = grids.fit(params["l1"]["kernel"], grids.GridSpec(3, "channel"))
  np.testing.assert_array_equal(g.round(q["l1"]["kernel"]), q["l1"]["kernel"])
  with pytest.raises(ValueError, match="grid.*match no layer"):
    qjax.gpfq(params, _apply, x, grid={"conv": PC4, "default": PC4}, progress=False)
  with pytest.raises(TypeError, match="grid"):
    qjax.gpfq(params, _apply, x, grid={"default": 4}, progress=False)


def test_grid_bad_options():
  params, x = _mlp()
  for kwargs in (dict(bits=4), dict(C=1.0), dict(C_grid=(1.0,))):
    with pytest.raises(ValueError, match=f"{list(kwargs)[0]} must be None with grid="):
      qjax.gpfq(params, _apply, x, grid=PC4, progress=False, **kwargs)
  with pytest.raises(ValueError, match="quantizer must be one of"):
    qjax.gpfq(params, _apply, x, quantizer="nearest", progress=False)
  with pytest.raises(ValueError, match="explicit key"):
    qjax.gpfq(params, _apply, x, quantizer="stochastic", progress=False)
  with pytest.raises(ValueError, match="lambda_ >= 0"):
    qjax.gpfq(params, _apply, x, quantizer="hard_threshold", progress=False)
  with pytest.raises(ValueError, match="lambda_ is only used"):
    qjax.gpfq(params, _apply, x, lambda_=0.1, progress=False)


@pytest.mark.parametrize("grid", [None, PC4])
def test_stochastic_is_reproducible(grid):
  params, x = _mlp(3)
  kw = dict(grid=grid, quantizer="stochastic", progress=False)
  q_a, _ = qjax.gpfq(params, _apply, x, key=jax.random.key(5), **kw)
  q_b, _ = qjax.gpfq(params, _apply, x, key=jax.random.key(5), **kw)
  q_c, _ = qjax.gpfq(params, _apply, x, key=jax.random.key(6), **kw)
  q_0, _ = qjax.gpfq(params, _apply, x, key=jax.random.key(5), grid=grid, progress=False)
  for n in ("l1", "l2"):
    np.testing.assert_array_equal(q_a[n]["kernel"], q_b[n]["kernel"])
  assert any(not np.array_equal(q_a[n]["kernel"], q_c[n]["kernel"]) for n in ("l1", "l2"))
  assert any(not np.array_equal(q_a[n]["kernel"], q_0[n]["kernel"]) for n in ("l1", "l2"))
  if grid is not None:
    for n, W in _kernels(params).items():
      g = grids.fit(W, grid)
      np.testing.assert_array_equal(g.round(q_a[n]["kernel"]), q_a[n]["kernel"])
  else:  # on the layer's paper alphabet
    for n, W in _kernels(params).items():
      lv = np.asarray(alphabets.levels_for(W, 4, 1.0, "paper"))
      assert np.isin(np.asarray(q_a[n]["kernel"]), lv).all()


@pytest.mark.parametrize("quantizer", ["hard_threshold", "soft_threshold"])
@pytest.mark.parametrize("grid", [None, grids.GridSpec(3, "channel")])
def test_thresholding_raises_sparsity(quantizer, grid):
  params, x = _mlp(4)
  sparsity = []
  for lam in (0.0, 0.1, 0.3):
    _, report = qjax.gpfq(params, _apply, x, grid=grid, quantizer=quantizer, lambda_=lam,
                          progress=False)
    sparsity.append(np.mean([r.sparsity for r in report.layers]))
  assert sparsity[0] < sparsity[1] < sparsity[2], sparsity


def test_default_quantizer_unchanged():
  """quantizer='msq' with the paper's alphabet is the default path: the same Q."""
  params, x = _mlp(5)
  q_a, r_a = qjax.gpfq(params, _apply, x, bits=3, progress=False)
  q_b, _ = qjax.gpfq(params, _apply, x, bits=3, quantizer="msq", progress=False)
  for n in ("l1", "l2"):
    np.testing.assert_array_equal(q_a[n]["kernel"], q_b[n]["kernel"])
  # Each record's sparsity is the fraction of exact zeros in its quantized kernel.
  assert [r.path for r in r_a.layers] == ["l1", "l2"]
  for r in r_a.layers:
    np.testing.assert_allclose(r.sparsity, np.mean(np.asarray(q_a[r.path]["kernel"]) == 0),
                               rtol=1e-6, err_msg=r.path)


# -- gpfq_layer: quantizer choice, a Grid as levels.


def _layer_problem(seed=0, m=40, n0=18, n1=6):
  r = np.random.default_rng(seed)
  W = jnp.asarray(r.normal(size=(n0, n1)), jnp.float32)
  X = jnp.asarray(r.normal(size=(m, n0)), jnp.float32)
  return W, X


def test_layer_quantizer_matches_rounder():
  W, X = _layer_problem()
  Xt = X + 0.05 * jnp.asarray(np.random.default_rng(1).normal(size=X.shape), jnp.float32)
  lv = alphabets.levels_for(W, 3, 1.0, "paper")
  g = grids.fit(W, PC4)
  key = jax.random.key(2)
  for target in (lv, g):
    for quantizer, kw in (("msq", {}), ("stochastic", dict(key=key)),
                          ("hard_threshold", dict(lambda_=0.3)),
                          ("soft_threshold", dict(lambda_=0.3))):
      got = qjax.gpfq_layer(W, X, Xt, target, quantizer=quantizer, **kw)
      want = qjax.gpfq_layer(W, X, Xt, rounders.rounder(target, *W.shape, quantizer=quantizer,
                                                        **kw))
      np.testing.assert_array_equal(got, want)
  # msq on an alphabet stays the plain-alphabet path
  np.testing.assert_array_equal(qjax.gpfq_layer(W, X, Xt, lv, quantizer="msq"),
                                qjax.gpfq_layer(W, X, Xt, lv))


def test_layer_stochastic_unbiased_over_keys():
  """SPFQ with X = X~ and N0 = 1: q = stochastic rounding of w alone, so E[q] = w."""
  W, X = _layer_problem(3, m=8, n0=1, n1=64)
  W = jnp.clip(W, -0.9, 0.9)
  lv = jnp.linspace(-1.0, 1.0, 5)
  draws = jnp.stack([qjax.gpfq_layer(W, X, None, lv, quantizer="stochastic",
                                     key=jax.random.key(i)) for i in range(200)])
  mean = np.asarray(draws.mean(0))
  # 200 draws of a two-point variable with gap 0.5: std of the mean <= 0.25 / sqrt(200)
  np.testing.assert_allclose(mean, np.asarray(W), atol=5 * 0.25 / np.sqrt(200))


def test_layer_quantizer_errors():
  W, X = _layer_problem()
  lv = alphabets.levels_for(W, 3, 1.0, "paper")
  with pytest.raises(ValueError, match="quantizer must be one of"):
    qjax.gpfq_layer(W, X, None, lv, quantizer="round")
  with pytest.raises(ValueError, match="needs a key"):
    qjax.gpfq_layer(W, X, None, lv, quantizer="stochastic")
  with pytest.raises(ValueError, match="lambda_"):
    qjax.gpfq_layer(W, X, None, lv, quantizer="soft_threshold")
  with pytest.raises(ValueError, match="carries its own quantizer"):
    qjax.gpfq_layer(W, X, None, rounders.rounder(lv, *W.shape), quantizer="hard_threshold",
                    lambda_=0.1)
  with pytest.raises(ValueError, match="grid does not fit"):
    qjax.gpfq_layer(W, X, None, grids.fit(W[:, :3], PC4))


@pytest.mark.parametrize("quantizer", ["hard_threshold", "soft_threshold"])
def test_layer_thresholding_monotone_in_lambda(quantizer):
  """Larger lambda: more zeros in Q and a larger layer error ||XW - XQ|| / ||XW||."""
  W, X = _layer_problem(4, m=60, n0=24, n1=16)
  g = grids.fit(W, grids.GridSpec(4, "channel"))
  sparsity, error = [], []
  for lam in (0.0, 0.4, 1.0):
    Q = qjax.gpfq_layer(W, X, None, g, quantizer=quantizer, lambda_=lam)
    sparsity.append(float(jnp.mean(Q == 0)))
    error.append(qjax._gpfq.layer.relative_error(W, Q, X))
  assert sparsity[0] < sparsity[1] < sparsity[2], sparsity
  assert error[0] < error[1] < error[2], error


def test_gpfq_grids_export_round_trip():
  params, x = _mlp(6)
  q, _, fitted = qjax.gpfq(params, _apply, x, grid=PC4, return_grids=True, progress=False)
  unpacked = qjax.export.unpack(qjax.export.pack(q, fitted))
  for a, b in zip(jax.tree_util.tree_leaves(unpacked), jax.tree_util.tree_leaves(q)):
    np.testing.assert_array_equal(a, b)


def test_gpfq_grid_and_stochastic_on_a_mesh():
  """Neurons split over 'model', rows over 'data': the same Q as on one device."""
  params, x = _mlp(7)
  mesh = jax.make_mesh((2, 4), ("data", "model"), devices=jax.devices()[:8])
  for kw in (dict(grid=PC4), dict(grid=PC4, quantizer="stochastic", key=jax.random.key(3)),
             dict(bits=3, quantizer="soft_threshold", lambda_=0.05)):
    q_one, _ = qjax.gpfq(params, _apply, x, progress=False, **kw)
    q_mesh, _ = qjax.gpfq(params, _apply, x, progress=False, mesh=mesh, **kw)
    for n in ("l1", "l2"):
      np.testing.assert_array_equal(np.asarray(q_mesh[n]["kernel"]), q_one[n]["kernel"])
