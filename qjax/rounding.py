"""Data-free per-tensor symmetric rounding (the MSQ/RTN baseline) and sparsity accounting."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def is_kernel(path: tuple, leaf: Any) -> bool:
  """True for the `kernel` leaf of a Dense/Conv layer (flax naming)."""
  del leaf
  last = path[-1]
  name = getattr(last, "key", getattr(last, "name", last))
  return name == "kernel"


def kernel_mask(params: PyTree) -> PyTree:
  """A pytree of bools, True on Dense/Conv kernels: the default quantization mask."""
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def check_bits(bits: Any, name: str = "bits") -> int:
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {bits!r}")
  if not 1 <= int(bits) <= 16:
    raise ValueError(f"{name} must be in 1..16, got {bits}")
  return int(bits)


def grid_half(bits: int) -> int:
  """Positive levels of the b-bit per-tensor grid, 2^(b-1) - 1 (1 at b = 1: ternary)."""
  return max(2 ** (bits - 1) - 1, 1)


def uniform_grid_step(w: jax.Array, bits: int) -> jax.Array:
  """delta = absmax / (2^(b-1) - 1); for b = 1 the grid is {-absmax, 0, absmax} (ternary)."""
  half = grid_half(bits)
  absmax = jnp.max(jnp.abs(w))
  return jnp.where(absmax > 0, absmax / half, jnp.ones_like(absmax))


def round_to_uniform_grid(w: jax.Array, bits: int) -> jax.Array:
  """Round a tensor to its per-tensor symmetric grid delta * {-(2^(b-1)-1), ..., 2^(b-1)-1}."""
  half = grid_half(bits)
  delta = uniform_grid_step(w, bits)
  return (jnp.clip(jnp.round(w / delta), -half, half) * delta).astype(w.dtype)


def quantize_uniform(params: PyTree, bits: int | Callable[[str], int], *,
                     mask: PyTree | None = None) -> PyTree:
  """Layer-wise round-to-nearest onto a per-tensor symmetric uniform grid, no data.

  Args:
    params: a pytree of arrays (e.g. flax `params`).
    bits: bits per weight, or a callable mapping a leaf's '/'-joined path to its bits.
    mask: pytree of bools (same structure) marking leaves to quantize; default: every leaf named
      `kernel` (Dense and Conv weights). Biases and normalisation parameters stay float.

  Returns:
    params with masked leaves replaced by their rounded values (same dtypes).
  """
  if mask is None:
    mask = kernel_mask(params)
  if not callable(bits):
    check_bits(bits)

  def leaf_fn(path, w, m):
    if not m:
      return w
    b = check_bits(bits(path_str(path)), "bits") if callable(bits) else bits
    return round_to_uniform_grid(w, b)

  return jax.tree_util.tree_map_with_path(leaf_fn, params, mask)


def path_str(path: tuple) -> str:
  """'/'-joined names of a jax key path, e.g. 'Conv_0/kernel'."""
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
  return "/".join(parts)


def sparsity(params: PyTree, *, mask: PyTree | None = None) -> dict[str, float]:
  """Fraction of exact zeros per masked leaf (default: kernels) and `overall` (weighted by size)."""
  if mask is None:
    mask = kernel_mask(params)
  out: dict[str, float] = {}
  zeros = total = 0
  for (path, w), m in zip(jax.tree_util.tree_leaves_with_path(params),
                          jax.tree_util.tree_leaves(mask)):
    if not m:
      continue
    w = np.asarray(w)
    z = int(np.sum(w == 0))
    out[path_str(path)] = z / w.size
    zeros += z
    total += w.size
  out["overall"] = zeros / total if total else 0.0
  return out
