"""Qronos (qjax.qronos_layer) against a plain NumPy float64 transcription of the paper's steps."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import qjax
from qjax import alphabets
from qjax import grids

from test_gptq import _np_fit, _np_round

F32 = np.float32


def qronos_reference(W, X, Xt, spec=None, levels=None, *, damp=0.01, damp_rule="mean",
                     act_order=False):
  """The three steps of the issue / paper, column by column in float64 (rounding in float32):
  step 1 from the data matrices themselves (not the Grams), step 2 with an explicit inverse,
  step 3 GPTQ's unblocked update with U = chol((H[>0,>0] + lambda I)^-1)^T."""
  W = np.array(W, np.float64)
  X, Xt = np.asarray(X, np.float64), np.asarray(Xt, np.float64)
  N0, N1 = W.shape
  H = Xt.T @ Xt
  dead = np.diag(H) == 0
  H[dead, dead] = 1.0
  W[dead] = 0.0
  if spec is not None:
    g = spec.group_size or N0
    G_n = -(-N0 // g)
    scale, zero = np.zeros((G_n, N1), F32), np.zeros((G_n, N1), F32)
    for k in range(G_n):
      scale[k], zero[k] = _np_fit(W[k * g:(k + 1) * g].astype(F32), spec.bits, spec.symmetric)

  def rnd(w, t):
    if levels is not None:
      lv = np.asarray(levels, F32)
      return lv[np.argmin(np.abs(w.astype(F32)[:, None] - lv[None, :]), axis=1)]
    k = t // (spec.group_size or N0)
    return _np_round(w.astype(F32), scale[k], zero[k], spec.maxq)[0]

  perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(N0)
  Wp, Xp, Xtp, Hp = W[perm], X[:, perm], Xt[:, perm], H[perm][:, perm]
  lam = damp * (np.mean(np.diag(Hp)) if damp_rule == "mean" else np.linalg.eigvalsh(Hp)[-1])
  Q = np.zeros((N0, N1), F32)
  # Step 1: q_0 = Q(<X~_0, X w - X~_{>0} w_{>0}> / ||X~_0||^2).
  x0 = Xtp[:, 0]
  q0 = rnd(x0 @ (Xp @ Wp - Xtp[:, 1:] @ Wp[1:]) / Hp[0, 0], perm[0])
  Q[perm[0]] = q0
  if N0 > 1:
    # Step 2: v_{>0} = (H_{>0,>0} + lambda I)^-1 (X~_{>0}^T X w + lambda w_{>0} - H_{>0,0} q_0).
    Hs = Hp[1:, 1:] + lam * np.eye(N0 - 1)
    Hs_inv = np.linalg.inv(Hs)
    V = Hs_inv @ (Xtp[:, 1:].T @ (Xp @ Wp) + lam * Wp[1:] - Hp[1:, :1] * q0[None].astype(
        np.float64))
    # Step 3: GPTQ on V.
    U = np.linalg.cholesky(Hs_inv).T
    for p in range(N0 - 1):
      q = rnd(V[p], perm[p + 1])
      Q[perm[p + 1]] = q
      err = (V[p] - q.astype(np.float64)) / U[p, p]
      V[p:] -= U[p, p:, None] * err[None, :]
  return Q


def _problem(seed, N0=45, N1=6, m=300, noise=0.3):
  k = jax.random.split(jax.random.key(seed), 4)
  W = np.asarray(jax.random.normal(k[0], (N0, N1), jnp.float32))
  X = np.asarray(jax.random.normal(k[1], (m, N0), jnp.float32))
  X = X + 0.5 * np.asarray(jax.random.normal(k[2], (m, 1), jnp.float32))  # correlated inputs
  X = (X * np.linspace(0.5, 2.0, N0, dtype=F32)[None, :]).astype(F32)  # distinct diag(H)
  Xt = (X + noise * np.asarray(jax.random.normal(k[3], (m, N0), jnp.float32))).astype(F32)
  return W, X, Xt


def _assert_equal_up_to_ties(Q, Qr, frac=0.0):
  """Q and Qr equal, but for at most `frac` of the entries (float32 vs float64 near ties)."""
  diff = np.mean(np.asarray(Q) != np.asarray(Qr))
  assert diff <= frac, f"{diff:.4f} of the entries differ"


class QronosReferenceTest(parameterized.TestCase):

  @parameterized.product(kind=("channel_sym", "channel_asym", "group", "levels"),
                         act_order=(False, True), damp=(0.01, 0.3))
  def test_matches_numpy(self, kind, act_order, damp):
    W, X, Xt = _problem(1)
    spec = levels = None
    if kind == "channel_sym":
      spec = grids.GridSpec(4, symmetric=True)
    elif kind == "channel_asym":
      spec = grids.GridSpec(3, symmetric=False)
    elif kind == "group":
      spec = grids.GridSpec(4, "group", 8, symmetric=False)  # 45 = 5 * 8 + 5
    else:
      levels = alphabets.levels_for(W, 3, 1.0)
    Q = qjax.qronos_layer(W, X, Xt, spec if levels is None else levels, damp=damp,
                          act_order=act_order, block_size=16)
    Qr = qronos_reference(W, X, Xt, spec, levels, damp=damp, act_order=act_order)
    _assert_equal_up_to_ties(Q, Qr, frac=2 / Q.size)  # at most 2 entries near a tie

  def test_max_eig_damping_and_streams(self):
    W, X, Xt = _problem(2)
    spec = grids.GridSpec(4, symmetric=True)
    Q = qjax.qronos_layer(W, X, Xt, spec, damp=1e-3, damp_rule="max_eig")
    _assert_equal_up_to_ties(
        Q, qronos_reference(W, X, Xt, spec, damp=1e-3, damp_rule="max_eig"), frac=2 / Q.size)
    chunks = [(X[i:i + 100], Xt[i:i + 100]) for i in range(0, X.shape[0], 100)]
    Qs = qjax.qronos_layer(W, chunks, None, spec, damp=1e-3, damp_rule="max_eig")
    _assert_equal_up_to_ties(Qs, Q, frac=2 / Q.size)

  @parameterized.product(act_order=(False, True),
                         kind=("channel", "group_static", "levels"))
  def test_equals_gptq_when_x_tilde_is_x(self, act_order, kind):
    W, X, _ = _problem(3)
    H = X.T @ X
    if kind == "channel":
      target, kw = grids.GridSpec(4, symmetric=False), {}
    elif kind == "group_static":
      target, kw = grids.GridSpec(4, "group", 8), dict(static_groups=True)
    else:
      target, kw = alphabets.levels_for(W, 3, 1.0), {}
    Q = qjax.qronos_layer(W, X, X, target, damp=0.05, act_order=act_order, block_size=16)
    Qg = qjax.gptq_layer(W, H, target, damp=0.05, act_order=act_order, block_size=16, **kw)
    _assert_equal_up_to_ties(Q, Qg, frac=2 / Q.size)

  def test_dead_inputs_and_tiny_layers(self):
    W, X, Xt = _problem(4, N0=20, N1=4)
    Xt[:, [0, 7]] = 0.0  # input 0 dead: step 1 rounds 0
    spec = grids.GridSpec(4, symmetric=False)
    Q = qjax.qronos_layer(W, X, Xt, spec)
    np.testing.assert_array_equal(np.asarray(Q)[[0, 7]], 0.0)
    _assert_equal_up_to_ties(Q, qronos_reference(W, X, Xt, spec), frac=1 / Q.size)
    for N0 in (1, 2, 17):
      W, X, Xt = _problem(5, N0=N0, N1=3)
      _assert_equal_up_to_ties(qjax.qronos_layer(W, X, Xt, spec),
                               qronos_reference(W, X, Xt, spec))

  def test_mismatch_objective_beats_gptq_and_rtn(self):
    """On a mismatched problem Qronos' error ||X W - X~ Q|| is below GPTQ's (which fits X~ W)
    and RTN's on the same grid."""
    W, X, Xt = _problem(6, N0=64, N1=16, m=1024, noise=0.5)
    grid = grids.fit(W, grids.GridSpec(3, symmetric=True))
    err = lambda Q: np.linalg.norm(X @ W - Xt @ np.asarray(Q))  # noqa: E731
    e_q = err(qjax.qronos_layer(W, X, Xt, grid, damp=0.01))
    e_g = err(qjax.gptq_layer(W, Xt.T @ Xt, grid, damp=0.01))
    e_r = err(grid.round(W))
    assert e_q < e_g < e_r, (e_q, e_g, e_r)

  def test_bad_input(self):
    W, X, Xt = _problem(7, N0=16, N1=3)
    spec = grids.GridSpec(4)
    for damp in (0.0, -0.1, float("nan"), float("inf")):
      with pytest.raises(ValueError, match="damp must be finite and > 0"):
        qjax.qronos_layer(W, X, Xt, spec, damp=damp)
    with pytest.raises(ValueError, match="damp_rule"):
      qjax.qronos_layer(W, X, Xt, spec, damp_rule="max")
    with pytest.raises(ValueError, match="layer 'fc1'.*same shape"):
      qjax.qronos_layer(W, X, Xt[:-1], spec, layer="fc1")
    with pytest.raises(ValueError, match=r"X_tilde must have shape \(m, N0=16\)"):
      qjax.qronos_layer(W, X, Xt[:, :8], spec)
    with pytest.raises(ValueError, match="W must be a non-empty 2-D"):
      qjax.qronos_layer(W[0], X, Xt, spec)
    with pytest.raises(ValueError, match="block_size"):
      qjax.qronos_layer(W, X, Xt, spec, block_size=0)
    with pytest.raises(TypeError, match="grid must be"):
      qjax.qronos_layer(W, X, Xt, np.ones((2, 2)))
    # A rank-deficient X~ with a damping too small for float32: the Cholesky fails.
    low = np.repeat(Xt[:, :1], 16, axis=1)
    with pytest.raises(ValueError, match="layer 'fc1'.*Cholesky.*raise damp or use more "
                                         "calibration data"):
      qjax.qronos_layer(W, X, low, spec, damp=1e-30, layer="fc1")


def _mlp(p, x):
  return jax.nn.relu(x @ p["w1"] + p["b1"][None, :]) @ p["w2"]


def _mlp_problem():
  k = jax.random.split(jax.random.key(7), 4)
  params = {"w1": jax.random.normal(k[0], (12, 20)) / 3, "b1": 0.1 * jax.random.normal(k[1], (20,)),
            "w2": jax.random.normal(k[2], (20, 5)) / 4}
  return params, jax.random.normal(k[3], (64, 12))


def test_qronos_network_plain_mlp_matches_layer_calls():
  params, x = _mlp_problem()
  spec = grids.GridSpec(3, "group", 8, symmetric=False)
  q, report, fitted = qjax.qronos(params, _mlp, x, bits=3, granularity="group", group_size=8,
                                  act_order=True, damp=0.05, progress=False, return_grids=True)
  assert [r.path for r in report.layers] == ["w1", "w2"] and report.damp == 0.05
  assert "QRONOS" in str(report) and "damp=0.05" in str(report)
  # Layer 1 sees X~ = X (GPTQ); layer 2 the float and the quantized streams' inputs.
  Q1 = qjax.qronos_layer(params["w1"], x, x, spec, act_order=True, damp=0.05)
  np.testing.assert_allclose(q["w1"], Q1, rtol=0, atol=1e-6)
  h, ht = (jax.nn.relu(x @ w + params["b1"][None, :]) for w in (params["w1"], Q1))
  Q2 = qjax.qronos_layer(params["w2"], h, ht, spec, act_order=True, damp=0.05)
  np.testing.assert_allclose(q["w2"], Q2, rtol=0, atol=1e-6)
  for name in ("w1", "w2"):
    np.testing.assert_array_equal(fitted[name].round(q[name]), q[name])
  packed = qjax.export.pack(q, fitted)  # integer export of the grids Qronos rounded onto
  jax.tree.map(np.testing.assert_array_equal, qjax.export.unpack(packed), q)


def test_qronos_damp_search_on_holdout():
  params, x = _mlp_problem()
  q, report = qjax.qronos(params, _mlp, x, bits=3, damp_grid=(1e-3, 0.1, 1.0),
                          holdout_fraction=0.25, progress=False)
  damps, losses = zip(*report.C_search)
  assert damps == (1e-3, 0.1, 1.0) and report.damp == damps[int(np.argmin(losses))]
  assert "damp search (held-out loss)" in str(report)
  q_best, _ = qjax.qronos(params, _mlp, x[:48], bits=3, damp=report.damp, progress=False)
  jax.tree.map(np.testing.assert_array_equal, q, q_best)  # fitted on the first 48 rows only
  with pytest.raises(ValueError, match="damp must be finite and > 0"):
    qjax.qronos(params, _mlp, x, damp_grid=(0.1, 0.0), progress=False)
  with pytest.raises(ValueError, match="damp must be finite and > 0"):
    qjax.qronos(params, _mlp, x, damp=float("nan"), progress=False)
