"""Integer export of quantized params: codes packed into bytes, scales and zero points, orbax I/O.

A quantized kernel whose values lie on a known set of levels is stored as unsigned integer codes
plus what turns them back into values:

* on a `qjax.grids.Grid` (per tensor, per output channel or per group): the grid's b-bit codes
  c in {0..2^b-1} with value = scale * (c - zero); scale and zero float32, one per tensor (1, 1),
  per channel (1, N1) or per group (G, N1);
* on a 1-D alphabet (the GPFQ paper's per-layer alphabets, `qjax.alphabets`): the index of the
  value in the sorted level table, plus the table (L float32 levels); ceil(log2 L) code bits
  (the paper's b-bit alphabets have 2^b + 1 levels, so b + 1 bits).

Codes are packed little-end first into uint8 containers of 1, 2, 4 or 8 bits: 8, 4 (2-bit and
ternary), 2 (3- and 4-bit: a 3-bit code takes a 4-bit nibble) or 1 code per byte (5..8 bits).
More than 256 levels is an error. A grid belongs to a matrix view of the kernel (`qjax.views`):
by default `qjax.grids.as_matrix`, whose row-major order is the kernel's own, so the codes are in
the kernel's layout; on another view (the driver's matrix of a conv, DenseGeneral, Einsum or tied
embedding, as `qjax.gptq` / `qjax.gpfq` fit their grids; `Targets.views` carries it) the codes are
in the row-major order of that matrix and `Packed.view`, a strided layout of a few ints, puts
them back. A scan-stacked leaf with one grid per slice ('name[i]', every slice quantized, one
bits / group size) is packed as one matrix, the slices' matrices side by side.

Storage is counted as in the ALQ report (`qjax.alq.accounting.report`, Eq. 28): a quantized
layer stores its codes plus its float32 side parameters (scales, zero points, level tables) at
32 bits each, and `float_bytes` counts the leaves left in float32 (biases, unquantized layers)
separately (a view, like the shape, is metadata and not counted); the compression ratio is
32 N / (storage bits). `storage_bytes` counts the bytes the
packed arrays really hold (container padding included); `ideal_bytes` counts b bits per weight
as ALQ's bits do (its I N bits of bases, no padding), so they agree whenever b is 1, 2, 4 or 8.

    q_params, report, grids = qjax.gptq(..., return_grids=True)   # or gpfq, quantize_rtn
    packed = export.pack(q_params, grids)        # grids: {layer name: Grid or 1-D levels}
    export.unpack(packed) == q_params            # exactly
    export.save(path, packed); export.restore(path)  # orbax-checkpoint
    export.report(packed)                        # bytes per layer, against float32

Activation grids (`qjax.ActSpec`, W8A8 / W4A8) travel with the packed weights: `pack(...,
act=spec or rules, act_scales=...)` stores on each packed layer its input's quantizer (`ActQuant`:
format, bits, granularity, symmetric, dynamic, and the static per-tensor scale and zero point);
`report` lists them and `act_rules(packed)` gives back the (specs, scales) that
`qjax.with_activation_quant` takes.
"""
from __future__ import annotations

import math
import os
import re
import zlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from qjax import activations
from qjax import grids as grids_lib
from qjax import rules
from qjax import views as views_lib

PyTree = Any
_KINDS = ("grid", "table")
# Version of the checkpoint layout `save` writes; `restore` refuses any other.
FORMAT_VERSION = 2


def container_bits(bits: int) -> int:
  """Bits of the uint8 sub-field a b-bit code is packed into: 1, 2, 4 or 8."""
  if not 1 <= bits <= 8:
    raise ValueError(f"codes must have 1..8 bits, got {bits}")
  return next(c for c in (1, 2, 4, 8) if c >= bits)


def pack_codes(codes: Any, bits: int) -> np.ndarray:
  """Flatten integer codes in [0, 2^bits) and pack them into uint8, 8 // container per byte."""
  c = np.asarray(codes).reshape(-1).astype(np.int64)
  if c.size and (c.min() < 0 or c.max() >= 2**bits):
    raise ValueError(f"codes must lie in [0, {2**bits}), got [{c.min()}, {c.max()}]")
  width = container_bits(bits)
  per = 8 // width
  c = np.pad(c, (0, -c.size % per)).reshape(-1, per)
  shifts = np.arange(per, dtype=np.int64) * width
  return np.sum(c << shifts[None, :], axis=1).astype(np.uint8)


def unpack_codes(data: Any, bits: int, size: int) -> np.ndarray:
  """The first `size` codes of `pack_codes` output, int32."""
  width = container_bits(bits)
  per = 8 // width
  d = np.asarray(data, np.uint8).astype(np.int32)
  shifts = np.arange(per, dtype=np.int32) * width
  c = (d[:, None] >> shifts[None, :]) & (2**width - 1)
  return c.reshape(-1)[:size]


@struct.dataclass
class ActQuant:
  """The quantizer of a layer's input (`qjax.ActSpec` plus its static scale).

  Attributes:
    scale, zero: float32 scalars of a static spec (placeholders 0 for a dynamic one).
    bits, granularity, group_size, symmetric, dynamic, fmt: the spec (a static spec's
      calibration method is spent: the scale is stored).
  """
  scale: jax.Array
  zero: jax.Array
  bits: int = struct.field(pytree_node=False)
  granularity: str = struct.field(pytree_node=False)
  group_size: int | None = struct.field(pytree_node=False)
  symmetric: bool = struct.field(pytree_node=False)
  dynamic: bool = struct.field(pytree_node=False)
  fmt: str = struct.field(pytree_node=False)

  def spec(self) -> activations.ActSpec:
    return activations.ActSpec(bits=self.bits, granularity=self.granularity,
                               group_size=self.group_size, symmetric=self.symmetric,
                               dynamic=self.dynamic, fmt=self.fmt)

  def scales(self) -> dict[str, jax.Array] | None:
    return None if self.dynamic else {"scale": self.scale, "zero": self.zero}

  @classmethod
  def of(cls, spec: activations.ActSpec, scales: Any = None) -> "ActQuant":
    scale = zero = jnp.zeros((), jnp.float32)
    if scales is not None and not spec.dynamic:
      scale = jnp.asarray(scales["scale"], jnp.float32).reshape(())
      zero = jnp.asarray(scales.get("zero", 0.0), jnp.float32).reshape(())
    return cls(scale, zero, bits=spec.bits, granularity=spec.granularity,
               group_size=spec.group_size, symmetric=spec.symmetric, dynamic=spec.dynamic,
               fmt=spec.fmt)


@struct.dataclass
class Packed:
  """One quantized kernel as packed integer codes.

  Attributes:
    data: uint8 packed codes (`pack_codes`), row-major over `shape` (over `view.shape` with a
      view).
    scale: float32 grid scale, (1, 1) per tensor, (1, N1) per channel, (G, N1) per group; for a
      level table a (1, 1) placeholder 0 (not counted).
    zero: float32 zero points, shape of scale (placeholder for a table).
    levels: float32 sorted level table (L,) for kind 'table'; (1,) placeholder 0 for a grid.
    shape: the kernel's shape.
    kind: 'grid' or 'table'.
    bits: bits per code (grid: b; table: ceil(log2 L), at least 1).
    group_size: rows per group of a grid (None: one group).
    symmetric: how the grid was fitted (metadata).
    view: the grid's matrix as a `qjax.views.View` of the kernel; None: `as_matrix`.
    act: the quantizer of the layer's input (`ActQuant`), None: float inputs.
  """
  data: jax.Array
  scale: jax.Array
  zero: jax.Array
  levels: jax.Array
  shape: tuple[int, ...] = struct.field(pytree_node=False)
  kind: str = struct.field(pytree_node=False)
  bits: int = struct.field(pytree_node=False)
  group_size: int | None = struct.field(pytree_node=False, default=None)
  symmetric: bool = struct.field(pytree_node=False, default=True)
  view: views_lib.View | None = struct.field(pytree_node=False, default=None)
  act: ActQuant | None = None

  @property
  def weights(self) -> int:
    return math.prod(self.shape)

  @property
  def matrix_shape(self) -> tuple[int, int]:
    """(N0, N1) of the grid's matrix."""
    if self.view is not None:
      return self.view.shape
    return math.prod(self.shape[:-1]), self.shape[-1]

  def grid(self) -> grids_lib.Grid:
    N0, N1 = self.matrix_shape
    G = 1 if self.group_size is None else -(-N0 // self.group_size)
    shape = (G, N1)
    return grids_lib.Grid(jnp.broadcast_to(jnp.asarray(self.scale), shape),
                          jnp.broadcast_to(jnp.asarray(self.zero), shape), bits=self.bits,
                          symmetric=self.symmetric, group_size=self.group_size,
                          per_tensor=self.scale.shape == (1, 1) and N1 > 1)

  def codes(self) -> np.ndarray:
    """The code of every kernel entry, in the kernel's shape."""
    c = unpack_codes(self.data, self.bits, self.weights)
    if self.view is None:
      return c.reshape(self.shape)
    out = np.empty(self.weights, c.dtype)
    out[self.view.index().reshape(-1)] = c
    return out.reshape(self.shape)

  def unpack(self) -> jax.Array:
    """The float32 kernel."""
    if self.kind == "table":
      return jnp.asarray(np.asarray(self.levels)[self.codes()])
    if self.view is None:
      return self.grid().dequant(self.codes())
    c = unpack_codes(self.data, self.bits, self.weights).reshape(self.view.shape)
    return views_lib.put(jnp.zeros(self.shape, jnp.float32), self.view, self.grid().dequant(c))

  def check(self, name: str = "kernel") -> None:
    """Raise ValueError naming the leaf if the codes, bits or scales cannot be this kernel."""
    where = f"packed leaf {name!r}"
    if self.kind not in _KINDS:
      raise ValueError(f"{where}: kind must be one of {_KINDS}, got {self.kind!r}")
    if not (isinstance(self.bits, int) and 1 <= self.bits <= 8):
      raise ValueError(f"{where}: bits must be an int in 1..8, got {self.bits!r}")
    data = np.asarray(self.data)
    codes = math.prod(self.view.shape) if self.view is not None else self.weights
    per = 8 // container_bits(self.bits)
    if data.dtype != np.uint8 or data.shape != (-(-codes // per),):
      raise ValueError(f"{where}: {codes} codes of {self.bits} bits need "
                       f"{-(-codes // per)} uint8 bytes, got {data.dtype} of shape {data.shape}")
    if self.kind == "table":
      levels = np.asarray(self.levels)
      if levels.ndim != 1 or not 1 <= levels.size <= 2**self.bits:
        raise ValueError(f"{where}: a level table of {self.bits}-bit codes has 1..{2**self.bits} "
                         f"levels, got shape {levels.shape}")
      if not np.isfinite(levels).all():
        raise ValueError(f"{where}: level table contains NaN or Inf")
      return
    N0, N1 = self.matrix_shape
    G = 1 if self.group_size is None else -(-N0 // self.group_size)
    for field in ("scale", "zero"):
      a = np.asarray(getattr(self, field))
      if a.shape not in ((G, N1), (1, N1), (1, 1)):
        raise ValueError(f"{where}: {field} of shape {a.shape} does not fit its ({G}, {N1}) "
                         f"grid")
      if not np.isfinite(a).all():
        raise ValueError(f"{where}: {field} contains NaN or Inf")

  def side_arrays(self) -> tuple[np.ndarray, ...]:
    """The float32 arrays stored besides the codes (what the report counts)."""
    if self.kind == "table":
      return (np.asarray(self.levels),)
    return (np.asarray(self.scale), np.asarray(self.zero))


def is_packed(x: Any) -> bool:
  return isinstance(x, Packed)


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


def _named_leaves(params: PyTree) -> list[tuple[str, Any]]:
  return [(rules.path_name(p), leaf)
          for p, leaf in jax.tree_util.tree_leaves_with_path(params, is_leaf=is_packed)]


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


def report(packed: PyTree) -> dict[str, Any]:
  """Bytes per packed layer against float32, counted as the ALQ report counts (module docstring).

  Returns:
    {'layers': {name: {kind, bits, container_bits, weights, code_bytes, side_bytes,
    storage_bytes, ideal_bytes, float32_bytes, compression, and 'act' (fmt, bits,
    granularity, symmetric, dynamic, scale, zero) when the layer's input is quantized}},
    'weights', 'storage_bytes',
    'ideal_bytes', 'float_bytes' (unpacked leaves, in their own dtypes), 'float32_bytes' (every parameter in
    float32), 'total_bytes' (storage + float), 'compression' (quantized layers).
  """
  layers = {}
  float_bytes = 0
  for name, leaf in _named_leaves(packed):
    if not is_packed(leaf):
      float_bytes += int(np.asarray(leaf).nbytes)  # as stored: bfloat16 is 2 bytes
      continue
    side = sum(a.nbytes for a in leaf.side_arrays())
    code = int(np.asarray(leaf.data).nbytes)
    layers[name] = dict(kind=leaf.kind, bits=leaf.bits, container_bits=container_bits(leaf.bits),
                        weights=leaf.weights, code_bytes=code, side_bytes=side,
                        storage_bytes=code + side,
                        ideal_bytes=leaf.bits * leaf.weights / 8 + side,
                        float32_bytes=4 * leaf.weights,
                        compression=32 * leaf.weights / (8 * (code + side)))
    if leaf.act is not None:  # the input's quantizer (metadata, not counted in the bytes)
      a = leaf.act
      layers[name]["act"] = dict(fmt=a.fmt, bits=a.bits, granularity=a.granularity,
                                 symmetric=a.symmetric, dynamic=a.dynamic,
                                 scale=None if a.dynamic else float(a.scale),
                                 zero=None if a.dynamic else float(a.zero))
  weights = sum(l["weights"] for l in layers.values())
  storage = sum(l["storage_bytes"] for l in layers.values())
  return dict(layers=layers, weights=weights, storage_bytes=storage,
              ideal_bytes=sum(l["ideal_bytes"] for l in layers.values()),
              float_bytes=float_bytes, float32_bytes=4 * weights + float_bytes,
              total_bytes=storage + float_bytes,
              compression=32 * weights / (8 * storage) if storage else float("inf"))


# ------------------------------------------------------------------------------------------------
# orbax-checkpoint save / restore: a nested dict of plain arrays (no static fields needed).


def _to_state(tree: PyTree) -> Any:
  if is_packed(tree):
    meta = [_KINDS.index(tree.kind), tree.bits, tree.group_size or 0, int(tree.symmetric),
            len(tree.shape), *tree.shape]
    if tree.view is not None:  # offset, N0, N1, K, K sizes, K strides
      v = tree.view
      meta += [v.offset, *v.shape, len(v.sizes), *v.sizes, *v.strides]
    state = {"data": np.asarray(tree.data), "meta": np.asarray(meta, np.int64)}
    if tree.act is not None:
      a = tree.act
      state["act_meta"] = np.asarray(
          [activations.FORMATS.index(a.fmt), a.bits, activations.GRANULARITIES.index(
              a.granularity), a.group_size or 0, int(a.symmetric), int(a.dynamic)], np.int64)
      state["act_scale"] = np.asarray(a.scale, np.float32).reshape(1)
      state["act_zero"] = np.asarray(a.zero, np.float32).reshape(1)
    if tree.kind == "table":
      state["levels"] = np.asarray(tree.levels)
    else:
      state["scale"], state["zero"] = np.asarray(tree.scale), np.asarray(tree.zero)
    state["check"] = np.asarray([FORMAT_VERSION, _checksum(state)], np.int64)
    return {"__packed__": state}
  if isinstance(tree, Mapping):
    return {str(k): _to_state(v) for k, v in tree.items()}
  if hasattr(tree, "shape") and hasattr(tree, "dtype"):
    return np.asarray(tree)
  raise TypeError(f"save handles nested dicts of arrays and Packed leaves, got "
                  f"{type(tree).__name__}")


def _checksum(state: Mapping[str, Any]) -> int:
  """CRC-32 over every array of a packed leaf's state (names, dtypes, shapes and bytes)."""
  crc = 0
  for k in sorted(state):
    if k == "check":
      continue
    a = np.ascontiguousarray(state[k])
    crc = zlib.crc32(f"{k}:{a.dtype.str}:{a.shape};".encode(), crc)
    crc = zlib.crc32(a.tobytes(), crc)
  return crc


def _from_state(state: Any, name: str = "") -> PyTree:
  if isinstance(state, Mapping) and "__packed__" in state:
    s = {k: np.asarray(v) for k, v in state["__packed__"].items()}
    where = f"packed leaf {name!r}"
    if "check" not in s or s["check"].shape != (2,):
      raise ValueError(f"{where}: no format version and checksum (written by an older qjax?)")
    version, crc = (int(v) for v in s["check"])
    if version != FORMAT_VERSION:
      raise ValueError(f"{where}: checkpoint format {version}, this qjax reads "
                       f"{FORMAT_VERSION}")
    if crc != _checksum(s):
      raise ValueError(f"{where}: checksum mismatch: the checkpoint was changed or damaged")
    kind, bits, group, symmetric, ndim, *rest = (int(v) for v in s["meta"])
    shape, rest = tuple(rest[:ndim]), rest[ndim:]
    view = None
    if rest:
      offset, n0, n1, k, *digits = rest
      if len(digits) != 2 * k:
        raise ValueError(f"{where}: metadata of {len(s['meta'])} fields does not match its "
                         f"view of {k} digits")
      view = views_lib.View((n0, n1), offset, tuple(digits[:k]), tuple(digits[k:2 * k]))
    levels = s.get("levels", np.zeros((1,), np.float32))
    scale = s.get("scale", np.zeros((1, 1), np.float32))
    zero = s.get("zero", np.zeros((1, 1), np.float32))
    act = None
    if "act_meta" in s:
      fmt, abits, gran, agroup, asym, adyn = (int(v) for v in np.asarray(s["act_meta"]))
      act = ActQuant(jnp.asarray(s["act_scale"], jnp.float32).reshape(()),
                     jnp.asarray(s["act_zero"], jnp.float32).reshape(()), bits=abits,
                     granularity=activations.GRANULARITIES[gran], group_size=agroup or None,
                     symmetric=bool(asym), dynamic=bool(adyn), fmt=activations.FORMATS[fmt])
    if not 0 <= kind < len(_KINDS):
      raise ValueError(f"{where}: unknown kind index {kind}")
    leaf = Packed(jnp.asarray(s["data"]), jnp.asarray(scale), jnp.asarray(zero),
                  jnp.asarray(levels), shape=shape, kind=_KINDS[kind], bits=bits,
                  group_size=group or None, symmetric=bool(symmetric), view=view, act=act)
    leaf.check(name)
    return leaf
  if isinstance(state, Mapping):
    return {k: _from_state(v, f"{name}/{k}" if name else k) for k, v in state.items()}
  return jnp.asarray(state)


def save(path: str | os.PathLike, packed: PyTree, *, compress: bool = False) -> int:
  """Write `pack` output to a new orbax checkpoint directory; returns its bytes on disk.

  Each packed leaf carries the format version and a CRC-32 of its arrays, which `restore`
  checks. Orbax writes to `<path>.orbax-checkpoint-tmp*` and renames when done: a save that
  fails removes it, and a save of `path` also removes any left by a killed earlier save.

  Without `compress` the arrays are stored raw, so the bytes on disk are `report`'s
  `total_bytes` plus orbax's metadata (a few KiB); with it orbax's zstd shrinks what compresses
  (constant zero points, the unused top bit of 3-bit codes in 4-bit nibbles).
  """
  import orbax.checkpoint as ocp  # imported here: only export needs it
  path = os.path.abspath(os.fspath(path))
  state = _to_state(packed)
  _remove_partial_saves(path)  # left by an earlier save of `path` that was killed
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=compress))
  try:
    checkpointer.save(path, args=ocp.args.PyTreeSave(state))
  except BaseException:
    _remove_partial_saves(path)
    raise
  return disk_bytes(path)


def _remove_partial_saves(path: str) -> None:
  """Delete orbax's temporary directories of `path` (`<path>.orbax-checkpoint-tmp*`)."""
  import shutil  # pylint: disable=g-import-not-at-top
  parent, base = os.path.split(path)
  if not os.path.isdir(parent):
    return
  for name in os.listdir(parent):
    if name.startswith(base + ".orbax-checkpoint-tmp"):
      print(f"export.save: removing {os.path.join(parent, name)}, left by an interrupted save")
      shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def restore(path: str | os.PathLike) -> PyTree:
  """Read a checkpoint written by `save`: the same packed tree (dict containers)."""
  import orbax.checkpoint as ocp
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
  state = checkpointer.restore(os.path.abspath(os.fspath(path)), args=ocp.args.PyTreeRestore())
  return _from_state(state)


def disk_bytes(path: str | os.PathLike) -> int:
  """Total size of the files under `path`."""
  total = 0
  for root, _, files in os.walk(os.fspath(path)):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total
