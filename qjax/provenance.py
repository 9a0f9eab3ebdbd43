"""Provenance: which parameter leaf, after which layout steps, a program variable is.

The candidate leaves of a params tree (`param_leaves`) are the roots. `qjax.program`'s walker
follows each one through layout-only ops (casts, reshapes, transposes, ...) and scan slices,
recording the chain in a `Prov`. The chain only moves, relabels or casts entries (a scan slice
takes part of the leaf), so every operand entry has a flat leaf index (`operand_index`) and a
quantized operand can be written back into its leaf (`write_back`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from qjax import rules

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Prov:
  """A variable that is parameter leaf `leaf` after the layout `steps`.

  Attributes:
    leaf: index into `qjax.program.Program.leaves`.
    steps: ('eqn', JaxprEqn) layout ops and ('index', i) scan slices, applied in order.
    replicated: a broadcast in the chain copies entries (fine for a bias, not for a weight).
  """
  leaf: int
  steps: tuple = ()
  replicated: bool = False

  @property
  def slice_key(self) -> tuple[int, ...]:
    """The scan iterations that select this slice of the leaf (() for the whole leaf)."""
    return tuple(s[1] for s in self.steps if s[0] == "index")


def apply_steps(value: jax.Array, steps: Sequence[tuple], *, index_only: bool = False
                ) -> jax.Array:
  """The layout chain applied to a leaf value (`index_only`: skip dtype casts, for iotas)."""
  for step in steps:
    if step[0] == "index":
      value = value[step[1]]
      continue
    eqn = step[1]
    if eqn.primitive.name == "convert_element_type":
      if index_only:
        continue
    value = eqn.primitive.bind(value, **eqn.params)
  return value


def operand_index(leaf_shape: Sequence[int], prov: Prov) -> jax.Array:
  """int32, the operand's shape: the flat leaf index of every entry of the operand."""
  iota = jnp.arange(math.prod(leaf_shape), dtype=jnp.int32).reshape(tuple(leaf_shape))
  return apply_steps(iota, prov.steps, index_only=True)


def write_back(leaf_value: jax.Array, prov: Prov, operand: jax.Array) -> jax.Array:
  """The leaf with the entries that `prov.steps` maps onto the operand replaced by `operand`.

  The chain is a permutation of entries (plus casts and slices), so applying it to an iota of
  flat leaf indices tells where each operand entry lives in the leaf.
  """
  if not prov.steps and operand.shape == leaf_value.shape:  # the leaf is the operand
    return operand if operand.dtype == leaf_value.dtype else operand.astype(leaf_value.dtype)
  leaf_value = jnp.asarray(leaf_value)  # a NumPy leaf has no .at
  where = operand_index(leaf_value.shape, prov)
  flat = leaf_value.reshape(-1).at[where.reshape(-1)].set(
      operand.reshape(-1).astype(leaf_value.dtype))
  return flat.reshape(leaf_value.shape)


def strip_value(path: tuple) -> tuple:
  """Drop trailing `.value` attribute keys (boxed params: nn.Partitioned, nnx.Variable)."""
  path = tuple(path)
  while path and getattr(path[-1], "name", None) == "value" and not hasattr(path[-1], "key"):
    path = path[:-1]
  return path


def param_leaves(params: PyTree) -> tuple[list, list[int], list[str], Any, int]:
  """(candidate leaves, their positions in params' flat leaves, names, treedef, n flat).

  A linen variables dict (a mapping with a 'params' mapping) offers its 'params' collection;
  any other pytree offers all its floating-point leaves.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  variables = isinstance(params, Mapping) and isinstance(params.get("params"), Mapping)
  leaves, positions, names = [], [], []
  for i, (path, leaf) in enumerate(flat):
    path = strip_value(path)
    if variables and rules.key_name(path[0]) != "params":
      continue
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      continue
    leaves.append(leaf)
    positions.append(i)
    names.append(rules.path_name(path) or "<params>")
  return leaves, positions, names, treedef, len(flat)
