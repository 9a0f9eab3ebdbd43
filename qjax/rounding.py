"""Data-free per-tensor symmetric rounding (the RTN baseline), magnitude pruning, sparsity.

Layers are named and selected as everywhere in qjax (`qjax.rules`): a leaf's name is
`rules.path_name` of its key path ('Conv_0' for 'Conv_0/kernel'), per-layer bits are one int, a
callable on that name, or {regex: bits} rules with an optional 'default'.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np

from qjax import rules

PyTree = Any
# Bits per weight: one int, a callable on the layer name, or {regex: bits} (`qjax.rules`).
BitsSpec = Union[int, Callable[[str], int], Mapping[str, int]]
# The per-tensor symmetric grid has 2^(b-1) - 1 positive levels: b >= 2 (2 bits is already the
# ternary grid {-a, 0, a}; there is no 1-bit grid of this kind).
MIN_BITS = 2
MAX_BITS = 16


def check_grid_bits(value: Any, where: str = "bits") -> int:
  """`value` as the bits of a per-tensor symmetric grid, in 2..16 (`qjax.rules.check_bits`)."""
  return rules.check_bits(value, where, low=MIN_BITS, high=MAX_BITS)


def is_kernel(path: tuple, leaf: Any) -> bool:
  """True for the `kernel` leaf of a Dense/Conv layer (flax naming)."""
  del leaf
  return bool(path) and rules.key_name(path[-1]) == "kernel"


def kernel_mask(params: PyTree) -> PyTree:
  """A pytree of bools, True on Dense/Conv kernels: the default quantization mask."""
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def grid_half(bits: int) -> int:
  """Positive levels of the b-bit per-tensor grid, 2^(b-1) - 1 (clamped to 1 below 2 bits, for
  callers that allow b = 1; `quantize_uniform` and the PSGD targets require b >= 2)."""
  return max(2 ** (bits - 1) - 1, 1)


def uniform_grid_step(w: jax.Array, bits: int) -> jax.Array:
  """delta = absmax / (2^(b-1) - 1); for b = 1 the grid is {-absmax, 0, absmax} (ternary)."""
  half = grid_half(bits)
  absmax = jnp.max(jnp.abs(w))
  return jnp.where(absmax > 0, absmax / half, jnp.ones_like(absmax))


def round_to_uniform_grid(w: jax.Array, bits: int) -> jax.Array:
  """Round a tensor to its per-tensor symmetric grid delta * {-(2^(b-1)-1), ..., 2^(b-1)-1}.

  Raises:
    ValueError, TypeError: bits not an int in 2..16.
  """
  bits = check_grid_bits(bits)
  half = grid_half(bits)
  delta = uniform_grid_step(w, bits)
  return (jnp.clip(jnp.round(w / delta), -half, half) * delta).astype(w.dtype)


def check_bits_spec(bits: BitsSpec, what: str = "bits") -> None:
  """Eager validation of a bits spec: an int or rule values in 2..16, valid patterns (a
  callable's results are checked when a layer is looked up)."""
  if callable(bits) and not isinstance(bits, Mapping):
    return
  rules.check(bits, what, check_grid_bits)


def layer_bits(bits: BitsSpec, names: list[str], what: str = "bits") -> dict[str, int]:
  """The bits of every layer name: `qjax.rules.resolve` for an int or a rule set (unused
  patterns and unmatched layers without 'default' are errors), or `bits(name)` for a callable;
  every value checked to be an int in 2..16."""
  if callable(bits) and not isinstance(bits, Mapping):
    return {n: check_grid_bits(bits(n), f"{what} for layer {n!r}") for n in names}
  return rules.resolve(bits, names, what=what, check_value=check_grid_bits)


def quantize_uniform(params: PyTree, bits: BitsSpec, *, mask: PyTree | None = None) -> PyTree:
  """Layer-wise round-to-nearest onto a per-tensor symmetric uniform grid, no data.

  b bits give the 2^b - 1 levels delta * {-(2^(b-1)-1), ..., 2^(b-1)-1}, delta = max|w| /
  (2^(b-1)-1), so b >= 2 (2 bits: ternary {-max|w|, 0, max|w|}).

  Args:
    params: a pytree of arrays (e.g. flax `params`).
    bits: bits per weight (2..16): one int, a callable on the layer name (`qjax.rules.path_name`,
      e.g. 'Conv_0'), or rules {regex: bits} (`re.search`, first match wins, optional 'default';
      a pattern matching no quantized layer is an error).
    mask: pytree of bools (same structure) marking leaves to quantize; default: every leaf named
      `kernel` (Dense and Conv weights). Biases and normalisation parameters stay float.

  Returns:
    params with masked leaves replaced by their rounded values (same dtypes).

  Raises:
    ValueError, TypeError: bits that are not ints in 2..16 (naming the layer), bad rules.
  """
  if mask is None:
    mask = kernel_mask(params)
  check_bits_spec(bits)
  masked = [rules.path_name(path) for (path, _), m in
            zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(mask)) if m]
  bits_of = layer_bits(bits, masked)

  def leaf_fn(path, w, m):
    if not m:
      return w
    return round_to_uniform_grid(w, bits_of[rules.path_name(path)])

  return jax.tree_util.tree_map_with_path(leaf_fn, params, mask)


def sparsity(params: PyTree, *, mask: PyTree | None = None) -> dict[str, float]:
  """Fraction of exact zeros per masked leaf (default: kernels) and `overall` (weighted by size).

  Leaves are named by `qjax.rules.path_name` ('Conv_0' for its kernel). A bare array is one
  tensor: `sparsity(np.zeros(3)) == {'overall': 1.0}` (it is counted whatever its name).
  """
  if mask is None:
    if isinstance(params, (np.ndarray, jax.Array, np.generic)):
      mask = True  # a bare array: the one tensor to measure
    else:
      mask = kernel_mask(params)
  out: dict[str, float] = {}
  zeros = total = 0
  for (path, w), m in zip(jax.tree_util.tree_leaves_with_path(params),
                          jax.tree_util.tree_leaves(mask)):
    if not m:
      continue
    w = np.asarray(w)
    z = int(np.sum(w == 0))
    if path:
      out[rules.path_name(path)] = z / w.size
    zeros += z
    total += w.size
  out["overall"] = zeros / total if total else 0.0
  return out


def kernel_names(params: PyTree) -> list[str]:
  """Layer names (`qjax.rules.path_name`) of the Dense/Conv kernels in creation order (flax keeps
  submodules in that order; `jax.tree_util` would sort the keys instead)."""
  names = []

  def visit(tree, prefix):
    for key, sub in tree.items():
      if hasattr(sub, "items"):  # dict or FrozenDict
        visit(sub, prefix + (key,))
      elif key == "kernel":
        names.append(rules.path_name(prefix + (key,)))

  visit(params, ())
  return names


def prune_smallest(params: PyTree, fraction: float, *, scope: str = "layer",
                   mask: PyTree | None = None) -> PyTree:
  """One-shot magnitude pruning: zero the `fraction` smallest |w| of the masked leaves.

  Args:
    params: a pytree of arrays.
    fraction: in [0, 1], the fraction of weights set to exactly 0.
    scope: 'layer' prunes every leaf to the same fraction (layer-wise, like the rounding);
      'global' uses one threshold over all masked leaves (small layers keep more weights).
    mask: leaves to prune; default every kernel (`kernel_mask`).

  Returns:
    params with the pruned leaves (same dtypes); ties at the threshold are pruned too.
  """
  if scope not in ("layer", "global"):
    raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"fraction must be in [0, 1], got {fraction}")
  mask = kernel_mask(params) if mask is None else mask

  def threshold(w: jax.Array) -> jax.Array:
    k = int(round(fraction * w.size))
    return jnp.sort(jnp.abs(w).ravel())[k - 1] if k else jnp.asarray(-1.0, w.dtype)

  if scope == "global":
    kernels = [w for w, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m]
    shared = threshold(jnp.concatenate([jnp.abs(w).ravel() for w in kernels]))

  def leaf(w, m):
    if not m:
      return w
    t = shared if scope == "global" else threshold(w)
    return jnp.where(jnp.abs(w) <= t.astype(w.dtype), jnp.zeros_like(w), w)

  return jax.tree.map(leaf, params, mask)
