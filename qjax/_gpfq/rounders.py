"""Rounders for GPFQ (the protocol of `qjax._gpfq.kernels`): row t of neuron j rounded onto the
grid of (group of t, j), or onto a 1-D alphabet, by one of the quantizers of `qjax.alphabets`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from qjax import alphabets
from qjax.grids import Grid, dequantize, round_to

__all__ = ["rounder", "GridRounder", "AlphabetRounder", "QUANTIZERS"]

QUANTIZERS = ("msq", "stochastic", "hard_threshold", "soft_threshold")


def _threshold(z: jax.Array, quantizer: str, lam: Any) -> jax.Array:
  """The sparsity step of `alphabets.hard_threshold_msq` / `soft_threshold_msq`."""
  if quantizer == "hard_threshold":
    return jnp.where(jnp.abs(z) > lam, z, jnp.zeros_like(z))
  if quantizer == "soft_threshold":
    return jnp.sign(z) * jnp.maximum(jnp.abs(z) - lam, 0.0)
  return z


def _stochastic(keys: jax.Array, z: jax.Array, levels: jax.Array, t: Any) -> jax.Array:
  """`alphabets.stochastic_msq` per neuron with its own key folded with t: the draws of neuron
  j depend only on (key j, t), so Q does not depend on how the neurons are sharded."""
  draw = lambda k, zj, lv: alphabets.stochastic_msq(jax.random.fold_in(k, t), zj, lv)  # noqa
  if levels.ndim == 1:
    return jax.vmap(draw, in_axes=(0, 0, None))(keys[0], z, levels)
  return jax.vmap(draw)(keys[0], z, levels)


@struct.dataclass
class GridRounder:
  """GPFQ's Q_t on a grid: row t of neuron j onto the grid of (group of t, neuron j).

  quantizer "msq": nearest level (Eq. 5 of the GPFQ paper on that grid); "stochastic": SPFQ's
  unbiased random rounding between the two neighbouring levels (`alphabets.stochastic_msq`, one
  key per neuron); "hard_threshold" / "soft_threshold": the argument thresholded by `threshold`
  (L0 / L1, the sparse GPFQ of the authors' code) and then rounded to the nearest level.
  """
  scale: jax.Array  # (G, N1) per-neuron
  zero: jax.Array  # (G, N1) per-neuron
  group: jax.Array  # (N0,) int32, shared: the group of each input row
  keys: Any = None  # (1, N1) typed keys, per-neuron (stochastic only)
  threshold: Any = 0.0  # shared scalar lambda (thresholding only)
  maxq: int = struct.field(pytree_node=False, default=1)
  quantizer: str = struct.field(pytree_node=False, default="msq")

  @classmethod
  def from_grid(cls, grid: Grid, N0: int, **kwargs) -> "GridRounder":
    if grid.group_size is not None and grid.num_groups != -(-N0 // grid.group_size):
      raise ValueError(f"grid does not fit N0={N0}: group_size={grid.group_size} needs "
                       f"{-(-N0 // grid.group_size)} groups, the grid has {grid.num_groups}")
    return cls(grid.scale, grid.zero, jnp.asarray(grid.group_index(N0)), maxq=grid.maxq,
               **kwargs)

  def round_row(self, z: jax.Array, t: Any) -> jax.Array:
    k = self.group[t]
    s, zr = self.scale[k], self.zero[k]
    if self.quantizer == "stochastic":
      c = jnp.arange(self.maxq + 1, dtype=s.dtype)[None, :]
      return _stochastic(self.keys, z, dequantize(c, s[:, None], zr[:, None]), t)
    return round_to(_threshold(z, self.quantizer, self.threshold), s, zr, self.maxq)

  def round(self, Z: jax.Array) -> jax.Array:
    """Nearest-level rounding of a whole (N0, N1) matrix (RTN on this grid)."""
    return round_to(Z, self.scale[self.group], self.zero[self.group], self.maxq)


@struct.dataclass
class AlphabetRounder:
  """GPFQ's Q_t on one sorted 1-D alphabet (the paper's per-layer alphabets) with a choice of
  quantizer: `alphabets.msq`, `stochastic_msq` (one key per neuron), `hard_threshold_msq`,
  `soft_threshold_msq`."""
  levels: jax.Array  # (L,) sorted, shared
  keys: Any = None  # (1, N1) typed keys, per-neuron (stochastic only)
  threshold: Any = 0.0  # shared scalar lambda
  quantizer: str = struct.field(pytree_node=False, default="msq")

  def round_row(self, z: jax.Array, t: Any) -> jax.Array:
    if self.quantizer == "stochastic":
      return _stochastic(self.keys, z, self.levels, t)
    if self.quantizer == "hard_threshold":
      return alphabets.hard_threshold_msq(z, self.levels, self.threshold)
    if self.quantizer == "soft_threshold":
      return alphabets.soft_threshold_msq(z, self.levels, self.threshold)
    return alphabets.msq(z, self.levels)

  def round(self, Z: jax.Array) -> jax.Array:
    return alphabets.msq(Z, self.levels)


def rounder(target: Any, N0: int, N1: int, *, quantizer: str = "msq", key: Any = None,
            lambda_: Any = None) -> GridRounder | AlphabetRounder:
  """A GPFQ rounder (`qjax.gpfq_layer(W, X, X_tilde, rounder)`) for a grid or an alphabet.

  Args:
    target: a fitted `Grid` for the (N0, N1) kernel, or a 1-D alphabet (`qjax.alphabets`).
    N0, N1: the kernel's shape.
    quantizer: "msq" | "stochastic" (needs `key`) | "hard_threshold" | "soft_threshold" (need
      `lambda_` >= 0, in the units of the weights).
    key: a jax.random key; split into one key per neuron.
    lambda_: the threshold.
  """
  if quantizer not in QUANTIZERS:
    raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
  kwargs: dict[str, Any] = dict(quantizer=quantizer)
  if quantizer == "stochastic":
    if key is None:
      raise ValueError("quantizer='stochastic' needs a key")
    kwargs["keys"] = jax.random.split(key, N1).reshape(1, N1)
  elif key is not None:
    raise ValueError(f"key is only used with quantizer='stochastic', got quantizer={quantizer!r}")
  if quantizer.endswith("threshold"):
    if lambda_ is None or not (np.isfinite(lambda_) and float(lambda_) >= 0):
      raise ValueError(f"quantizer={quantizer!r} needs lambda_ >= 0, got {lambda_!r}")
    kwargs["threshold"] = jnp.float32(lambda_)
  elif lambda_ is not None:
    raise ValueError(f"lambda_ is only used with the thresholding quantizers, got "
                     f"quantizer={quantizer!r}")
  if isinstance(target, Grid):
    if target.scale.shape[1] != N1:
      raise ValueError(f"grid does not fit N1={N1}: scale shape {target.scale.shape}")
    return GridRounder.from_grid(target, N0, **kwargs)
  levels = jnp.asarray(target, jnp.float32)
  if levels.ndim != 1 or levels.shape[0] == 0:
    raise ValueError(f"target must be a Grid or a non-empty 1-D alphabet, got shape "
                     f"{levels.shape}")
  return AlphabetRounder(jnp.sort(levels), **kwargs)
