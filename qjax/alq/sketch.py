"""ALQ initialization: structured sketching of pretrained weights (Appendix A.1, Alg. 1)."""
from __future__ import annotations

import functools
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


def _fit(w: jax.Array, B: jax.Array, mask: jax.Array, h: jax.Array | None = None) -> jax.Array:
  """Least-squares coordinates on the live bases, per group (Eq. 23 when weighted by h).

  alpha = (B^T H B)^{-1} B^T H w restricted to live slots; dead slots get an identity row so the
  system stays invertible and solve to 0. Groups whose system is singular return NaN.
  """
  Bf = B.astype(w.dtype)
  m = mask.astype(w.dtype)
  hw = w if h is None else h * w
  gram = jnp.einsum("gni,gnj->gij", Bf, Bf if h is None else h[..., None] * Bf)
  rhs = jnp.einsum("gni,gn->gi", Bf, hw) * m
  gram = gram * m[:, :, None] * m[:, None, :] + jax.vmap(jnp.diag)(1 - m)
  return jnp.linalg.solve(gram, rhs[..., None])[..., 0] * m


def make_positive(alpha: jax.Array, B: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Flip the sign of every negative alpha_i and of its basis column; B alpha is unchanged."""
  sign = jnp.where(alpha < 0, -1, 1).astype(jnp.int8)
  return alpha * sign.astype(alpha.dtype), B * sign[:, None, :]


@functools.partial(jax.jit, static_argnames="max_bits")
def sketch_groups(w: jax.Array, *, max_bits: int, sigma: float | jax.Array
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Alg. 1 on groups w (G, n): add b_i = sign(eps), refit all alphas, until done.

  A group stops when its relative residual ||eps||^2 / ||w||^2 <= sigma or after max_bits bases.
  (The appendix writes the element-wise ||eps ./ w||^2, which blows up on near-zero weights; the
  norm ratio is the scale-free criterion of the sketching paper it adapts.)

  Returns alpha (G, I_max) float32 >= 0, B (G, n, I_max) int8, mask (G, I_max) bool.
  """
  w = w.astype(jnp.float32)
  g, n = w.shape
  B = jnp.ones((g, n, max_bits), jnp.int8)
  alpha = jnp.zeros((g, max_bits), jnp.float32)
  mask = jnp.zeros((g, max_bits), bool)
  norm2 = jnp.sum(w * w, axis=1)
  eps = w
  active = jnp.ones((g,), bool)
  for i in range(max_bits):
    active = active & (jnp.sum(eps * eps, axis=1) > sigma * norm2)
    sign = jnp.where(eps >= 0, 1, -1).astype(jnp.int8)  # sign(0) := +1 keeps B binary
    B = B.at[:, :, i].set(jnp.where(active[:, None], sign, B[:, :, i]))
    mask = mask.at[:, i].set(active)
    alpha = jnp.where(active[:, None], _fit(w, B, mask), alpha)
    eps = w - jnp.einsum("gni,gi->gn", B.astype(jnp.float32), alpha)
  alpha, B = make_positive(alpha, B)
  return alpha, B, mask


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
                                   sigma=jnp.float32(sigma))
    return QuantizedKernel(alpha=alpha, B=B, mask=mask, structure=structure,
                           shape=tuple(x.shape))

  return jax.tree_util.tree_map_with_path(leaf, params)
