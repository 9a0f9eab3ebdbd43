"""The quantized kernel pytree w_g = B_g alpha_g of ALQ (Qu et al. 2020) and its reconstruction in
Flax layout."""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from qjax.alq.structures import Structure, from_groups, to_groups
from qjax import rules

PyTree = Any


@flax.struct.dataclass
class QuantizedKernel:
  """One layer's kernel as G groups of n weights, each a sum of at most I_max binary bases.

  Group g reconstructs as w_g = B_g (alpha_g * mask_g); a dead slot (mask False) has alpha 0 and
  never comes back. The group's bitwidth I_g is its number of live slots.
  """
  alpha: jax.Array  # (G, I_max) float32, coordinates; 0 on dead slots
  B: jax.Array  # (G, n, I_max) int8 in {-1, +1}, binary bases
  mask: jax.Array  # (G, I_max) bool, live slots
  structure: Structure = flax.struct.field(pytree_node=False)  # grouping of the kernel
  shape: tuple[int, ...] = flax.struct.field(pytree_node=False)  # kernel shape in Flax layout

  @property
  def max_bits(self) -> int:
    return self.alpha.shape[-1]

  def groups(self) -> jax.Array:
    """The reconstructed groups B_g alpha_g, (G, n) float32."""
    return jnp.einsum("gni,gi->gn", self.B.astype(self.alpha.dtype),
                      jnp.where(self.mask, self.alpha, jnp.zeros_like(self.alpha)))

  def kernel(self) -> jax.Array:
    """The reconstructed kernel in the layer's Flax shape."""
    return from_groups(self.groups(), self.structure, self.shape)


def is_quantized(x: Any) -> bool:
  return isinstance(x, QuantizedKernel)


def reconstruct(params: PyTree) -> PyTree:
  """Replace every QuantizedKernel in `params` by its kernel B alpha; other leaves pass through.

  `model.apply({"params": reconstruct(q)}, x)` runs the quantized network with the unchanged
  apply_fn, and `jax.grad` of a loss of `reconstruct(q)`'s output w.r.t. the reconstructed tree
  gives the gradients dl/dw_hat that the ALQ transforms take.
  """
  return jax.tree.map(lambda x: x.kernel() if is_quantized(x) else x, params,
                      is_leaf=is_quantized)


def map_quantized(fn: Callable[..., Any], other: Callable[..., Any], params: PyTree,
                  *rest: PyTree) -> PyTree:
  """tree.map with QuantizedKernel as a leaf: `fn` on quantized kernels, `other` elsewhere."""
  return jax.tree.map(lambda p, *r: fn(p, *r) if is_quantized(p) else other(p, *r), params, *rest,
                      is_leaf=is_quantized)


def quantized_leaves(params: PyTree) -> list[tuple[str, QuantizedKernel]]:
  """('Conv_0', QuantizedKernel) pairs in tree order; the name is `qjax.rules.path_name`."""
  return [(rules.path_name(path), leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(params, is_leaf=is_quantized)
          if is_quantized(leaf)]


def group(kernel: jax.Array, q: QuantizedKernel) -> jax.Array:
  """A kernel-shaped array (e.g. a gradient) in q's (G, n) group layout."""
  return to_groups(kernel, q.structure)
