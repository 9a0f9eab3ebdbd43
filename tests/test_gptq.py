"""GPTQ layer (qjax.gptq_layer) against a plain NumPy column-by-column reference."""
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import qjax
from qjax import alphabets
from qjax import grids
from qjax import _gptq

F32 = np.float32


def _np_round(w, s, z, maxq):
  """The grid rounding of qjax.grids in NumPy float32: (values, codes)."""
  w, s, z = (np.asarray(a, F32) for a in (w, s, z))
  safe = np.where(s > 0, s, F32(1))
  x = np.where(s > 0, w / safe, F32(0)).astype(F32)
  c = np.clip(np.round(x + z), 0, maxq).astype(F32)
  return (s * (c - z)).astype(F32), c


def _np_fit(rows, bits, symmetric):
  """Min-max (or max|w|) grid of one group, NumPy float32 (mirrors qjax.grids)."""
  rows = np.asarray(rows, F32)
  lo, hi = np.minimum(rows.min(0), F32(0)), np.maximum(rows.max(0), F32(0))
  maxq = 2**bits - 1
  if symmetric:
    a = np.maximum(-lo, hi)
    if bits == 1:
      return F32(2) * a, np.full_like(a, 0.5)
    return a * F32(1 / (2 ** (bits - 1) - 1)), np.full_like(a, 2 ** (bits - 1))
  s = (hi - lo) * F32(1 / maxq)
  z = np.where(s > 0, np.clip(np.round(-lo / np.where(s > 0, s, F32(1))), 0, maxq), 0)
  return s, z.astype(F32)


def gptq_reference(W, H, *, grid=None, levels=None, spec=None, damp=0.01, act_order=False,
                   static_groups=False):
  """GPTQ column by column (no lazy blocks), float64 updates, float32 rounding.

  Exactly one of: grid (fixed scales), levels (nearest level), spec (min-max grid fitted from W;
  groups refitted at their first input from the updated weights unless static_groups).
  Returns (Q, codes or None).
  """
  W = np.array(W, np.float64)
  H = np.array(H, np.float64)
  N0, N1 = W.shape
  dead = np.diag(H) == 0
  H[dead, dead] = 1.0
  W[dead] = 0.0
  g = None
  if spec is not None:
    g = spec.group_size
    maxq = spec.maxq
    if g is None:
      s, z = _np_fit(W.astype(F32), spec.bits, spec.symmetric)
      scale, zero = s[None], z[None]
    else:
      G = -(-N0 // g)
      scale, zero = np.zeros((G, N1), F32), np.zeros((G, N1), F32)
      if static_groups:
        for k in range(G):
          scale[k], zero[k] = _np_fit(W[k * g:(k + 1) * g].astype(F32), spec.bits, spec.symmetric)
  elif grid is not None:
    scale, zero, maxq, g = np.asarray(grid.scale), np.asarray(grid.zero), grid.maxq, grid.group_size
  perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(N0)
  W, H = W[perm], H[perm][:, perm]
  H += damp * np.mean(np.diag(H)) * np.eye(N0)
  U = np.linalg.cholesky(np.linalg.inv(H)).T  # H^-1 = U^T U
  Q = np.zeros((N0, N1), F32)
  C = np.zeros((N0, N1), F32)
  for p in range(N0):
    t = perm[p]
    if spec is not None and g is not None and not static_groups and t % g == 0:
      scale[t // g], zero[t // g] = _np_fit(W[p:p + g].astype(F32), spec.bits, spec.symmetric)
    w = W[p].astype(F32)
    if levels is not None:
      lv = np.asarray(levels, F32)
      q = lv[np.argmin(np.abs(w[:, None] - lv[None, :]), axis=1)]
    else:
      k = 0 if g is None else t // g
      q, C[t] = _np_round(w, scale[k], zero[k], maxq)
    Q[t] = q
    err = (W[p] - q.astype(np.float64)) / U[p, p]
    W[p:] -= U[p, p:, None] * err[None, :]
  return Q, (None if levels is not None else C)


def _problem(seed, N0=53, N1=7, m=400, cond=1.0):
  k = jax.random.split(jax.random.key(seed), 3)
  W = np.asarray(jax.random.normal(k[0], (N0, N1), jnp.float32))
  X = np.asarray(jax.random.normal(k[1], (m, N0), jnp.float32))
  X = X + cond * np.asarray(jax.random.normal(k[2], (m, 1), jnp.float32))  # correlated inputs
  X = X * np.linspace(0.5, 2.0, N0, dtype=F32)[None, :]  # distinct diag(H) for act-order
  return W, X, (X.T @ X).astype(F32)


class GptqReferenceTest(parameterized.TestCase):

  @parameterized.product(
      kind=("channel_sym", "channel_asym", "tensor_mse", "group_static", "levels"),
      act_order=(False, True))
  def test_matches_numpy_bit_for_bit(self, kind, act_order):
    W, X, H = _problem(1)
    kw = dict(act_order=act_order, block_size=16)  # N0 = 53: a short last block
    if kind == "channel_sym":
      spec = grids.GridSpec(4, symmetric=True)
      Q, grid = qjax.gptq_layer(W, H, spec, return_grid=True, **kw)
      Qr, Cr = gptq_reference(W, H, spec=spec, act_order=act_order)
    elif kind == "channel_asym":
      spec = grids.GridSpec(3, symmetric=False)
      Q, grid = qjax.gptq_layer(W, H, spec, return_grid=True, **kw)
      Qr, Cr = gptq_reference(W, H, spec=spec, act_order=act_order)
    elif kind == "tensor_mse":
      grid = grids.fit(W, bits=4, granularity="tensor", method="mse")
      Q = qjax.gptq_layer(W, H, grid, **kw)
      Qr, Cr = gptq_reference(W, H, grid=grid, act_order=act_order)
    elif kind == "group_static":
      spec = grids.GridSpec(4, "group", 8, symmetric=False)  # 53 = 6 * 8 + 5
      Q, grid = qjax.gptq_layer(W, H, spec, static_groups=True, return_grid=True, **kw)
      Qr, Cr = gptq_reference(W, H, spec=spec, act_order=act_order, static_groups=True)
      np.testing.assert_array_equal(grid.scale, grids.fit(W, spec).scale)
    else:
      levels = alphabets.levels_for(W, 3, 1.0)
      Q, grid = qjax.gptq_layer(W, H, levels, return_grid=True, **kw)
      Qr, Cr = gptq_reference(W, H, levels=levels, act_order=act_order)
      assert grid is None
    chex.assert_type(Q, jnp.float32)
    np.testing.assert_array_equal(Q, Qr)
    if Cr is not None:
      np.testing.assert_array_equal(grid.codes(Q), Cr)

  @parameterized.parameters((8, 16), (8, 5), (24, 16), (53, 16), (100, 16))
  def test_dynamic_groups_match_numpy(self, group, block):
    W, X, H = _problem(2)
    spec = grids.GridSpec(3, "group", group, symmetric=False)
    Q, grid = qjax.gptq_layer(W, H, spec, block_size=block, return_grid=True)
    Qr, Cr = gptq_reference(W, H, spec=spec)
    # Same codes; the scales are min-max of the updated float weights, whose last bits depend on
    # the order of the float32 sums (lazy blocks here, one row at a time in the reference).
    np.testing.assert_array_equal(grid.codes(Q), Cr)
    np.testing.assert_allclose(Q, Qr, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(grid.round(Q), Q)  # Q lies on the grid it returns
    Q2 = qjax.gptq_layer(W, H, spec, block_size=64)
    np.testing.assert_array_equal(grid.codes(Q2), Cr)  # independent of the block size

  def test_dead_inputs(self):
    W, X, H = _problem(3, N0=20, N1=4)
    X[:, [2, 11]] = 0.0
    H = X.T @ X
    spec = grids.GridSpec(4, symmetric=False)
    Q = qjax.gptq_layer(W, H, spec)
    np.testing.assert_array_equal(np.asarray(Q)[[2, 11]], 0.0)
    np.testing.assert_array_equal(Q, gptq_reference(W, H, spec=spec)[0])


class GptqPropertyTest(chex.TestCase):

  @parameterized.parameters(*[(seed, spec) for seed in range(3) for spec in (
      grids.GridSpec(2), grids.GridSpec(3, symmetric=False), grids.GridSpec(4, "group", 16))])
  def test_error_never_exceeds_rtn_on_the_same_grid(self, seed, spec):
    W, X, H = _problem(10 + seed, N0=64, N1=16, m=1024, cond=0.3)
    grid = grids.fit(W, spec)
    Q = qjax.gptq_layer(W, H, grid, damp=1e-4)
    err = np.linalg.norm(X @ (W - np.asarray(Q)))
    rtn = np.linalg.norm(X @ (W - np.asarray(grid.round(W))))
    assert err <= rtn * (1 + 1e-4), (err, rtn)
    assert err < rtn

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_and_eager_agree(self):
    W, X, H = _problem(4, N0=40, N1=6)
    spec = grids.GridSpec(4, "group", 16)
    fn = self.variant(lambda w, h: qjax.gptq_layer(w, h, spec, block_size=16))
    np.testing.assert_array_equal(fn(W, H), qjax.gptq_layer(W, H, spec, block_size=16))

  def test_short_and_tiny_layers(self):
    for N0 in (1, 2, 17, 129):
      W, X, H = _problem(5, N0=N0, N1=3)
      spec = grids.GridSpec(4, symmetric=False)
      np.testing.assert_array_equal(qjax.gptq_layer(W, H, spec),
                                    gptq_reference(W, H, spec=spec)[0])

  def test_bad_input(self):
    W, X, H = _problem(6, N0=16, N1=3)
    spec = grids.GridSpec(4)
    with pytest.raises(ValueError, match="W must be a non-empty 2-D"):
      qjax.gptq_layer(W[0], H, spec)
    with pytest.raises(ValueError, match=r"H must have shape \(N0, N0\)"):
      qjax.gptq_layer(W, H[:8], spec)
    with pytest.raises(ValueError, match="W contains NaN"):
      qjax.gptq_layer(np.where(W > 1, np.nan, W), H, spec)
    with pytest.raises(ValueError, match="H contains NaN"):
      qjax.gptq_layer(W, H * np.inf, spec)
    with pytest.raises(ValueError, match="block_size"):
      qjax.gptq_layer(W, H, spec, block_size=0)
    with pytest.raises(ValueError, match="damp"):
      qjax.gptq_layer(W, H, spec, damp=-0.1)
    with pytest.raises(ValueError, match="static_groups"):
      qjax.gptq_layer(W, H, grids.GridSpec(4, "group", 4), act_order=True)
    with pytest.raises(ValueError, match="does not fit W"):
      qjax.gptq_layer(W, H, grids.fit(W[:, :2], spec))
    with pytest.raises(ValueError, match="does not fit W"):
      qjax.gptq_layer(W, H, grids.fit(W[:5], bits=4, granularity="group", group_size=4))
    with pytest.raises(ValueError, match="grid.scale contains NaN"):
      g = grids.fit(W, spec)
      qjax.gptq_layer(W, H, g.replace(scale=g.scale * np.nan))
    with pytest.raises(TypeError, match="grid must be"):
      qjax.gptq_layer(W, H, np.ones((2, 2)))
    with pytest.raises(ValueError, match="alphabet"):
      qjax.gptq_layer(W, H, np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="positive definite"):
      qjax.gptq_layer(W, -H, spec, damp=0.0)


def test_program_size_is_flat_in_N0():
  """The column loop is a scan, not unrolled (qwix unrolls: a 20-minute compile at N0 = 4608):
  the lowered program grows like log N0 (the triangular inverse halves recursively), where an
  unrolled column loop would grow 9x from N0 = 512 to 4608. (Compile seconds are a benchmark
  figure: benchmarks/gptq_layer.py, 1.7-3.2 s on its four shapes.)"""
  spec = grids.GridSpec(4, "group", 128)

  def program_size(N0, N1=64):
    args = (jnp.zeros((N0, N1)), jnp.eye(N0), jnp.zeros((N0 // 128, N1)),
            jnp.zeros((N0 // 128, N1)), jnp.zeros(N0, jnp.int32), jnp.zeros(1),
            jnp.float32(0.01))
    text = _gptq._gptq.lower(*args, mode="spec", spec=spec, maxq=15, block_size=128,
                             act_order=True, dynamic=False).as_text()
    return len(re.sub(r"\d+", "", text))  # shapes aside, the same ops

  small, large = program_size(512), program_size(4608)
  assert large < 3 * small, (small, large)


# --------------------------------------------------------------------------------------------
# qjax.gptq on the one-pass driver.


def _mlp(params, x):
  h = jax.nn.relu(x @ params["w1"] + params["b1"][None, :])
  return h @ params["w2"]


def test_gptq_network_plain_mlp_matches_layer_calls():
  k = jax.random.split(jax.random.key(7), 4)
  params = {"w1": jax.random.normal(k[0], (12, 20)) / 3, "b1": 0.1 * jax.random.normal(k[1], (20,)),
            "w2": jax.random.normal(k[2], (20, 5)) / 4}
  x = jax.random.normal(k[3], (64, 12))
  q, report, fitted = qjax.gptq(params, _mlp, x, bits=3, granularity="group", group_size=8,
                                progress=False, return_grids=True)
  assert [r.path for r in report.layers] == ["w1", "w2"]
  assert all(r.status == "quantized" for r in report.layers)
  Q1 = qjax.gptq_layer(params["w1"], x.T @ x, grids.GridSpec(3, "group", 8, symmetric=False))
  # Dynamic group scales are min-max of updated weights: H summed in another order moves their
  # last bits, the codes agree.
  np.testing.assert_allclose(q["w1"], Q1, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(fitted["w1"].codes(q["w1"]), fitted["w1"].codes(Q1))
  xt = jax.nn.relu(x @ Q1 + params["b1"][None, :])  # the quantized stream's input to w2
  Q2 = qjax.gptq_layer(params["w2"], xt.T @ xt, grids.GridSpec(3, "group", 8, symmetric=False))
  np.testing.assert_allclose(q["w2"], Q2, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(q["b1"], params["b1"])
  for name in ("w1", "w2"):
    np.testing.assert_array_equal(fitted[name].round(q[name]), q[name])
  for r in report.layers:
    assert r.error <= r.msq_error * (1 + 1e-4)


@pytest.mark.slow
def test_gptq_network_lenet5_export_round_trip():
  from qjax import export
  from qjax import models
  model = models.LeNet5()
  x = jax.random.normal(jax.random.key(0), (32, 28, 28, 1))
  variables = model.init(jax.random.key(1), x[:1])
  q, report, fitted = qjax.gptq(variables, model.apply, x, bits={"Dense_1": 8, "default": 4},
                                act_order=True, progress=False, return_grids=True)
  assert [r.path for r in report.layers] == ["Conv_0", "Conv_1", "Dense_0", "Dense_1"]
  assert [r.bits for r in report.layers] == [4, 4, 4, 8]
  for r in report.layers:
    assert r.status == "quantized" and r.error <= r.msq_error * 1.05, r
  # Per-channel grids do not depend on the row order: they export the HWIO kernels directly.
  packed = export.pack(q, fitted)  # names: qjax.rules.path_name, as the driver reports them
  jax.tree.map(np.testing.assert_array_equal, export.unpack(packed), q)
