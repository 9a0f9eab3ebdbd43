"""Quantization alphabets, step-size rules and memoryless scalar quantizers (Zhang, Zhou & Saab,
"Post-training quantization for neural networks with provable guarantees", Eq. (2)-(5), (17)-(19)).

Alphabets (paper Eq. 2-4), all returned as sorted 1-D float32 arrays:

  midrise(K, d)            {±(k - 1/2) d : k = 1..K}             2K levels, no zero
  midtread(K, d)           {k d : |k| <= K}                      2K + 1 levels
  augmented_midrise(K, d)  midrise(K, d) ∪ {0}                   2K + 1 levels

Step rules for a layer kernel W of shape (N0, N1) (a neuron is a column):

  paper_step      Eq. 17-19: R = C * mean_j ||W_j||_inf, d = 2R / (2^b - 1); used with
                  augmented_midrise(2^(b-1), d), whose largest level is exactly R.
  reference_step  the authors' public code: d = C * rad / 2^(b-1), rad = mean_j quantile(|W_j|, p)
                  (p = 1.0 is the max); used with midtread(2^(b-1), d), i.e. 2^b + 1 levels.
  uniform_step    the per-tensor grid of `qjax.quantize_uniform` and the PSGD targets:
                  d = C * max|W| / (2^(b-1) - 1), used with midtread(2^(b-1) - 1, d), i.e.
                  2^b - 1 levels (b = 1 is treated as b = 2: {-d, 0, d}).

Quantizers: `msq` (Eq. 5, nearest level), `stochastic_msq` (the SPFQ variant, unbiased inside the
range), and the sparsity-promoting `hard_threshold_msq` (L0) / `soft_threshold_msq` (L1).
"""
from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from qjax import mesh as mesh_lib, rules
from qjax.rounding import grid_half


# C for each step rule (Eq. 19 / reference code), the default of `qjax.gpfq(C=)`. Found by grid
# search on LeNet5 and embedded MNIST (qjax.experiments.gpfq); the paper's ImageNet models used
# 0.975-1.81 (Table 1).
DEFAULT_C: dict[str, float] = {"paper": 1.0, "reference": 1.0, "uniform": 1.0}


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_int(value: Any, name: str, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {value!r}")
  if int(value) < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
  return int(value)


def _check_positive(value: Any, name: str) -> None:
  """Raise unless a concrete scalar is finite and > 0 (tracers pass: checked by the caller)."""
  if _is_concrete(value):
    v = np.asarray(value)
    if v.ndim != 0:
      raise ValueError(f"{name} must be a scalar, got shape {v.shape}")
    if not np.isfinite(v) or v <= 0:
      raise ValueError(f"{name} must be finite and > 0, got {v}")


def _check_kernel(W: Any) -> jax.Array:
  W = jnp.asarray(W)
  if W.ndim != 2:
    raise ValueError(f"W must be 2-D (N0 inputs, N1 neurons), got shape {W.shape}")
  if W.size == 0:
    raise ValueError(f"W must be non-empty, got shape {W.shape}")
  if _is_concrete(W):
    with jax.ensure_compile_time_eval():  # concrete even when called inside an outer trace
      if not bool(jnp.all(jnp.isfinite(W))):
        raise ValueError("W contains NaN or Inf")
  return W


def _scaled(grid: np.ndarray, delta: Any) -> jax.Array:
  return jnp.asarray(grid, jnp.float32) * jnp.asarray(delta, jnp.float32)


def midrise(K: int, delta: Any) -> jax.Array:
  """Midrise alphabet {±(k - 1/2) delta : 1 <= k <= K} (Eq. 2), sorted, 2K levels."""
  K = _check_int(K, "K", 1)
  _check_positive(delta, "delta")
  half = np.arange(1, K + 1, dtype=np.float32) - np.float32(0.5)
  return _scaled(np.concatenate([-half[::-1], half]), delta)


def midtread(K: int, delta: Any) -> jax.Array:
  """Midtread alphabet {k delta : |k| <= K} (Eq. 3), sorted, 2K + 1 levels."""
  K = _check_int(K, "K", 1)
  _check_positive(delta, "delta")
  return _scaled(np.arange(-K, K + 1, dtype=np.float32), delta)


def augmented_midrise(K: int, delta: Any) -> jax.Array:
  """Augmented midrise alphabet: midrise(K, delta) ∪ {0} (Eq. 4), sorted, 2K + 1 levels.

  With K = 1 this is the ternary {-delta/2, 0, delta/2}.
  """
  K = _check_int(K, "K", 1)
  _check_positive(delta, "delta")
  half = np.arange(1, K + 1, dtype=np.float32) - np.float32(0.5)
  return _scaled(np.concatenate([-half[::-1], [0.0], half]).astype(np.float32), delta)


def _checked_step(delta: jax.Array, rule: str) -> jax.Array:
  if _is_concrete(delta) and not float(delta) > 0:
    raise ValueError(f"{rule}: W is all zero, so the step would be {float(delta)}; "
                     "quantize such a layer to zeros directly")
  return delta


def paper_step(W: Any, bits: int, C: float) -> jax.Array:
  """Step size of the paper, Eq. 17-19: delta = 2 C mean_j ||W_j||_inf / (2^b - 1).

  Pair it with `augmented_midrise(2**(bits - 1), delta)`, whose largest level is
  q_max = R = C * mean_j ||W_j||_inf (Eq. 18).

  Args:
    W: kernel (N0, N1); columns are neurons.
    bits: b >= 1.
    C: scale of R, > 0 (one scalar for the whole network, found by grid search in the paper).

  Returns:
    delta, a float32 scalar.
  """
  bits = rules.check_bits(bits, "bits")
  _check_positive(C, "C")
  W = _check_kernel(W)
  # The mean over neurons in one order, whatever W's sharding (a mesh run gives the same bits).
  R = C * jnp.mean(mesh_lib.replicated(jnp.max(jnp.abs(W.astype(jnp.float32)), axis=0)))
  return _checked_step(2.0 * R / (2**bits - 1), "paper_step")


def reference_step(W: Any, bits: int, C: float, percentile: float = 1.0) -> jax.Array:
  """Step size of the authors' public code: delta = C * rad / 2^(b-1).

  rad = mean over neurons (columns) of the `percentile` quantile of |W_j|; percentile = 1.0 is
  the max, i.e. rad = mean_j ||W_j||_inf. Pair it with `midtread(2**(bits - 1), delta)`.

  Args:
    W: kernel (N0, N1); columns are neurons.
    bits: b >= 1.
    C: scale, > 0.
    percentile: quantile in (0, 1].

  Returns:
    delta, a float32 scalar.
  """
  bits = rules.check_bits(bits, "bits")
  _check_positive(C, "C")
  if not 0.0 < float(percentile) <= 1.0:
    raise ValueError(f"percentile must be in (0, 1], got {percentile}")
  W = _check_kernel(W)
  absw = jnp.abs(W.astype(jnp.float32))
  per_neuron = (jnp.max(absw, axis=0) if percentile == 1.0
                else jnp.quantile(absw, jnp.float32(percentile), axis=0))
  return _checked_step(C * jnp.mean(mesh_lib.replicated(per_neuron)) / 2 ** (bits - 1), "reference_step")


def uniform_step(W: Any, bits: int, C: float = 1.0) -> jax.Array:
  """d = C * max|W| / max(2^(b-1) - 1, 1): `qjax.quantize_uniform`'s grid step when C = 1."""
  W = _check_kernel(W)
  bits = rules.check_bits(bits, "bits")
  _check_positive(C, "C")
  return _checked_step(C * jnp.max(jnp.abs(W)) / grid_half(bits), "uniform_step")


def levels_for(W: Any, bits: int, C: float,
               rule: Literal["paper", "reference", "uniform"] = "paper") -> jax.Array:
  """The alphabet a layer is quantized onto, by the paper's or the reference code's rule.

  * "paper": augmented_midrise(2^(b-1), paper_step(W, b, C)), 2^b + 1 levels; b = 1 gives the
    ternary {-delta/2, 0, delta/2} with delta = 2R, i.e. {-R, 0, R}.
  * "reference": midtread(2^(b-1), reference_step(W, b, C)), 2^b + 1 levels; b = 1 gives
    {-delta, 0, delta}.
  * "uniform": midtread(max(2^(b-1) - 1, 1), uniform_step(W, b, C)), 2^b - 1 levels: with C = 1
    the grid `qjax.quantize_uniform` rounds to (for PSGD-trained models).
  """
  bits = rules.check_bits(bits, "bits")
  K = 2 ** (bits - 1)
  if rule == "paper":
    return augmented_midrise(K, paper_step(W, bits, C))
  if rule == "reference":
    return midtread(K, reference_step(W, bits, C))
  if rule == "uniform":
    return midtread(grid_half(bits), uniform_step(W, bits, C))
  raise ValueError(f"rule must be 'paper', 'reference' or 'uniform', got {rule!r}")


def _bin_index(z: jax.Array, levels: jax.Array) -> jax.Array:
  """Index of the nearest level; a value exactly between two levels goes to the lower one."""
  mid = 0.5 * (levels[1:] + levels[:-1])
  # Few levels: one vectorized compare beats searchsorted's sequential bisection steps.
  method = "compare_all" if mid.shape[0] <= 16 else "scan_unrolled"
  return jnp.searchsorted(mid, z, side="left", method=method)


def msq(z: jax.Array, levels: jax.Array) -> jax.Array:
  """Memoryless scalar quantizer, Eq. 5: Q(z) = argmin_{p in levels} |z - p|, elementwise.

  Args:
    z: any shape.
    levels: sorted 1-D array (any spacing).

  Returns:
    An array like z (dtype of levels) with every entry in `levels`.
  """
  levels = jnp.asarray(levels)
  z = jnp.asarray(z, levels.dtype)
  if levels.shape[0] == 1:
    return jnp.full(z.shape, levels[0], levels.dtype)
  return levels[_bin_index(z, levels)]


def stochastic_msq(key: jax.Array, z: jax.Array, levels: jax.Array) -> jax.Array:
  """Stochastic MSQ (the SPFQ quantizer): round to a neighbouring level at random.

  Inside [levels[0], levels[-1]], z between neighbours lo <= z <= hi goes to hi with probability
  (z - lo) / (hi - lo), else to lo, so E[Q(z)] = z (unbiased). Outside the range z is clipped to
  the nearest end level.

  Args:
    key: a jax.random key.
    z: any shape.
    levels: sorted 1-D array.

  Returns:
    An array like z (dtype of levels) with every entry in `levels`.
  """
  levels = jnp.asarray(levels)
  z = jnp.asarray(z, levels.dtype)
  if levels.shape[0] == 1:
    return jnp.full(z.shape, levels[0], levels.dtype)
  z = jnp.clip(z, levels[0], levels[-1])
  lo_idx = jnp.clip(jnp.searchsorted(levels, z, side="right") - 1, 0, levels.shape[0] - 2)
  lo, hi = levels[lo_idx], levels[lo_idx + 1]
  p_up = (z - lo) / (hi - lo)
  return jnp.where(jax.random.uniform(key, z.shape, levels.dtype) < p_up, hi, lo)


def hard_threshold_msq(z: jax.Array, levels: jax.Array, threshold: float) -> jax.Array:
  """L0 (hard-thresholding) quantizer: Q(z * 1{|z| > threshold}); levels should contain 0."""
  levels = jnp.asarray(levels)
  z = jnp.asarray(z, levels.dtype)
  return msq(jnp.where(jnp.abs(z) > threshold, z, jnp.zeros_like(z)), levels)


def soft_threshold_msq(z: jax.Array, levels: jax.Array, threshold: float) -> jax.Array:
  """L1 (soft-thresholding) quantizer: Q(sign(z) max(|z| - threshold, 0)); levels should hold 0."""
  levels = jnp.asarray(levels)
  z = jnp.asarray(z, levels.dtype)
  return msq(jnp.sign(z) * jnp.maximum(jnp.abs(z) - threshold, 0.0), levels)
