"""ALQ initialization: structured sketching of pretrained weights (Qu et al. 2020, Appendix A.1,
Alg. 1).

References:
  Qu, Zhou, Cheng & Thiele, `Adaptive Loss-aware Quantization for Multi-bit Networks
  <https://arxiv.org/abs/1912.08883>`_, CVPR 2020.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qjax import rules
from qjax.alq.kernel import QuantizedKernel
from qjax.alq.structures import Structure, as_structure, group_shape, to_groups
from qjax.rounding import is_kernel

PyTree = Any
Structures = (Structure | str | Mapping[str, Structure | str]
              | Sequence[tuple[str, Structure | str]])

MAX_BITS_LIMIT = 12  # the basis step enumerates 2^I_max sign patterns per group


def check_max_bits(max_bits: Any) -> int:
  """I_max as an int in 1..MAX_BITS_LIMIT (the basis step enumerates 2^I_max sign patterns)."""
  return rules.check_bits(max_bits, "max_bits (the basis step enumerates 2^max_bits sign "
                          "patterns per group)", low=1, high=MAX_BITS_LIMIT)


def _kernels(params: PyTree) -> dict[str, Any]:
  """Layer name (`qjax.rules.path_name`, e.g. 'Conv_0') -> kernel, in tree order."""
  return {rules.path_name(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(params) if is_kernel(path, leaf)}


def _check_structure(value: Any, where: str) -> Structure:
  try:
    return as_structure(value)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from e


def assign_structures(params: PyTree, structures: Structures) -> dict[str, Structure]:
  """Layer name of every kernel -> its structure, by the rules of `qjax.rules`.

  `structures` is one structure for every kernel, or {pattern: structure} (or a sequence of
  (pattern, structure) pairs) tried in order with `re.search` on the layer name ('Conv_0',
  'Block_1/Dense_0'); the first match wins and a 'default' entry serves the rest. Kernels that
  match nothing (and no 'default') stay float. Anchor a pattern ('^Dense_1$') to select exactly
  one layer: 'Dense_1' also matches 'Dense_10'.

  Raises:
    ValueError: a pattern that matches no kernel, an unparsable structure, or a structure that
      does not fit the layer it matched (named).
  """
  if isinstance(structures, (str, Structure)):
    table: Any = structures
  else:
    pairs = list(structures.items()) if isinstance(structures, Mapping) else list(structures)
    if not pairs:
      raise ValueError("structures is empty: give {layer pattern: structure}")
    table = dict(pairs)
  kernels = _kernels(params)
  assigned = rules.resolve(table, kernels, what="structures", check_value=_check_structure,
                           default=None)
  out = {}
  for layer, structure in assigned.items():
    if structure is not None:
      group_shape(structure, tuple(kernels[layer].shape), layer)
      out[layer] = structure
  return out


def _check_finite(w: Any, layer: str) -> None:
  """Sketching a NaN or inf silently zeroes its group; refuse it, naming the layer."""
  bad = ~np.isfinite(np.asarray(w))
  if np.any(bad):
    raise ValueError(f"layer {layer!r}: kernel has {int(np.sum(bad))} non-finite weight(s) "
                     f"(NaN or inf), first at index {tuple(int(i) for i in np.argwhere(bad)[0])}; "
                     f"ALQ cannot sketch them")


def _least_squares(w: np.ndarray, B: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """alpha = (B^T B)^{-1} B^T w on the live slots of each group (float64); dead slots get 0."""
  m = mask.astype(np.float64)
  gram = np.einsum("gni,gnj->gij", B, B) * m[:, :, None] * m[:, None, :]
  gram += np.eye(m.shape[1])[None] * (1 - m)[:, None, :]  # identity rows keep dead slots at 0
  rhs = np.einsum("gni,gn->gi", B, w) * m
  return np.linalg.solve(gram, rhs[..., None])[..., 0] * m


def sketch_groups(w: Any, *, max_bits: int, sigma: float
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Alg. 1 on groups w (G, n): add b_i = sign(eps), refit all alphas, until done.

  A group stops when its relative residual ||eps||^2 / ||w||^2 <= sigma or after max_bits bases.
  (The appendix writes the element-wise ||eps ./ w||^2, which blows up on near-zero weights; the
  norm ratio is the scale-free criterion of the sketching paper it adapts.) Runs once, eagerly,
  in float64 numpy.

  Returns alpha (G, I_max) float32 > 0 on live slots, B (G, n, I_max) int8, mask (G, I_max) bool.
  """
  w = np.asarray(w, np.float64)
  g, n = w.shape
  B = np.ones((g, n, max_bits))
  alpha = np.zeros((g, max_bits))
  mask = np.zeros((g, max_bits), bool)
  norm2 = np.sum(w * w, axis=1)
  eps = w
  active = np.ones((g,), bool)
  for i in range(max_bits):
    active &= np.sum(eps * eps, axis=1) > sigma * norm2
    candidate = np.where(eps < 0, -1.0, 1.0)  # sign(0) := +1 keeps B binary
    B[:, :, i] = candidate
    mask[:, i] = active
    # Thm. A.1 makes the new basis independent in exact arithmetic; once the residual is at
    # round-off level (e.g. more bases than weights) its signs are noise and may not be.
    active &= np.linalg.matrix_rank(B * mask[:, None, :]) == i + 1
    mask[:, i] = active
    B[:, :, i] = np.where(active[:, None], candidate, 1.0)
    alpha = np.where(active[:, None], _least_squares(w, B, mask), alpha)
    eps = w - np.einsum("gni,gi->gn", B, alpha)
  sign = np.where(alpha < 0, -1.0, 1.0)  # make alphas positive; B alpha is unchanged
  return (jnp.asarray(alpha * sign, jnp.float32), jnp.asarray(B * sign[:, None, :], jnp.int8),
          jnp.asarray(mask))


def init(params: PyTree, structures: Structures, *, max_bits: int, sigma: float) -> PyTree:
  """ALQ initialization by structured sketching (Appendix A.1, Alg. 1).

  Every kernel whose layer name (`qjax.rules.path_name`: 'Conv_0', 'Block_1/Dense_0') a rule of
  `structures` selects is cut into groups (Appendix A.2) and each group w_g is greedily sketched:
  eps = w_g; repeat  beta_i = sign(eps),  B_g = [B_g, beta_i],  alpha_g = (B^T B)^{-1} B^T w_g,
  eps = w_g - B_g alpha_g;  while ||eps||^2 / ||w_g||^2 > sigma and i < max_bits. Each new basis
  is outside the span of the previous ones (Thm. A.1), so B_g^T B_g stays invertible and the
  residual never increases.

  Args:
    params: float parameters (e.g. flax `params`); kernels are leaves named `kernel`.
    structures: one structure for every kernel, or {layer regex: structure} (`re.search`, first
      match wins, optional 'default'), e.g. {'^Conv_': 'kernel-wise',
      '^Dense_0$': 'subchannel-wise(2)'}; unmatched kernels stay float (`assign_structures`).
    max_bits: I_max, the number of slots per group (>= 1).
    sigma: residual threshold on the relative squared residual (>= 0).

  Returns:
    params with each matched kernel replaced by a QuantizedKernel (alphas made positive).

  Raises:
    ValueError: a selected kernel with a NaN or inf weight (named), bad `max_bits` / `sigma`, and
      what `assign_structures` raises.

  References:
    Qu et al. 2020, Appendix A.1-A.2, Alg. 1, Thm. A.1.
  """
  max_bits = check_max_bits(max_bits)
  if not np.isfinite(sigma) or sigma < 0:
    raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
  assigned = assign_structures(params, structures)
  for layer, w in _kernels(params).items():
    if layer in assigned:
      _check_finite(w, layer)

  def leaf(path, x):
    if not is_kernel(path, x):
      return x
    layer = rules.path_name(path)
    if layer not in assigned:
      return x
    structure = assigned[layer]
    alpha, B, mask = sketch_groups(to_groups(jnp.asarray(x), structure), max_bits=max_bits,
                                   sigma=float(sigma))
    return QuantizedKernel(alpha=alpha, B=B, mask=mask, structure=structure,
                           shape=tuple(x.shape))

  return jax.tree_util.tree_map_with_path(leaf, params)
