"""GPFQ single-layer kernels: agreement with a plain Eq. (7)-(8) loop, and the paper's theory."""
import functools
from typing import NamedTuple

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from qjax import alphabets
from qjax._gpfq.kernels import Levels
from qjax._gpfq.layer import gpfq_layer, gpfq_residuals, relative_error


def reference_gpfq(W, X, Xt, levels):
  """Eq. (7)-(8) neuron by neuron in float64, plus the smallest distance of an argument of Q to a
  rounding tie (in units of the level spacing), so a test can tell a tie from a bug.

  `levels`: one sorted alphabet, or a function (t, j) -> the sorted alphabet of row t, neuron j.
  """
  W, X, Xt = (np.asarray(a, np.float64) for a in (W, X, Xt))
  levels_of = levels if callable(levels) else lambda t, j: levels
  Q = np.zeros_like(W)
  margin = np.inf
  for j in range(W.shape[1]):
    u = np.zeros(X.shape[0])
    for t in range(W.shape[0]):
      alphabet = np.asarray(levels_of(t, j), np.float64)
      mids = (alphabet[1:] + alphabet[:-1]) / 2
      norm2 = Xt[:, t] @ Xt[:, t]
      arg = 0.0 if norm2 == 0 else Xt[:, t] @ (u + W[t, j] * X[:, t]) / norm2
      Q[t, j] = alphabet[np.argmin(np.abs(arg - alphabet))]
      margin = min(margin, np.min(np.abs(arg - mids)) / np.min(np.diff(alphabet)))
      u += W[t, j] * X[:, t] - Q[t, j] * Xt[:, t]
  return Q, margin


class NeuronLevels(NamedTuple):
  """A rounder with its own sorted alphabet per neuron: column j of `levels` (L, N1)."""
  levels: jax.Array

  def round_row(self, z, t):
    del t
    nearest = jnp.argmin(jnp.abs(z[None, :] - self.levels), axis=0)
    return jnp.take_along_axis(self.levels, nearest[None, :], axis=0)[0]


@flax.struct.dataclass
class GroupGrid:
  """Rounds onto the uniform grid scale[g, j] * {-K, ..., K} of (group g = t // size, neuron j)."""
  scale: jax.Array  # (G, N1)
  size: int = flax.struct.field(pytree_node=False)
  K: int = flax.struct.field(pytree_node=False)

  def round_row(self, z, t):
    s = self.scale[t // self.size]
    return jnp.clip(jnp.round(z / s), -self.K, self.K) * s

  def alphabet(self, t, j):
    # float32 products, as round_row computes them
    return np.asarray(self.scale)[t // self.size, j] * np.arange(-self.K, self.K + 1,
                                                                 dtype=np.float32)


def rounder_for(kind, W, seed):
  """A per-neuron ("neuron") or per-group-and-neuron ("group", groups of 8 rows) rounder for W."""
  rng = np.random.default_rng(seed)
  N0, N1 = W.shape
  if kind == "neuron":  # uneven per-neuron alphabets: 7 sorted random levels around 0
    levels = np.sort(rng.uniform(-1.5, 1.5, size=(7, N1)) * np.abs(W).max(0), axis=0)
    rounder = NeuronLevels(jnp.asarray(levels, jnp.float32))
    return rounder, lambda t, j: np.asarray(rounder.levels[:, j])
  scale = rng.uniform(0.5, 1.5, size=(-(-N0 // 8), N1)) * np.abs(W).max(0) / 3  # G = 6 at N0 = 45
  rounder = GroupGrid(jnp.asarray(scale, jnp.float32), size=8, K=3)
  return rounder, rounder.alphabet


def layer_data(seed, m, N0, N1, bits=3, dead=(), same=False):
  """A kernel, correlated inputs X, a perturbed X_tilde, and the paper's levels."""
  rng = np.random.default_rng(seed)
  W = (rng.normal(size=(N0, N1)) / np.sqrt(N0)).astype(np.float32)
  mix = np.eye(N0) + rng.normal(size=(N0, N0)) / np.sqrt(N0)  # correlated features
  X = np.maximum(rng.normal(size=(m, N0)) @ mix, 0.0).astype(np.float32)
  Xt = X if same else (X + 0.1 * rng.normal(size=X.shape)).astype(np.float32)
  for t in dead:  # dead input features: zero columns
    X[:, t] = 0.0
    if not same:
      Xt[:, t] = 0.0
  return W, X, Xt, alphabets.levels_for(W, bits, 1.0)


def chunked(X, Xt, size):
  return [(X[i:i + size], Xt[i:i + size]) for i in range(0, X.shape[0], size)]


class AgreementTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(method=("scan", "gram"), block_size=(None, 1, 16), same=(False, True))
  def test_matches_reference_loop(self, method, block_size, same):
    # N0 = 45 is not a multiple of the block size; features 3 and 20 are dead.
    W, X, Xt, levels = layer_data(0, m=40, N0=45, N1=7, dead=(3, 20), same=same)
    Q_ref, margin = reference_gpfq(W, X, Xt, levels)
    assert margin > 2e-5  # no argument near a tie: float32 and float64 must agree exactly
    fn = functools.partial(gpfq_layer, levels=levels, method=method, block_size=block_size)
    Q = self.variant(fn)(W, X, None if same else Xt)
    chex.assert_shape(Q, W.shape)
    chex.assert_type(Q, jnp.float32)
    np.testing.assert_array_equal(Q, Q_ref)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(kind=("neuron", "group"), method=("scan", "gram"), block_size=(None, 16))
  def test_rounder_matches_reference_loop(self, kind, method, block_size):
    # Row t of neuron j rounds onto its own grid; N0 = 45 leaves a short last block and group.
    W, X, Xt, _ = layer_data(6, m=40, N0=45, N1=7, dead=(3, 20))
    rounder, alphabet = rounder_for(kind, W, seed=7)
    Q_ref, margin = reference_gpfq(W, X, Xt, alphabet)
    assert margin > 2e-5
    fn = functools.partial(gpfq_layer, method=method, block_size=block_size)
    Q = self.variant(fn)(W, X, Xt, rounder)
    chex.assert_shape(Q, W.shape)
    chex.assert_type(Q, jnp.float32)
    np.testing.assert_array_equal(Q, Q_ref)
    np.testing.assert_array_equal(gpfq_residuals(W, X, Xt, rounder)[0], Q_ref)

  @parameterized.parameters("scan", "gram")
  def test_levels_rounder_is_the_alphabet(self, method):
    W, X, Xt, levels = layer_data(8, m=50, N0=40, N1=6)
    Q = gpfq_layer(W, X, Xt, levels, method=method, block_size=16)
    shuffled = np.random.default_rng(0).permutation(np.asarray(levels))  # sorted by gpfq_layer
    np.testing.assert_array_equal(gpfq_layer(W, X, Xt, shuffled, method=method, block_size=16), Q)
    np.testing.assert_array_equal(
        gpfq_layer(W, X, Xt, Levels(jnp.asarray(levels)), method=method, block_size=16), Q)

  @parameterized.parameters("auto", "scan", "gram")
  def test_chunked_input_equals_unchunked(self, method):
    W, X, Xt, levels = layer_data(1, m=90, N0=33, N1=5)
    Q = gpfq_layer(W, X, Xt, levels, method=method)
    stream = iter(chunked(X, Xt, 32))  # uneven last chunk, a one-shot iterator
    np.testing.assert_array_equal(gpfq_layer(W, stream, None, levels, method=method), Q)

  @parameterized.parameters(2, 4, 6)
  def test_entries_in_alphabet_and_forms_agree(self, bits):
    W, X, Xt, levels = layer_data(2, m=64, N0=300, N1=24, bits=bits)
    Q_scan = gpfq_layer(W, X, Xt, levels, method="scan")
    Q_gram = gpfq_layer(W, X, Xt, levels, method="gram", block_size=64)
    assert np.isin(np.asarray(Q_scan), np.asarray(levels)).all()
    # Different summation order: only an exact-tie flip (and its cascade in that neuron) may differ.
    assert np.mean(np.asarray(Q_scan) == np.asarray(Q_gram)) >= 0.999
    Q_res, norms = gpfq_residuals(W, X, Xt, levels)
    assert np.mean(np.asarray(Q_res) == np.asarray(Q_scan)) >= 0.999
    # ||u_N0|| is the layer's output error (Eq. 7 telescopes).
    np.testing.assert_allclose(norms[-1], np.linalg.norm(X @ W - Xt @ np.asarray(Q_res), axis=0),
                               rtol=1e-3)

  def test_relative_error(self):
    W, X, Xt, levels = layer_data(3, m=50, N0=20, N1=4)
    Q = gpfq_layer(W, X, Xt, levels)
    direct = np.linalg.norm(X @ W - Xt @ np.asarray(Q)) / np.linalg.norm(X @ W)
    np.testing.assert_allclose(relative_error(W, Q, X, Xt), direct, rtol=1e-5)
    np.testing.assert_allclose(relative_error(W, Q, chunked(X, Xt, 16), None), direct, rtol=1e-5)
    assert relative_error(W, W, X) == 0.0

  def test_dead_inputs_give_no_nan(self):
    W, X, Xt, levels = layer_data(4, m=16, N0=10, N1=3, bits=2)
    Xt[:, 4] = 0.0  # dead only in the quantized network
    for method in ("scan", "gram"):
      Q = gpfq_layer(W, np.zeros_like(X), np.zeros_like(Xt), levels, method=method)
      np.testing.assert_array_equal(Q, np.zeros_like(W))  # argument 0 -> Q(0) = 0
      Q = gpfq_layer(W, X, Xt, levels, method=method)
      assert np.isfinite(np.asarray(Q)).all()
      np.testing.assert_array_equal(Q[4], np.zeros(3))
    assert np.isfinite(np.asarray(gpfq_residuals(W, 0 * X, None, levels)[1])).all()

  def test_bad_inputs(self):
    W, X, Xt, levels = layer_data(5, m=8, N0=6, N1=2)
    with pytest.raises(ValueError, match=r"X must have shape \(m, N0=6\).*\(8, 5\)"):
      gpfq_layer(W, X[:, :5], Xt, levels)
    with pytest.raises(ValueError, match="X_tilde"):
      gpfq_layer(W, X, Xt[:7], levels)
    with pytest.raises(ValueError, match="W"):
      gpfq_layer(W[0], X, Xt, levels)
    with pytest.raises(ValueError, match="W contains NaN"):
      gpfq_layer(np.where(W > 0, np.nan, W), X, Xt, levels)
    with pytest.raises(ValueError, match="X contains NaN"):
      gpfq_layer(W, np.full_like(X, np.inf), Xt, levels)
    with pytest.raises(ValueError, match="X_tilde chunk 1 contains NaN"):
      gpfq_layer(W, [(X, Xt), (X, np.full_like(Xt, np.nan))], None, levels)
    with pytest.raises(ValueError, match="levels"):
      gpfq_layer(W, X, Xt, jnp.zeros((0,)))
    with pytest.raises(ValueError, match="method"):
      gpfq_layer(W, X, Xt, levels, method="gptq")
    with pytest.raises(ValueError, match="X_tilde must be None"):
      gpfq_layer(W, chunked(X, Xt, 4), Xt, levels)
    with pytest.raises(ValueError, match="empty"):
      gpfq_layer(W, [], None, levels)

  def test_zero_calibration_rows(self):
    # 0 rows used to return an all-zero Q silently.
    W, X, Xt, levels = layer_data(5, m=8, N0=6, N1=2)
    for method in ("auto", "scan", "gram"):
      with pytest.raises(ValueError, match="X has 0 rows"):
        gpfq_layer(W, X[:0], Xt[:0], levels, method=method)
      with pytest.raises(ValueError, match="X has 0 rows"):
        gpfq_layer(W, X[:0], None, levels, method=method)
      with pytest.raises(ValueError, match=r"X \(all 2 chunks\) has 0 rows"):
        gpfq_layer(W, [(X[:0], Xt[:0])] * 2, None, levels, method=method)
    with pytest.raises(ValueError, match="X has 0 rows"):
      gpfq_residuals(W, X[:0], None, levels)
    with pytest.raises(ValueError, match="X has 0 rows"):
      relative_error(W, W, X[:0])
    # Empty chunks among non-empty ones are fine.
    np.testing.assert_array_equal(gpfq_layer(W, [(X[:0], Xt[:0]), (X, Xt)], None, levels),
                                  gpfq_layer(W, X, Xt, levels, method="gram"))

  def test_bad_rounders(self):
    W, X, Xt, _ = layer_data(5, m=8, N0=6, N1=2)
    with pytest.raises(ValueError, match=r"levels\.levels has shape \(4, 3\).*N1=2"):
      gpfq_layer(W, X, Xt, NeuronLevels(jnp.zeros((4, 3))))
    with pytest.raises(ValueError, match=r"levels\.levels contains NaN"):
      gpfq_layer(W, X, Xt, NeuronLevels(jnp.full((4, 2), jnp.nan)))
    with pytest.raises(TypeError, match=r"round_row\(z, t\) must return"):
      gpfq_layer(W, X, Xt, _WrongShape(jnp.ones((3,))))
    with pytest.raises(TypeError, match="leaves must be arrays or scalars"):
      gpfq_layer(W, X, Xt, _WrongShape("abc"))


class _WrongShape(NamedTuple):
  """A broken rounder: returns one value per level instead of one per neuron."""
  levels: jax.Array

  def round_row(self, z, t):
    return self.levels + 0.0 * t


def columns(kind, rng, m, N0):
  """X (m, N0) with i.i.d. columns: N(0, I_m), symmetric Bernoulli, or uniform in the unit ball."""
  if kind == "gaussian":
    return rng.normal(size=(m, N0))
  if kind == "bernoulli":
    return rng.choice([-1.0, 1.0], size=(m, N0))
  g = rng.normal(size=(m, N0))
  return g / np.linalg.norm(g, axis=0) * rng.uniform(size=N0) ** (1.0 / m)


class TheoryTest(parameterized.TestCase):
  """Single layer, X = X_tilde (Eq. 9), ||w||_inf <= q_max (Thm 2.1, 2.2)."""

  @parameterized.parameters(
      # (distribution, m, N0, bound on max_t ||u_t||^2 / delta^2):
      # Gaussian (Eq. 15, sigma = 1, p = 1): 4 m^2 log N0; Bernoulli (Thm 2.1 with r^2 = m,
      # s^2 = 1/m): m^2 log N0; uniform ball of radius 1 (r = 1, s^2 = 1/m): m log N0.
      ("gaussian", 8, 8192, lambda m, n: 4 * m**2 * np.log(n)),
      ("bernoulli", 16, 4096, lambda m, n: m**2 * np.log(n)),
      ("ball", 16, 4096, lambda m, n: m * np.log(n)),
  )
  def test_residual_bound(self, kind, m, N0, bound):
    rng = np.random.default_rng(10)
    X = columns(kind, rng, m, N0).astype(np.float32)
    delta = 0.1
    for levels in (alphabets.midrise(4, delta), alphabets.midtread(4, delta)):
      q_max = float(levels[-1])
      W = rng.uniform(-q_max, q_max, size=(N0, 32)).astype(np.float32)
      _, norms = gpfq_residuals(W, X, None, levels)
      gpfq_max = float(np.max(np.asarray(norms) ** 2)) / delta**2
      assert gpfq_max <= 0.1 * bound(m, N0)  # holds with a 10x margin
      # A broken kernel that ignores u_{t-1} (plain MSQ) breaks the same bound.
      msq_err = np.sum((X @ (W - np.asarray(alphabets.msq(W, levels)))) ** 2, axis=0)
      assert np.max(msq_err) / delta**2 > bound(m, N0)

  def test_relative_error_decays_like_one_over_n0(self):
    # Eq. 16: ||Xw - Xq||^2 / ||Xw||^2 <~ m delta^2 log N0 / N0 at fixed m.
    rng = np.random.default_rng(11)
    m, N1, levels = 16, 16, alphabets.midrise(4, 0.1)
    sizes = 2 ** np.arange(6, 13)  # 64 .. 4096
    errors = []
    for N0 in sizes:
      X = rng.normal(size=(m, N0)).astype(np.float32)
      W = rng.uniform(-0.35, 0.35, size=(N0, N1)).astype(np.float32)
      Q = np.asarray(gpfq_layer(W, X, None, levels))
      errors.append(np.mean(np.sum((X @ (W - Q)) ** 2, 0) / np.sum((X @ W) ** 2, 0)))
    slope = np.polyfit(np.log(sizes), np.log(errors), 1)[0]
    assert -1.3 <= slope <= -0.7, slope

  @parameterized.product(bits=(2, 4), same=(True, False))
  def test_beats_msq_on_the_same_alphabet(self, bits, same):
    W, X, Xt, levels = layer_data(12, m=64, N0=512, N1=32, bits=bits, same=same)
    Q = gpfq_layer(W, X, Xt, levels)
    gpfq_err = relative_error(W, Q, X, Xt)
    assert gpfq_err < 0.5 * relative_error(W, alphabets.msq(W, levels), X, Xt)
    if bits == 4 and not same:
      # GPFQ also absorbs the input mismatch: it beats the unquantized W applied to X_tilde.
      assert gpfq_err < 0.7 * relative_error(W, W, X, Xt)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_forms_agree_on_larger_layers(seed):
  W, X, Xt, levels = layer_data(20 + seed, m=512, N0=700, N1=64, bits=4)
  Q = {(method, B): np.asarray(gpfq_layer(W, X, Xt, levels, method=method, block_size=B))
       for method in ("scan", "gram") for B in (32, 128, 256)}
  Q_res = np.asarray(gpfq_residuals(W, X, Xt, levels)[0])
  for q in Q.values():
    assert np.mean(q == Q_res) >= 0.999


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gaussian", "bernoulli", "ball"])
def test_relative_error_slope_sweep(kind):
  rng = np.random.default_rng(30)
  levels = alphabets.midtread(8, 0.05)
  for m in (8, 32):
    sizes = 2 ** np.arange(7, 14)  # 128 .. 8192
    errors = []
    for N0 in sizes:
      X = columns(kind, rng, m, N0).astype(np.float32)
      W = rng.uniform(-0.4, 0.4, size=(N0, 32)).astype(np.float32)
      Q = np.asarray(gpfq_layer(W, X, None, levels))
      errors.append(np.mean(np.sum((X @ (W - Q)) ** 2, 0) / np.sum((X @ W) ** 2, 0)))
    slope = np.polyfit(np.log(sizes), np.log(errors), 1)[0]
    assert -1.3 <= slope <= -0.7, (m, slope)
