"""ALQ initialization: structured sketching of pretrained weights (Appendix A.1, Alg. 1)."""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qjax.alq.kernel import QuantizedKernel
from qjax.alq.structures import Structure, as_structure, group_shape, to_groups
from qjax.rounding import is_kernel, path_str

PyTree = Any
Structures = Mapping[str, Structure | str] | Sequence[tuple[str, Structure | str]]

MAX_BITS_LIMIT = 12  # the basis step enumerates 2^I_max sign patterns per group


def check_max_bits(max_bits: Any) -> int:
  if isinstance(max_bits, bool) or not isinstance(max_bits, (int, np.integer)):
    raise TypeError(f"max_bits must be an int, got {max_bits!r}")
  if not 1 <= int(max_bits) <= MAX_BITS_LIMIT:
    raise ValueError(f"max_bits must be in 1..{MAX_BITS_LIMIT} (the basis step enumerates "
                     f"2^max_bits sign patterns), got {max_bits}")
  return int(max_bits)


def assign_structures(params: PyTree, structures: Structures) -> dict[str, Structure]:
  """Module path of every kernel -> its structure; the first pattern (re.fullmatch) wins.

  Kernels matched by no pattern stay float. Raises ValueError for a pattern that matches no
  kernel and for a structure that does not fit the layer it matched.
  """
  pairs = list(structures.items()) if isinstance(structures, Mapping) else list(structures)
  if not pairs:
    raise ValueError("structures is empty: give {module-path pattern: structure}")
  parsed = [(pattern, re.compile(pattern), as_structure(s)) for pattern, s in pairs]
  used = set()
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if not is_kernel(path, leaf):
      continue
    layer = path_str(path[:-1])
    for pattern, regex, structure in parsed:
      if regex.fullmatch(layer):
        group_shape(structure, tuple(leaf.shape), layer)
        out[layer] = structure
        used.add(pattern)
        break
  unused = [p for p, _, _ in parsed if p not in used]
  if unused:
    layers = [path_str(p[:-1]) for p, l in jax.tree_util.tree_leaves_with_path(params)
              if is_kernel(p, l)]
    raise ValueError(f"structure pattern(s) {unused} match no kernel (or only kernels an earlier "
                     f"pattern took); kernels are {layers}")
  return out


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

  Every kernel whose module path (e.g. 'Conv_0', 'Block_1/Dense_0') fully matches a pattern of
  `structures` is cut into groups (Appendix A.2) and each group w_g is greedily sketched:
  eps = w_g; repeat  beta_i = sign(eps),  B_g = [B_g, beta_i],  alpha_g = (B^T B)^{-1} B^T w_g,
  eps = w_g - B_g alpha_g;  while ||eps||^2 / ||w_g||^2 > sigma and i < max_bits. Each new basis
  is outside the span of the previous ones (Thm. A.1), so B_g^T B_g stays invertible and the
  residual never increases.

  Args:
    params: float parameters (e.g. flax `params`); kernels are leaves named `kernel`.
    structures: {module-path regex: structure}, e.g. {'Conv_.*': 'kernel-wise',
      'Dense_0': 'subchannel-wise(2)'}; first match wins, unmatched kernels stay float.
    max_bits: I_max, the number of slots per group (>= 1).
    sigma: residual threshold on the relative squared residual (>= 0).

  Returns:
    params with each matched kernel replaced by a QuantizedKernel (alphas made positive).
  """
  max_bits = check_max_bits(max_bits)
  if not np.isfinite(sigma) or sigma < 0:
    raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
  assigned = assign_structures(params, structures)

  def leaf(path, x):
    if not is_kernel(path, x):
      return x
    layer = path_str(path[:-1])
    if layer not in assigned:
      return x
    structure = assigned[layer]
    alpha, B, mask = sketch_groups(to_groups(jnp.asarray(x), structure), max_bits=max_bits,
                                   sigma=float(sigma))
    return QuantizedKernel(alpha=alpha, B=B, mask=mask, structure=structure,
                           shape=tuple(x.shape))

  return jax.tree_util.tree_map_with_path(leaf, params)
