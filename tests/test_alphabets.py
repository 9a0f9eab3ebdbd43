"""Alphabets (GPFQ paper Eq. 2-4), step rules (Eq. 17-19 and the reference code) and quantizers."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from qjax import alphabets
from qjax.rounding import quantize_uniform


def _kernel(seed=0, shape=(64, 16)):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


class AlphabetTest(parameterized.TestCase):

  def test_paper_examples(self):
    # Sec. 1.1: A_1^2 = {±1} is 1-bit, tilde A_1^1 = {0, ±1} is ternary.
    np.testing.assert_array_equal(alphabets.midrise(1, 2.0), [-1.0, 1.0])
    np.testing.assert_array_equal(alphabets.midtread(1, 1.0), [-1.0, 0.0, 1.0])
    np.testing.assert_array_equal(alphabets.augmented_midrise(1, 2.0), [-1.0, 0.0, 1.0])

  @parameterized.parameters(1, 2, 4, 16)
  def test_definitions(self, K):
    delta = 0.3
    mr, mt, am = (alphabets.midrise(K, delta), alphabets.midtread(K, delta),
                  alphabets.augmented_midrise(K, delta))
    for lv in (mr, mt, am):
      chex.assert_type(lv, jnp.float32)
      assert np.all(np.diff(lv) > 0)
      np.testing.assert_allclose(lv, -lv[::-1], rtol=0, atol=0)  # symmetric
    chex.assert_shape((mr, mt, am), [(2 * K,), (2 * K + 1,), (2 * K + 1,)])
    k = np.arange(1, K + 1)
    np.testing.assert_allclose(mr[K:], (k - 0.5) * delta, rtol=1e-6)
    np.testing.assert_allclose(mt[K + 1:], k * delta, rtol=1e-6)
    np.testing.assert_allclose(np.sort(np.r_[np.asarray(mr), 0.0]), am, rtol=1e-6)

  @parameterized.parameters(1, 3, 5)
  def test_paper_step_eq19(self, bits):
    W = _kernel()
    C = 1.16
    delta = alphabets.paper_step(W, bits, C)
    R = C * np.mean(np.max(np.abs(np.asarray(W)), axis=0))
    np.testing.assert_allclose(delta, 2 * R / (2**bits - 1), rtol=1e-6)
    lv = alphabets.levels_for(W, bits, C, rule="paper")
    chex.assert_shape(lv, (2**bits + 1,))
    np.testing.assert_allclose(lv[-1], R, rtol=1e-6)  # q_max = (K - 1/2) delta = R (Eq. 17)
    assert 0.0 in np.asarray(lv)

  def test_one_bit_paper_rule_is_ternary(self):
    W = _kernel()
    R = np.mean(np.max(np.abs(np.asarray(W)), axis=0))
    np.testing.assert_allclose(alphabets.levels_for(W, 1, 1.0), [-R, 0.0, R], rtol=1e-6)

  @parameterized.parameters((2, 1.0), (4, 1.0), (4, 0.9))
  def test_reference_step(self, bits, percentile):
    W = _kernel(1)
    C = 1.5
    rad = np.mean(np.quantile(np.abs(np.asarray(W)), percentile, axis=0))
    delta = alphabets.reference_step(W, bits, C, percentile)
    np.testing.assert_allclose(delta, C * rad / 2 ** (bits - 1), rtol=1e-5)
    if percentile == 1.0:
      lv = alphabets.levels_for(W, bits, C, rule="reference")
      chex.assert_shape(lv, (2**bits + 1,))
      K = 2 ** (bits - 1)
      np.testing.assert_allclose(lv, np.arange(-K, K + 1) * float(delta), rtol=1e-6)

  @parameterized.parameters(2, 3, 4)  # quantize_uniform takes 2..16 bits (qjax.rules.check_bits)
  def test_uniform_rule_is_quantize_uniform_grid(self, bits):
    W = _kernel(2)
    lv = alphabets.levels_for(W, bits, 1.0, rule="uniform")
    chex.assert_shape(lv, (2 * max(2 ** (bits - 1) - 1, 1) + 1,))
    rounded = quantize_uniform({"kernel": W}, bits)["kernel"]
    np.testing.assert_allclose(alphabets.msq(W, lv), rounded, rtol=1e-6, atol=1e-7)

  def test_levels_for_under_jit(self):
    W = _kernel()
    np.testing.assert_allclose(jax.jit(lambda w: alphabets.levels_for(w, 3, 1.0))(W),
                               alphabets.levels_for(W, 3, 1.0), rtol=1e-6)

  def test_errors(self):
    W = _kernel()
    with pytest.raises(ValueError, match="bits"):
      alphabets.paper_step(W, 0, 1.0)
    with pytest.raises(TypeError, match="bits"):
      alphabets.levels_for(W, 2.0, 1.0)
    with pytest.raises(TypeError, match="bits"):
      alphabets.reference_step(W, True, 1.0)
    with pytest.raises(ValueError, match="C"):
      alphabets.paper_step(W, 2, 0.0)
    with pytest.raises(ValueError, match="C"):
      alphabets.reference_step(W, 2, -1.0)
    with pytest.raises(ValueError, match="delta"):
      alphabets.midrise(2, 0.0)
    with pytest.raises(ValueError, match="delta"):
      alphabets.midtread(2, float("nan"))
    with pytest.raises(ValueError, match="NaN"):
      alphabets.paper_step(W.at[3, 2].set(jnp.inf), 2, 1.0)
    with pytest.raises(ValueError, match="NaN"):
      alphabets.reference_step(W.at[0, 0].set(jnp.nan), 2, 1.0)
    with pytest.raises(ValueError, match="zero"):
      alphabets.paper_step(jnp.zeros((4, 3)), 2, 1.0)
    with pytest.raises(ValueError, match="percentile"):
      alphabets.reference_step(W, 2, 1.0, percentile=0.0)
    with pytest.raises(ValueError, match="rule"):
      alphabets.levels_for(W, 2, 1.0, rule="gptq")
    with pytest.raises(ValueError, match="2-D"):
      alphabets.paper_step(W[0], 2, 1.0)


class QuantizerTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(
      ("uniform", 2), ("uniform", 4), ("uniform", 8), ("irregular", 5), ("single", 1))
  def test_msq_is_nearest_level(self, kind, bits):
    key_z, key_l = jax.random.split(jax.random.key(bits))
    if kind == "uniform":
      levels = alphabets.midtread(2 ** (bits - 1), 1.0 / 2**bits)
    elif kind == "irregular":
      levels = jnp.sort(jax.random.normal(key_l, (2**bits,)))
    else:
      levels = jnp.array([0.25])
    z = 1.5 * jax.random.normal(key_z, (3, 1000))
    q = self.variant(alphabets.msq)(z, levels)
    chex.assert_shape(q, z.shape)
    chex.assert_type(q, jnp.float32)
    best = np.min(np.abs(np.asarray(z)[..., None] - np.asarray(levels)), axis=-1)
    np.testing.assert_allclose(np.abs(np.asarray(z - q)), best, rtol=0, atol=1e-7)
    assert np.isin(np.asarray(q), np.asarray(levels)).all()

  @chex.variants(with_jit=True, without_jit=True)
  def test_msq_fixes_levels_and_breaks_ties_low(self):
    levels = alphabets.midtread(4, 0.5)
    np.testing.assert_array_equal(self.variant(alphabets.msq)(levels, levels), levels)
    np.testing.assert_array_equal(
        self.variant(alphabets.msq)(jnp.array([0.25, -0.25, 9.0, -9.0]), levels),
        [0.0, -0.5, 2.0, -2.0])

  @chex.variants(with_jit=True, without_jit=True)
  def test_stochastic_msq_is_unbiased_inside_the_range(self):
    levels = alphabets.midrise(2, 1.0)  # {-1.5, -0.5, 0.5, 1.5}
    z = jnp.array([-1.2, -0.5, 0.1, 0.3, 1.45, 3.0, -7.0])
    n = 20000
    keys = jax.random.split(jax.random.key(0), n)
    draws = jax.vmap(lambda k: self.variant(alphabets.stochastic_msq)(k, z, levels))(keys)
    assert np.isin(np.asarray(draws), np.asarray(levels)).all()
    # Each draw is one of the two neighbours of z.
    lo = np.asarray(levels)[np.clip(np.searchsorted(levels, z, side="right") - 1, 0, 2)]
    assert (np.asarray(draws) >= lo - 1e-7).all() and (np.asarray(draws) <= lo + 1 + 1e-7).all()
    # Unbiased inside [-1.5, 1.5] (std of the mean <= 0.5 / sqrt(n) = 0.0035), clipped outside.
    np.testing.assert_allclose(draws.mean(0), jnp.clip(z, -1.5, 1.5), atol=0.02)
    np.testing.assert_array_equal(draws[:, -2:], np.tile([[1.5, -1.5]], (n, 1)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_thresholding_quantizers_promote_zeros(self):
    levels = alphabets.midtread(4, 0.25)
    z = jnp.array([0.3, -0.3, 0.6, -1.0])
    np.testing.assert_array_equal(
        self.variant(alphabets.hard_threshold_msq)(z, levels, 0.4), [0.0, 0.0, 0.5, -1.0])
    np.testing.assert_array_equal(
        self.variant(alphabets.soft_threshold_msq)(z, levels, 0.4), [0.0, 0.0, 0.25, -0.5])
