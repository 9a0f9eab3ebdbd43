"""Uniform integer grids (qjax.grids): fits, rounding onto the grid, codes, rounders, errors."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from qjax import grids


def _kernel(seed=0, shape=(37, 5)):
  k1, k2 = jax.random.split(jax.random.key(seed))
  # Columns with different ranges and a positive shift, so min-max differs from max|w|.
  cols = (1,) * (len(shape) - 1) + (shape[-1],)
  return (jax.random.normal(k1, shape, jnp.float32) * jnp.linspace(0.1, 2.0, shape[-1]).reshape(cols)
          + 0.3 * jax.random.uniform(k2, cols))


def _np_fit(M, bits, symmetric):
  """Min-max / max|w| scale and zero of one group (rows of M), NumPy float32."""
  M = np.asarray(M, np.float32)
  lo = np.minimum(M.min(0), np.float32(0))
  hi = np.maximum(M.max(0), np.float32(0))
  maxq = 2**bits - 1
  if symmetric:
    a = np.maximum(-lo, hi)
    if bits == 1:
      return np.float32(2) * a, np.full_like(a, 0.5)
    return a * np.float32(1 / (2 ** (bits - 1) - 1)), np.full_like(a, 2 ** (bits - 1))
  scale = (hi - lo) * np.float32(1 / maxq)
  safe = np.where(scale > 0, scale, np.float32(1))
  zero = np.where(scale > 0, np.clip(np.round(-lo / safe), 0, maxq), 0).astype(np.float32)
  return scale, zero


GRANULARITIES = (("tensor", None), ("channel", None), ("group", 8), ("group", 37),
                 ("group", 50))


class GridTest(parameterized.TestCase):

  @parameterized.parameters(
      *[dict(gran=gran, symmetric=sym, bits=bits, method="max")
        for gran in GRANULARITIES for sym in (True, False) for bits in (1, 3, 8)],
      *[dict(gran=gran, symmetric=sym, bits=4, method="mse")
        for gran in (("tensor", None), ("group", 8)) for sym in (True, False)])
  def test_rounded_weights_lie_on_their_grid(self, gran, symmetric, bits, method):
    granularity, g = gran
    W = _kernel(bits)  # N0 = 37: g = 8 leaves a short last group of 5 rows
    spec = grids.GridSpec(bits, granularity, g, symmetric=symmetric, method=method)
    grid = grids.fit(W, spec)
    G = 1 if g is None else -(-37 // g)
    chex.assert_shape((grid.scale, grid.zero), (G, 5))
    chex.assert_type((grid.scale, grid.zero), jnp.float32)
    R = np.asarray(grid.round(W))
    levels = np.asarray(grid.levels())  # (G, N1, 2^b)
    chex.assert_shape(levels, (G, 5, 2**bits))
    group = grid.group_index(37)
    for t in range(37):
      for j in range(5):
        assert R[t, j] in levels[group[t], j], (t, j, R[t, j])
    # Nearest level: no level of its grid is closer to w than the rounded value.
    dist = np.abs(np.asarray(W)[:, :, None] - levels[group])
    np.testing.assert_allclose(np.abs(np.asarray(W) - R), dist.min(-1), rtol=0, atol=1e-6)
    codes = np.asarray(grid.codes(W))
    assert codes.dtype == np.int32 and codes.min() >= 0 and codes.max() <= 2**bits - 1
    np.testing.assert_array_equal(grid.dequant(codes), R)
    if granularity == "tensor":
      assert np.all(np.asarray(grid.scale) == np.asarray(grid.scale)[0, 0])
    if not (symmetric and bits == 1):
      assert np.all(np.any(levels == 0, axis=-1))  # 0 is a level of every grid

  @parameterized.product(symmetric=(True, False), bits=(1, 2, 4, 8))
  def test_max_fit_matches_numpy_per_group(self, symmetric, bits):
    W = np.asarray(_kernel(3, (29, 4)))
    grid = grids.fit(W, bits=bits, granularity="group", group_size=6, symmetric=symmetric)
    for k, start in enumerate(range(0, 29, 6)):  # the last group has 5 rows
      s, z = _np_fit(W[start:start + 6], bits, symmetric)
      np.testing.assert_array_equal(grid.scale[k], s)
      np.testing.assert_array_equal(grid.zero[k], z)
    if symmetric and bits > 1:  # +-max|w| are levels (up to the rounding of scale * k)
      a = np.abs(W[:6]).max(0)
      np.testing.assert_allclose(grid.scale[0] * (2 ** (bits - 1) - 1), a, rtol=1e-6)

  @parameterized.parameters(2, 3, 4)
  def test_mse_search_never_worse_than_max(self, bits):
    W = _kernel(4, (64, 6)).at[3, 2].set(6.0)  # an outlier makes clipping pay off
    err = lambda g: np.sum(np.abs(np.asarray(g.round(W) - W)) ** 2.4, axis=0)
    e_max = err(grids.fit(W, bits=bits, method="max"))
    e_mse = err(grids.fit(W, bits=bits, method="mse"))
    assert np.all(e_mse <= e_max * (1 + 1e-6))
    if bits >= 3:
      assert e_mse[2] < e_max[2]

  def test_conv_kernel_via_its_matrix(self):
    K = _kernel(5, (3, 3, 4, 6))
    grid = grids.fit(K, bits=4, granularity="group", group_size=8, symmetric=False)
    chex.assert_shape(grid.scale, (-(-36 // 8), 6))
    R = grid.round(K)
    chex.assert_shape(R, K.shape)
    np.testing.assert_array_equal(R.reshape(36, 6), grid.round(K.reshape(36, 6)))

  def test_all_zero_group_rounds_to_zero(self):
    W = jnp.zeros((10, 3)).at[:, 1].set(1.0)
    for symmetric in (True, False):
      for bits in (1, 4):
        grid = grids.fit(W, bits=bits, symmetric=symmetric)
        np.testing.assert_array_equal(grid.round(W)[:, 0], 0.0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_grid_is_a_pytree_under_jit(self):
    W = _kernel(6)
    grid = grids.fit(W, bits=3, granularity="group", group_size=8)
    np.testing.assert_array_equal(self.variant(lambda g, w: g.round(w))(grid, W), grid.round(W))
    fitted = self.variant(lambda w: grids.fit(w, grids.GridSpec(3, "group", 8)).scale)(W)
    np.testing.assert_array_equal(fitted, grid.scale)

  def test_rounder_rounds_row_t_on_its_group(self):
    W = _kernel(7)
    grid = grids.fit(W, bits=3, granularity="group", group_size=8, symmetric=False)
    rounder = grid.rounder(37)
    np.testing.assert_array_equal(rounder.round(W), grid.round(W))
    rows = jax.vmap(rounder.round_row)(W, jnp.arange(37))
    np.testing.assert_array_equal(rows, grid.round(W))

  def test_errors_name_the_argument(self):
    W = _kernel()
    for bits in (0, 9):
      with pytest.raises(ValueError, match="bits must be in 1..8"):
        grids.GridSpec(bits)
    with pytest.raises(TypeError, match="bits"):
      grids.GridSpec(4.0)
    for g in (0, -3):
      with pytest.raises(ValueError, match="group_size"):
        grids.GridSpec(4, "group", g)
    with pytest.raises(ValueError, match="group_size"):
      grids.GridSpec(4, "group")
    with pytest.raises(ValueError, match="group_size"):
      grids.GridSpec(4, "channel", 8)
    with pytest.raises(ValueError, match="granularity"):
      grids.GridSpec(4, "row")
    with pytest.raises(ValueError, match="method"):
      grids.GridSpec(4, method="l1")
    with pytest.raises(ValueError, match="NaN"):
      grids.fit(W.at[0, 0].set(jnp.nan), bits=4)
    grid = grids.fit(W, bits=4, granularity="group", group_size=8)  # 5 groups for N0 = 37
    with pytest.raises(ValueError, match="does not fit W.*needs 2 groups"):
      grid.round(W[:16])
    with pytest.raises(ValueError, match="does not fit W.*N1 = 4"):
      grid.round(W[:, :4])
    with pytest.raises(ValueError, match="does not fit codes"):
      grid.dequant(jnp.zeros((37, 6), jnp.int32))
    with pytest.raises(ValueError, match="scale contains NaN"):
      grids.make(jnp.full((1, 5), jnp.nan), jnp.zeros((1, 5)), bits=4)
    with pytest.raises(ValueError, match="scale must be >= 0"):
      grids.make(-jnp.ones((1, 5)), jnp.zeros((1, 5)), bits=4)
    with pytest.raises(ValueError, match="zero must have the shape"):
      grids.make(jnp.ones((1, 5)), jnp.zeros((2, 5)), bits=4)
    with pytest.raises(ValueError, match="bits"):
      grids.make(jnp.ones((1, 5)), jnp.zeros((1, 5)), bits=12)
    with pytest.raises(ValueError, match="group_size"):
      grids.make(jnp.ones((2, 5)), jnp.zeros((2, 5)), bits=4, group_size=0)
    with pytest.raises(ValueError, match="does not fit N0=20"):
      grids.GridSpec(4, "group", 8).fit(W).rounder(20)


def _gpfq_reference(W, X, Xt, levels_of_row):
  """GPFQ (paper Eq. 7-8) one row at a time in float64; levels_of_row(t) -> (N1, L) levels."""
  W, X, Xt = (np.asarray(a, np.float64) for a in (W, X, Xt))
  U = np.zeros((X.shape[0], W.shape[1]))
  Q = np.zeros(W.shape, np.float32)
  for t in range(W.shape[0]):
    x, xt = X[:, t], Xt[:, t]
    nrm = xt @ xt
    arg = (xt @ U + W[t] * (xt @ x)) / nrm if nrm > 0 else np.zeros(W.shape[1])
    lv = np.asarray(levels_of_row(t), np.float64)
    Q[t] = lv[np.arange(W.shape[1]), np.argmin(np.abs(arg[:, None] - lv), axis=1)]
    U += np.outer(x, W[t]) - np.outer(xt, Q[t].astype(np.float64))
  return Q


def _gpfq_problem(seed, N0=45, N1=6, m=120):
  k = jax.random.split(jax.random.key(seed), 3)
  W = _kernel(seed, (N0, N1))
  X = jax.nn.relu(jax.random.normal(k[1], (m, N0)))
  Xt = X + 0.05 * jax.random.normal(k[2], (m, N0))
  return W, X, Xt


class GpfqOnGridsTest(parameterized.TestCase):

  @parameterized.product(gran=(("channel", None), ("group", 8)), symmetric=(True, False),
                         method=("scan", "gram"))
  def test_gpfq_on_grid_matches_numpy_loop_with_per_neuron_levels(self, gran, symmetric,
                                                                  method):
    import qjax
    W, X, Xt = _gpfq_problem(1)
    grid = grids.fit(W, bits=3, granularity=gran[0], group_size=gran[1], symmetric=symmetric)
    Q = qjax.gpfq_layer(W, X, Xt, grid.rounder(45), method=method, block_size=16)
    levels = np.asarray(grid.levels())  # (G, N1, 8)
    group = grid.group_index(45)
    Qr = _gpfq_reference(W, X, Xt, lambda t: levels[group[t]])
    np.testing.assert_array_equal(Q, Qr)
    np.testing.assert_array_equal(grid.round(Q), Q)  # on the grid

  def test_alphabet_rounder_msq_is_plain_gpfq(self):
    import qjax
    from qjax import alphabets
    W, X, Xt = _gpfq_problem(2)
    levels = alphabets.levels_for(W, 3, 1.0)
    np.testing.assert_array_equal(
        qjax.gpfq_layer(W, X, Xt, grids.rounder(levels, 45, 6), method="gram"),
        qjax.gpfq_layer(W, X, Xt, levels, method="gram"))

  @parameterized.parameters("grid", "alphabet")
  def test_stochastic_rounder_is_unbiased(self, target):
    from qjax import alphabets
    W = _kernel(3, (16, 5))
    tgt = (grids.fit(W, bits=2, symmetric=False) if target == "grid"
           else alphabets.levels_for(W, 2, 1.0))
    z = jnp.array([-0.7, -0.1, 0.05, 0.33, 0.61])
    n = 4000
    draws = jax.vmap(lambda k: grids.rounder(tgt, 16, 5, quantizer="stochastic", key=k)
                     .round_row(z, jnp.int32(3)))(jax.random.split(jax.random.key(0), n))
    if target == "grid":
      lv = np.asarray(tgt.levels())[0]  # (N1, 4)
    else:
      lv = np.tile(np.asarray(tgt), (5, 1))
    assert all(np.isin(np.asarray(draws[:, j]), lv[j]).all() for j in range(5))
    expect = np.clip(np.asarray(z), lv[:, 0], lv[:, -1])
    spacing = np.max(np.diff(lv, axis=1), axis=1)
    # The mean of n draws between two levels d apart has std <= d / (2 sqrt(n)); allow 5 std.
    np.testing.assert_array_less(np.abs(np.asarray(draws.mean(0)) - expect),
                                 5 * spacing / (2 * np.sqrt(n)) + 1e-6)

  def test_stochastic_gpfq_on_grid(self):
    import qjax
    W, X, Xt = _gpfq_problem(4)
    grid = grids.fit(W, bits=3, granularity="group", group_size=8)
    run = lambda k: qjax.gpfq_layer(W, X, Xt, grid.rounder(45, quantizer="stochastic", key=k),
                                    method="gram")
    Q1, Q2 = run(jax.random.key(1)), run(jax.random.key(2))
    np.testing.assert_array_equal(grid.round(Q1), Q1)
    np.testing.assert_array_equal(run(jax.random.key(1)), Q1)
    assert not np.array_equal(Q1, Q2)

  @parameterized.product(quantizer=("hard_threshold", "soft_threshold"),
                         target=("grid", "alphabet"))
  def test_thresholding_raises_sparsity_and_error_with_lambda(self, quantizer, target):
    import qjax
    from qjax import alphabets
    W, X, Xt = _gpfq_problem(5, N0=64, N1=8, m=200)
    tgt = (grids.fit(W, bits=4, symmetric=False) if target == "grid"
           else alphabets.levels_for(W, 4, 1.0))
    sparsity, error = [], []
    for lam in (0.0, 0.1, 0.3, 0.6, 1.0):
      Q = qjax.gpfq_layer(W, X, Xt, grids.rounder(tgt, 64, 8, quantizer=quantizer, lambda_=lam),
                          method="gram")
      sparsity.append(float(np.mean(np.asarray(Q) == 0)))
      error.append(float(np.linalg.norm(X @ W - Xt @ Q) / np.linalg.norm(X @ W)))
    assert np.all(np.diff(sparsity) > 0), sparsity
    assert np.all(np.diff(error) > 0), error

  def test_rounder_errors(self):
    W = _kernel(6, (16, 5))
    grid = grids.fit(W, bits=3)
    with pytest.raises(ValueError, match="quantizer must be one of"):
      grids.rounder(grid, 16, 5, quantizer="nearest")
    with pytest.raises(ValueError, match="needs a key"):
      grids.rounder(grid, 16, 5, quantizer="stochastic")
    with pytest.raises(ValueError, match="lambda_"):
      grids.rounder(grid, 16, 5, quantizer="soft_threshold")
    with pytest.raises(ValueError, match="lambda_"):
      grids.rounder(grid, 16, 5, quantizer="hard_threshold", lambda_=-1.0)
    with pytest.raises(ValueError, match="key is only used"):
      grids.rounder(grid, 16, 5, key=jax.random.key(0))
    with pytest.raises(ValueError, match="N1=4"):
      grids.rounder(grid, 16, 4)


def test_grid_and_stochastic_rounders_on_a_mesh_match_one_device():
  """Per-neuron leaves (scale, zero, keys) split over the model axis like W's columns: the
  sharded Q is the one-device Q (the stochastic draws depend on (neuron key, t) only)."""
  import qjax
  from jax.sharding import Mesh
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices (tests/conftest.py)")
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
  W, X, Xt = _gpfq_problem(8, N0=40, N1=8, m=64)
  grid = grids.fit(W, bits=3, granularity="group", group_size=16, symmetric=False)
  for kw in (dict(), dict(quantizer="stochastic", key=jax.random.key(3))):
    r = grid.rounder(40, **kw)
    for method in ("scan", "gram"):
      np.testing.assert_array_equal(
          qjax.gpfq_layer(W, X, Xt, r, method=method, mesh=mesh),
          qjax.gpfq_layer(W, X, Xt, r, method=method))
