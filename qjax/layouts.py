"""Matrix layouts: a weight op's weight and data operands as the matrices W and X.

A weight op is a matrix problem as in GPFQ (Zhang, Zhou & Saab, "Post-training quantization for
neural networks with provable guarantees", Eq. 7-8): W (N0, N1) = (the weight's contracting dims,
flattened) x (its free dims, flattened), X (m, N0) = the other operand with every other dim
flattened into rows. A `dot_general` batch dim on the weight (grouped or per-expert weights) and
a conv's `feature_group_count` give G independent problems; they are laid out side by side:
W (N0, G*N1g), X (m, G*N0), problem g = (X[:, g*N0:(g+1)*N0], W[:, g*N1g:(g+1)*N1g])
(`group_slices`). Rows of a conv matrix are channel-major (Cin, k1, ..., kn), matching its
patches (`qjax.patches`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qjax.provenance import Prov, operand_index


@dataclasses.dataclass(frozen=True)
class MatrixLayout:
  """How a weight op's weight operand and data operand become W (N0, G*N1g) and X (m, G*N0).

  Attributes:
    kind: 'dot_general' or 'conv'.
    side: which operand of the eqn is the weight (0 or 1).
    w_perm: permutation of the weight operand to (group dims, contracting dims, free dims).
    w_shapes: sizes of those three dim groups (after the permutation).
    x_perm: permutation of the data operand to (group dims, free dims, contracting dims)
      (dot_general only).
    groups: G, independent problems.
    N0, N1g: rows of one problem, neurons of one problem.
  """
  kind: str
  side: int
  w_perm: tuple[int, ...]
  w_shapes: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
  x_perm: tuple[int, ...]
  groups: int
  N0: int
  N1g: int

  @property
  def N1(self) -> int:
    return self.groups * self.N1g


def dot_layout(eqn, side: int) -> MatrixLayout:
  """The layout of a dot_general eqn whose operand `side` is the weight."""
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  wc, xc = (rc, lc) if side == 1 else (lc, rc)
  wb, xb = (rb, lb) if side == 1 else (lb, rb)
  w_shape = eqn.invars[side].aval.shape
  x_shape = eqn.invars[1 - side].aval.shape
  w_free = tuple(d for d in range(len(w_shape)) if d not in wc and d not in wb)
  x_free = tuple(d for d in range(len(x_shape)) if d not in xc and d not in xb)
  sizes = lambda dims: tuple(w_shape[d] for d in dims)  # noqa: E731
  return MatrixLayout(
      kind="dot_general", side=side, w_perm=tuple(wb) + tuple(wc) + w_free,
      w_shapes=(sizes(wb), sizes(wc), sizes(w_free)),
      x_perm=tuple(xb) + x_free + tuple(xc), groups=math.prod(sizes(wb)),
      N0=math.prod(sizes(wc)), N1g=math.prod(sizes(w_free)))


def conv_layout(eqn) -> MatrixLayout:
  """The layout of a conv_general_dilated eqn (its kernel, operand 1, is the weight)."""
  dn = eqn.params["dimension_numbers"]
  out_d, in_d, *spatial = dn.rhs_spec
  w_shape = eqn.invars[1].aval.shape
  G = int(eqn.params["feature_group_count"])
  kernel = tuple(w_shape[d] for d in spatial)
  return MatrixLayout(
      kind="conv", side=1, w_perm=(in_d,) + tuple(spatial) + (out_d,),
      w_shapes=((), (w_shape[in_d],) + kernel, (w_shape[out_d],)), x_perm=(), groups=G,
      N0=w_shape[in_d] * math.prod(kernel), N1g=w_shape[out_d] // G)


@functools.partial(jax.jit, static_argnames=("layout",))
def weight_to_matrix(w: jax.Array, layout: MatrixLayout) -> jax.Array:
  """The weight operand as W (N0, G*N1g), problem g in columns [g*N1g, (g+1)*N1g)."""
  w = jnp.transpose(w, layout.w_perm)
  if layout.kind == "conv":  # (Cin_g, k1..kn, Cout): Cout is already group-major
    return w.reshape(layout.N0, -1)
  w = w.reshape(layout.groups, layout.N0, layout.N1g)
  if layout.groups == 1:
    return w[0]
  return jnp.transpose(w, (1, 0, 2)).reshape(layout.N0, layout.N1)


def leaf_index(leaf_shape: Sequence[int], prov: Prov, layout: MatrixLayout) -> np.ndarray:
  """(N0, N1) int64: the flat index into the leaf of every entry of the op's matrix W, so
  W == leaf.reshape(-1)[leaf_index(...)] (a scan slice covers part of the leaf)."""
  return np.asarray(weight_to_matrix(operand_index(leaf_shape, prov), layout), dtype=np.int64)


def matrix_to_weight(Q: jax.Array, layout: MatrixLayout) -> jax.Array:
  """Inverse of `weight_to_matrix`: W (N0, G*N1g) back to the weight operand's layout."""
  bshape, cshape, fshape = layout.w_shapes
  if (layout.groups == 1 and len(cshape) == 1 and len(fshape) == 1 and not bshape
      and layout.w_perm == (0, 1)):
    return Q  # a Dense-layout kernel is its own matrix (no reshape: keeps a sharded Q as is)
  return _matrix_to_weight(Q, layout)


@functools.partial(jax.jit, static_argnames=("layout",))
def _matrix_to_weight(Q: jax.Array, layout: MatrixLayout) -> jax.Array:
  bshape, cshape, fshape = layout.w_shapes
  if layout.kind == "conv":
    w = Q.reshape(cshape + fshape)
  else:
    w = jnp.transpose(Q.reshape(layout.N0, layout.groups, layout.N1g), (1, 0, 2))
    w = w.reshape(bshape + cshape + fshape)
  return jnp.transpose(w, np.argsort(layout.w_perm))


def group_slices(N0: int, N1: int, groups: int) -> list[tuple[slice, slice]]:
  """(rows of X, columns of W) of each of the G problems of a layer laid out side by side."""
  if N1 % groups:
    raise ValueError(f"N1={N1} is not divisible by the {groups} groups")
  n1 = N1 // groups
  return [(slice(g * N0, (g + 1) * N0), slice(g * n1, (g + 1) * n1)) for g in range(groups)]


@functools.partial(jax.jit, static_argnames=("layout",))
def dot_rows(x: jax.Array, layout: MatrixLayout) -> jax.Array:
  """The data operand of a dot_general as X (m, G*N0) (rows: every non-contracted dim)."""
  x = jnp.transpose(x, layout.x_perm)
  if layout.groups == 1:
    return x.reshape(-1, layout.N0)
  x = x.reshape(layout.groups, -1, layout.N0)
  return jnp.transpose(x, (1, 0, 2)).reshape(x.shape[1], -1)

