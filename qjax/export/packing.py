"""`pack` / `unpack`: quantized params to `Packed` leaves (`qjax.export.codes`) and back, exactly.

Every leaf named in the targets becomes a `Packed`; the others stay as they are. A scan-stacked
leaf with one grid per slice ('name[i]', every slice quantized, one bits / group size) is packed
as one matrix, the slices' matrices side by side.

Activation grids (`qjax.ActSpec`, W8A8 / W4A8) travel with the packed weights: `pack(...,
act=spec or rules, act_scales=...)` stores on each packed layer its input's quantizer (`ActQuant`:
format, bits, granularity, symmetric, dynamic, and the static per-tensor scale and zero point);
`report` lists them and `act_rules(packed)` gives back the (specs, scales) that
`qjax.with_activation_quant` takes.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qjax import activations
from qjax import grids as grids_lib
from qjax import rules
from qjax import views as views_lib
from qjax.export.codes import ActQuant, Packed, _named_leaves, is_packed, pack_codes

PyTree = Any


def pack_kernel(W: Any, target: Any, name: str = "W", *, view: Any = None) -> Packed:
  """Pack one quantized kernel whose values lie on `target` (a Grid or a 1-D alphabet).

  Args:
    W: the quantized kernel (a parameter leaf).
    target: a `qjax.grids.Grid` of W's matrix, or a 1-D alphabet (levels).
    name: the layer's name, for errors.
    view: the grid's matrix (`qjax.views.View` or index map covering every entry of W once);
      None: `qjax.grids.as_matrix`. Ignored for an alphabet (its codes do not depend on it).

  Raises:
    ValueError naming `name` when a value is not on the target (not exactly a level), the grid
    does not fit the matrix, the view does not cover W once or is not a strided layout, or an
    alphabet has more than 256 levels.
  """
  W = np.asarray(W, np.float32)
  if isinstance(target, grids_lib.Grid):
    if view is not None:
      idx = views_lib.check(view, W.shape, name)
      if idx.size != W.size:
        raise ValueError(f"{name}: the view covers {idx.size} of the kernel's {W.size} entries; "
                         "a packed kernel needs a grid for every entry (for a scan-stacked "
                         "kernel: a target for every slice)")
      try:
        view = views_lib.of_index(view)
      except ValueError as e:
        raise ValueError(f"{name}: {e}; export stores views as strided layouts") from None
      if view == views_lib.default(W.shape):
        view = None
    M = W.reshape(-1, W.shape[-1]) if view is None else W.reshape(-1)[idx]
    try:
      target.check_fits(M.shape, name)
    except ValueError as e:
      raise ValueError(f"{name}: {e}") from None
    codes = np.asarray(target.codes(M))
    back = np.asarray(target.dequant(codes))
    if not np.array_equal(back, M):
      t, j = np.argwhere(back != M)[0]
      at = np.unravel_index(t * M.shape[1] + j if view is None else idx[t, j], W.shape)
      raise ValueError(f"{name}: value {M[t, j]!r} at {tuple(int(i) for i in at)} is not on its "
                       f"grid (nearest level {back[t, j]!r}); pack only quantized weights (on "
                       "the matrix the grid was fitted on: pass its view)")
    scale, zero = np.asarray(target.scale), np.asarray(target.zero)
    if target.per_tensor:
      scale, zero = scale[:1, :1], zero[:1, :1]
    return Packed(pack_codes(codes, target.bits), jnp.asarray(scale), jnp.asarray(zero),
                  jnp.zeros((1,), jnp.float32), shape=W.shape, kind="grid", bits=target.bits,
                  group_size=target.group_size, symmetric=target.symmetric, view=view)
  levels = np.unique(np.asarray(target, np.float32))  # sorted, deduplicated
  if levels.ndim != 1 or levels.size == 0:
    raise ValueError(f"{name}: the alphabet must be a non-empty 1-D array, got shape "
                     f"{np.shape(target)}")
  if levels.size > 256:
    raise ValueError(f"{name}: the alphabet has {levels.size} levels; at most 256 fit 8-bit codes")
  idx = np.clip(np.searchsorted(levels, W), 0, levels.size - 1)
  if not np.array_equal(levels[idx], W):
    bad = np.argwhere(levels[idx] != W)[0]
    raise ValueError(f"{name}: value {W[tuple(bad)]!r} at {tuple(bad)} is not a level of its "
                     f"alphabet; pack only quantized weights")
  bits = max(1, math.ceil(math.log2(levels.size)))
  return Packed(pack_codes(idx, bits), jnp.zeros((1, 1), jnp.float32),
                jnp.zeros((1, 1), jnp.float32), jnp.asarray(levels), shape=W.shape,
                kind="table", bits=bits)


def _merge_slices(leaf: str, shape: tuple[int, ...], parts: list[tuple[str, Any, Any]]
                  ) -> tuple[Any, Any]:
  """(target, view) of a scan-stacked leaf from its slices' (layer, target, view): grids side by
  side on the slices' matrices side by side (as the driver lays out independent problems), or
  the union of the slices' alphabets."""
  grids = [t for _, t, _ in parts if isinstance(t, grids_lib.Grid)]
  if grids and len(grids) != len(parts):
    raise ValueError(f"{leaf}: its slices mix grids and alphabets "
                     f"({[layer for layer, _, _ in parts]}); pack needs one kind per kernel")
  if not grids:
    return np.unique(np.concatenate([np.asarray(t, np.float32).reshape(-1)
                                     for _, t, _ in parts])), None
  first = grids[0]
  for layer, g, _ in parts:
    if (g.bits, g.symmetric, g.group_size) != (first.bits, first.symmetric, first.group_size):
      raise ValueError(f"{leaf}: slice {layer!r} has a {g.bits}-bit grid with group_size="
                       f"{g.group_size}, slice {parts[0][0]!r} a {first.bits}-bit one with "
                       f"group_size={first.group_size}; a packed kernel has one bits and one "
                       "group size (pack the slices as separate leaves)")
  index = [views_lib.as_index(v) if v is not None else
           views_lib.default(shape, views_lib.split_name(layer)[1]).index()
           for layer, _, v in parts]
  if len({i.shape[0] for i in index}) != 1:
    raise ValueError(f"{leaf}: its slices' matrices have different row counts "
                     f"{[i.shape[0] for i in index]}")
  grid = grids_lib.Grid(jnp.concatenate([g.scale for g in grids], axis=1),
                        jnp.concatenate([g.zero for g in grids], axis=1), bits=first.bits,
                        symmetric=first.symmetric, group_size=first.group_size)
  return grid, np.concatenate(index, axis=1)


def pack(params: PyTree, targets: Mapping[str, Any], *,
         views: Mapping[str, Any] | None = None, act: Any = None,
         act_scales: Mapping[str, Any] | None = None) -> PyTree:
  """Replace every leaf named in `targets` (names as `qjax.rules.path_name`, e.g.
  'block1/Conv_0') by its `Packed` codes; other leaves stay as they are.

  Args:
    params: quantized params (e.g. from `qjax.gptq`, `qjax.quantize_rtn`, `qjax.gpfq`).
    targets: {layer name: Grid or 1-D alphabet} for the quantized leaves: the `return_grids`
      output of `qjax.gptq` / `qjax.gpfq` / `qjax.quantize_msq` or the targets of
      `qjax.quantize_rtn` (a `qjax.views.Targets`, whose views are used), or a plain dict.
      Slices 'name[i]' of a scan-stacked leaf are packed together (every slice needs one).
    views: {layer name: `qjax.views.View` or index map}, the matrix each grid was fitted on;
      added to (and overriding) `targets.views`. Layers without one use `as_matrix`.
    act: the activation quantizer of the packed layers' inputs: an `ActSpec` or {regex: ActSpec
      or None} rules on the packed layer names (unmatched layers: float inputs).
    act_scales: static activation scales by layer name (`qjax.calibrate_activations`, or the
      `act_scales` of a `qjax.gptq` / `qjax.gpfq` report), needed by every static spec.

  Raises:
    ValueError naming the layer: a name in `targets` or `views` that names no leaf, a leaf not
    on its target, a stacked leaf whose slices cannot form one packed kernel.
  """
  leaves = dict(_named_leaves(params))
  all_views = dict(getattr(targets, "views", None) or {})
  all_views.update(views or {})
  by_leaf: dict[str, list[tuple[tuple[int, ...], str]]] = {}
  for layer in targets:
    leaf, key = views_lib.split_name(layer)
    if leaf not in leaves and layer in leaves:
      leaf, key = layer, ()  # a leaf whose own name ends in [i]
    by_leaf.setdefault(leaf, []).append((key, layer))
  missing = sorted(layer for leaf, parts in by_leaf.items() if leaf not in leaves
                   for _, layer in parts)
  if missing:
    raise ValueError(f"targets name no parameter: {missing}; the parameters are "
                     f"{sorted(leaves)}")
  unknown = sorted(n for n in all_views if views_lib.split_name(n)[0] not in leaves)
  if unknown:
    raise ValueError(f"views name no parameter: {unknown}; the parameters are {sorted(leaves)}")
  plan = {}
  for leaf, parts in by_leaf.items():
    shape = tuple(np.shape(leaves[leaf]))
    if len(parts) == 1 and parts[0][0] == ():
      layer = parts[0][1]
      plan[leaf] = (targets[layer], all_views.get(layer))
      continue
    if any(key == () for key, _ in parts):
      raise ValueError(f"{leaf}: targets name the whole kernel and its slices "
                       f"{sorted(layer for _, layer in parts)}")
    parts = sorted(parts)
    plan[leaf] = _merge_slices(leaf, shape, [(layer, targets[layer], all_views.get(layer))
                                             for _, layer in parts])
  acts = _act_plan(act, act_scales, list(plan))

  def leaf_fn(path, leaf):
    name = rules.path_name(path)
    if name not in plan:
      return leaf
    target, view = plan[name]
    packed = pack_kernel(leaf, target, name, view=view)
    return packed if name not in acts else packed.replace(act=acts[name])

  return jax.tree_util.tree_map_with_path(leaf_fn, params)


def _act_plan(act: Any, act_scales: Mapping[str, Any] | None, names: list[str]
              ) -> dict[str, ActQuant]:
  """{packed layer: ActQuant} of the `act` rules (a scan slice 'name[i]' has its own static
  scale, which one packed leaf cannot hold: an error)."""
  if act is None:
    return {}
  specs = rules.resolve(act, names, what="act", check_value=activations.check_act,
                        default=None)
  out = {}
  for name, spec in specs.items():
    if spec is None:
      continue
    sz = None
    if not spec.dynamic:
      sz = (act_scales or {}).get(name)
      if sz is None:
        raise ValueError(f"layer {name!r}: a static activation spec needs its scale in "
                         "act_scales (qjax.calibrate_activations or the report's act_scales)")
    out[name] = ActQuant.of(spec, sz)
  return out


def act_rules(packed: PyTree) -> tuple[dict[str, activations.ActSpec], dict[str, Any]]:
  """(specs, static scales) by layer name of the packed layers' input quantizers, for
  `qjax.with_activation_quant(apply_fn, specs, scales)` (a layer without one keeps float
  inputs)."""
  specs, scales = {}, {}
  for name, leaf in _named_leaves(packed):
    if is_packed(leaf) and leaf.act is not None:
      specs[f"^{re.escape(name)}$"] = leaf.act.spec()
      if leaf.act.scales() is not None:
        scales[name] = leaf.act.scales()
  specs["default"] = None
  return specs, scales


def unpack(packed: PyTree) -> PyTree:
  """The float params back from `pack` output (quantized leaves as float32).

  Raises:
    ValueError naming the leaf whose codes, bits or scales do not fit its kernel.
  """
  def one(path, x):
    if not is_packed(x):
      return x
    x.check(rules.path_name(path))
    return x.unpack()
  return jax.tree_util.tree_map_with_path(one, packed, is_leaf=is_packed)
