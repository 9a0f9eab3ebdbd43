"""RTN: round every kernel to the nearest level of its `qjax.grids` grid, no data.

`quantize_rtn` rounds a whole params tree (on each leaf's default matrix, or on the driver's
views); `rtn_quantizer` is the same rounding as a `qjax.driver.run` quantize_layer, for a pass that
also calibrates static activation scales. On a grid, RTN is also the MSQ baseline of the GPFQ
paper (Eq. 5), so both round onto the levels `qjax.gptq` and `qjax.gpfq(grid=)` use.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import numpy as np

from qjax import mesh as mesh_lib
from qjax import rounding
from qjax import rules
from qjax import views as views_lib
from qjax.grids import GridSpec, fit

__all__ = ["quantize_rtn", "rtn_quantizer"]


def quantize_rtn(params: Any, spec: Any, *, mask: Any = None,
                 views: Mapping[str, Any] | None = None) -> tuple[Any, "views_lib.Targets"]:
  """Round every kernel to the nearest level of its grid: RTN, no data.

  On a grid, MSQ (the memoryless scalar quantizer of the GPFQ paper, Eq. 5, applied to W alone)
  is exactly this rounding, so this is both the RTN and the MSQ baseline on the grids that
  `qjax.gptq_layer` and GPFQ with a grid rounder use (same `GridSpec` and same matrix -> same
  levels).

  Args:
    params: a pytree of arrays (e.g. flax params).
    spec: a `GridSpec` for every layer, or rules {regex: GridSpec or None} (`qjax.rules`:
      first `re.search` match on the layer name wins, 'default' key; None leaves it float).
    mask: pytree of bools marking the kernels (default: leaves named 'kernel').
    views: {layer name: `qjax.views.View` or (N0, N1) index map}: the matrix each kernel is
      fitted and rounded on. Default: `qjax.grids.as_matrix` of each leaf. Pass
      `qjax.views.kernel_views(params, apply_fn, batch)` to use the matrices `qjax.gptq` and
      `qjax.gpfq` quantize (conv rows channel-major, DenseGeneral / Einsum / attend layouts), so
      every method rounds onto identical levels. A scan-stacked leaf with views 'name[i]' gets
      one grid per slice (the layer names the spec rules see). Views of leaves outside `mask`
      are ignored.

  Returns:
    (params with kernels rounded, `qjax.views.Targets` {layer name: Grid} with the views) —
    the targets for `qjax.export.pack`.

  Raises:
    ValueError naming the layer: a view that names no parameter, does not fit its leaf, or
    overlaps another view of the same leaf; a grid that cannot be fitted.
  """
  def check(value, where):
    if value is not None and not isinstance(value, GridSpec):
      raise TypeError(f"{where} must be a qjax.grids.GridSpec or None, got {value!r}")
    return value

  if mask is None:
    mask = rounding.kernel_mask(params)
  flat = jax.tree_util.tree_leaves_with_path(params)
  marks = jax.tree_util.tree_leaves(mask)
  if len(marks) != len(flat):
    raise ValueError(f"mask must have the structure of params ({len(flat)} leaves), got "
                     f"{len(marks)} leaves")
  leaf_names = [rules.path_name(p) for p, _ in flat]
  # leaf name -> [(layer name, view)]: one layer per leaf, or one per scan slice.
  layers = views_lib.layers_of(views, {n: np.shape(x) for n, (_, x) in zip(leaf_names, flat)})
  names = [layer for name, m in zip(leaf_names, marks) if m
           for layer, _ in layers.get(name, [(name, None)])]
  specs = rules.resolve(spec, names, what="spec", check_value=check)
  out, fitted = [], views_lib.Targets()
  for name, (_, leaf), m in zip(leaf_names, flat, marks):
    if not m:
      out.append(leaf)
      continue
    new = leaf
    for layer, view in layers.get(name, [(name, None)]):
      if specs[layer] is None:
        continue
      try:
        if view is None:  # the default matrix: fit and round the kernel itself
          grid = fit(leaf, specs[layer])
          new = grid.round(leaf)
        else:
          M = views_lib.matrix(leaf, view)
          grid = fit(M, specs[layer])
          new = views_lib.put(new, view, grid.round(M))
      except ValueError as e:
        raise ValueError(f"{layer}: {e}") from None
      fitted.add(layer, grid, view)
    out.append(mesh_lib.keep_shardings(leaf, new))  # a leaf on a mesh comes back placed the same
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), out), fitted


def rtn_quantizer(spec: GridSpec):
  """RTN as a `qjax.driver.run` quantize_layer: each layer's matrix (the driver's view, as
  `quantize_rtn(..., views=qjax.views.kernel_views(...))` rounds it) onto the grid of `spec`
  (bits from the driver's `bits` rules when given). No data is used for the weights; with the
  driver's `act=` the pass also calibrates static activation scales on the quantized stream."""
  if not isinstance(spec, GridSpec):
    raise TypeError(f"spec must be a qjax.grids.GridSpec, got {type(spec).__name__}")

  def quantize_layer(name, W, chunks, info):
    del name, chunks
    s = spec if info.bits is None else dataclasses.replace(spec, bits=info.bits)
    return fit(W, s).round(W)
  return quantize_layer
