"""Uniform integer grids (qjax.grids): fits, rounding onto the grid, codes, rounders, errors."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from qjax import grids
from qjax._gpfq import rounders


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
    rounder = rounders.rounder(grid, 37, 5)
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
      rounders.rounder(grids.GridSpec(4, "group", 8).fit(W), 20, 5)


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
    Q = qjax.gpfq_layer(W, X, Xt, rounders.rounder(grid, 45, 6), method=method, block_size=16)
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
        qjax.gpfq_layer(W, X, Xt, rounders.rounder(levels, 45, 6), method="gram"),
        qjax.gpfq_layer(W, X, Xt, levels, method="gram"))

  @parameterized.parameters("grid", "alphabet")
  def test_stochastic_rounder_is_unbiased(self, target):
    from qjax import alphabets
    W = _kernel(3, (16, 5))
    tgt = (grids.fit(W, bits=2, symmetric=False) if target == "grid"
           else alphabets.levels_for(W, 2, 1.0))
    z = jnp.array([-0.7, -0.1, 0.05, 0.33, 0.61])
    n = 4000
    draws = jax.vmap(lambda k: rounders.rounder(tgt, 16, 5, quantizer="stochastic", key=k)
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
    run = lambda k: qjax.gpfq_layer(
        W, X, Xt, rounders.rounder(grid, 45, 6, quantizer="stochastic", key=k), method="gram")
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
      r = rounders.rounder(tgt, 64, 8, quantizer=quantizer, lambda_=lam)
      Q = qjax.gpfq_layer(W, X, Xt, r, method="gram")
      sparsity.append(float(np.mean(np.asarray(Q) == 0)))
      error.append(float(np.linalg.norm(X @ W - Xt @ Q) / np.linalg.norm(X @ W)))
    assert np.all(np.diff(sparsity) > 0), sparsity
    assert np.all(np.diff(error) > 0), error

  def test_rounder_errors(self):
    W = _kernel(6, (16, 5))
    grid = grids.fit(W, bits=3)
    with pytest.raises(ValueError, match="quantizer must be one of"):
      rounders.rounder(grid, 16, 5, quantizer="nearest")
    with pytest.raises(ValueError, match="needs a key"):
      rounders.rounder(grid, 16, 5, quantizer="stochastic")
    with pytest.raises(ValueError, match="lambda_"):
      rounders.rounder(grid, 16, 5, quantizer="soft_threshold")
    with pytest.raises(ValueError, match="lambda_"):
      rounders.rounder(grid, 16, 5, quantizer="hard_threshold", lambda_=-1.0)
    with pytest.raises(ValueError, match="key is only used"):
      rounders.rounder(grid, 16, 5, key=jax.random.key(0))
    with pytest.raises(ValueError, match="N1=4"):
      rounders.rounder(grid, 16, 4)


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
    r = rounders.rounder(grid, 40, 8, **kw)
    for method in ("scan", "gram"):
      np.testing.assert_array_equal(
          qjax.gpfq_layer(W, X, Xt, r, method=method, mesh=mesh),
          qjax.gpfq_layer(W, X, Xt, r, method=method))


# --------------------------------------------------------------------------------------------
# Matrix views (qjax.views): RTN on the driver's matrices rounds onto GPTQ's and GPFQ's grids.


def test_of_index_round_trips_strided_layouts():
  """Transpose / reshape / reversal chains of a leaf are strided views; anything else is not."""
  from qjax import views
  rng = np.random.default_rng(0)
  for shape in [(3, 3, 2, 4), (4, 2, 3), (7, 5), (2, 3, 4, 5), (1, 6), (6, 1)]:
    iota = np.arange(np.prod(shape)).reshape(shape)
    for _ in range(4):
      a = np.transpose(iota, rng.permutation(len(shape)))
      if rng.random() < 0.5:
        a = np.flip(a, axis=int(rng.integers(a.ndim)))
      cut = int(rng.integers(1, a.ndim))
      index = a.reshape(int(np.prod(a.shape[:cut])), -1)
      view = views.of_index(index)
      np.testing.assert_array_equal(view.index(), index)
      assert view.shape == index.shape and len(view.sizes) <= len(shape) + 1
  assert views.of_index(np.arange(24).reshape(8, 3)) == views.default((4, 2, 3))
  # A reshape that cuts the digits of a transpose, then another transpose: no strided layout.
  bad = np.arange(6).reshape(2, 3).T.reshape(2, 3).T  # [[0, 4], [3, 2], [1, 5]]
  with pytest.raises(ValueError, match="not a strided layout"):
    views.of_index(bad)
  with pytest.raises(ValueError, match="2-D integer"):
    views.of_index(np.arange(6.0).reshape(2, 3))
  assert views.split_name("a/Dense_0[2][1]") == ("a/Dense_0", (2, 1))
  assert views.split_name("a/Dense_0") == ("a/Dense_0", ())
  np.testing.assert_array_equal(views.default((3, 4, 2), (1,)).index(),
                                np.arange(8, 16).reshape(4, 2))


def test_view_errors_name_the_layer():
  from qjax import rtn, views
  W = {"d": {"kernel": jnp.ones((4, 3))}}
  spec = grids.GridSpec(4)
  with pytest.raises(ValueError, match="'e' names no parameter"):
    rtn.quantize_rtn(W, spec, views={"e": np.arange(12).reshape(4, 3)})
  with pytest.raises(ValueError, match=r"views\['d'\].*indexes entries \[1, 12\]"):
    rtn.quantize_rtn(W, spec, views={"d": np.arange(1, 13).reshape(4, 3)})
  with pytest.raises(ValueError, match=r"views\['d'\].*twice"):
    rtn.quantize_rtn(W, spec, views={"d": np.zeros((4, 3), np.int64)})
  with pytest.raises(ValueError, match="whole leaf and of its slices"):
    rtn.quantize_rtn(W, spec, views={"d": np.arange(12).reshape(4, 3),
                                     "d[0]": np.arange(3).reshape(1, 3)})
  with pytest.raises(ValueError, match=r"views\['d'\].*non-empty 2-D"):
    rtn.quantize_rtn(W, spec, views={"d": views.View((0, 3), 0, (0,), (1,))})


class _Layouts(nn.Module):
  """A weight op of every layout whose matrix is not `as_matrix` of its leaf (and one that is)."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(4, (3, 3), name="conv0")(x))        # (3,3,2,4): rows (Cin, kh, kw), 18
    h = nn.relu(nn.Conv(4, (3, 3), name="conv1")(h))        # (3,3,4,4): 36 rows
    h = nn.avg_pool(h, (2, 2), (2, 2)).reshape(x.shape[0], -1, 4)
    q = nn.DenseGeneral((2, 3), name="qproj")(h)            # (4,2,3) -> (4, 6)
    o = nn.DenseGeneral(5, axis=(-2, -1), name="oproj")(nn.tanh(q))  # (2,3,5) -> (6, 5)
    e = nn.Einsum((7, 5), "btd,fd->btf", name="ein")(nn.tanh(o))    # (7,5) -> its transpose
    return nn.Embed(11, 7, name="embed").attend(nn.tanh(e))          # (11,7) -> E^T (7, 11)


def _layouts(seed=0):
  """(model, params, x); params drawn from the shapes (no init: it compiles every layer)."""
  x = jax.random.normal(jax.random.key(seed), (4, 6, 6, 2))
  model = _Layouts()
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: jnp.asarray(0.5 * rng.standard_normal(s.shape), s.dtype),
                        jax.eval_shape(model.init, jax.random.key(0), x))
  return model, params, x


def _by_name(params):
  from qjax import rules
  return {rules.path_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(params)}


def test_kernel_views_are_the_driver_matrices():
  from qjax import views
  model, params, x = _layouts()
  v = views.kernel_views(params, model.apply, x)
  leaves = _by_name(params)
  expect = {"conv0": leaves["conv0"].transpose(2, 0, 1, 3).reshape(18, 4),
            "conv1": leaves["conv1"].transpose(2, 0, 1, 3).reshape(36, 4),
            "qproj": leaves["qproj"].reshape(4, 6), "oproj": leaves["oproj"].reshape(6, 5),
            "ein": leaves["ein"].T, "embed/embedding": leaves["embed/embedding"].T}
  assert sorted(v) == sorted(expect)
  for name, M in expect.items():
    np.testing.assert_array_equal(views.matrix(leaves[name], v[name]), M)
  assert v["oproj"] == views.default((2, 3, 5))  # the one layout as_matrix gets right


@pytest.mark.parametrize("spec", [grids.GridSpec(3, "group", 4, symmetric=True),
                                  grids.GridSpec(4, "channel", symmetric=False)])
def test_rtn_on_driver_views_uses_the_levels_gptq_and_msq_fit(spec):
  """Group size 4: conv0's 18 rows end in a short group, conv1's 36 do not. RTN on the driver's
  views fits GPTQ's grids (static groups) and is MSQ on them; every weight of both is a level."""
  import qjax
  from qjax import views
  model, params, x = _layouts()
  v = views.kernel_views(params, model.apply, x)
  mask = jax.tree_util.tree_map(lambda leaf: np.ndim(leaf) >= 2, params)  # + the embedding
  q_rtn, t_rtn = qjax.quantize_rtn(params, spec, mask=mask, views=v)
  assert sorted(t_rtn.views) == sorted(v)
  q_gptq, _, t_gptq = qjax.gptq(params, model.apply, x, bits=spec.bits,
                                granularity=spec.granularity, group_size=spec.group_size,
                                symmetric=spec.symmetric, static_groups=True, progress=False,
                                return_grids=True)
  q_msq, _ = qjax.quantize_msq(params, model.apply, x, grid=spec, progress=False)
  assert sorted(t_gptq) == sorted(v) and t_gptq.views == v
  w, r, g, m = _by_name(params), _by_name(q_rtn), _by_name(q_gptq), _by_name(q_msq)
  for name, view in v.items():
    grid = t_gptq[name]
    assert grid.num_groups == spec.num_groups(view.shape[0])
    np.testing.assert_array_equal(t_rtn[name].scale, grid.scale)
    np.testing.assert_array_equal(t_rtn[name].zero, grid.zero)
    M_w, M_r, M_g = (views.matrix(a[name], view) for a in (w, r, g))
    np.testing.assert_array_equal(M_r, grid.round(M_w))  # RTN = nearest level of GPTQ's grid
    np.testing.assert_array_equal(grid.round(M_g), M_g)  # GPTQ's Q on its grid
    np.testing.assert_array_equal(m[name], r[name])      # MSQ on the grid is RTN


def test_rtn_per_channel_of_a_dense_general_kernel():
  """The q projection (in, heads, head_dim): a channel is one (head, dim) column of the (in,
  heads*head_dim) matrix, as GPTQ quantizes it, not a head_dim column of as_matrix (8, 3)."""
  import qjax
  from qjax import views
  model, params, x = _layouts()
  spec = grids.GridSpec(3, "channel")
  k = np.asarray(params["params"]["qproj"]["kernel"]).reshape(4, 6)
  scale = np.abs(k).max(0) * np.float32(1 / 3)
  ref = (np.clip(np.round(k / scale) + 4, 0, 7) - 4) * scale  # per column of (4, 6), NumPy
  q, t = qjax.quantize_rtn(params, spec, views=views.kernel_views(params, model.apply, x))
  np.testing.assert_allclose(np.asarray(q["params"]["qproj"]["kernel"]).reshape(4, 6), ref,
                             rtol=1e-6)
  _, _, t_gptq = qjax.gptq(params, model.apply, x, bits=3, symmetric=True, skip="^(?!qproj)",
                           progress=False, return_grids=True)
  np.testing.assert_array_equal(t["qproj"].scale, t_gptq["qproj"].scale)
  chex.assert_shape(t_gptq["qproj"].scale, (1, 6))
  _, t_default = qjax.quantize_rtn(params, spec)  # no views: as_matrix, other channels
  chex.assert_shape(t_default["qproj"].scale, (1, 3))
