"""Matrix views of parameter leaves: which entry of a weight is entry (t, j) of its matrix.

Every method of qjax works on a kernel as a matrix W (N0 inputs, N1 neurons), neurons as columns
(Flax layout): grids have a scale per column or per (group of consecutive rows, column), GPTQ
and GPFQ quantize row by row. Which leaf entries form that matrix is the *view*:

* The driver (`qjax.driver`, used by `qjax.gpfq`, `qjax.gptq`, `qjax.quantize_msq`) quantizes
  each weight op's own matrix: the weight's contracting dims x its free dims, e.g. a conv HWIO
  kernel as rows (Cin, kh, kw) x Cout (channel-major rows), a `nn.DenseGeneral` kernel
  (in, heads, head_dim) as (in, heads*head_dim), an `nn.Einsum` kernel as whatever its equation
  contracts, a tied embedding (`Embed.attend`) as E^T, slice i of an `nn.scan` stack as its own
  matrix. `kernel_views(params, apply_fn, batch)` lists those views without quantizing.
* Without a view (the default of `qjax.quantize_rtn`, `qjax.grids.fit`, `qjax.export.pack`) a
  kernel leaf is `qjax.grids.as_matrix(W)` = W.reshape(-1, W.shape[-1]) (last dim = neurons,
  rows in the leaf's row-major order). That is the driver's view for Dense kernels and
  DenseGeneral output kernels (heads, head_dim, out), not for the others above; pass the
  driver's views so that RTN rounds onto exactly the levels GPTQ and GPFQ fit, and so that
  export packs their grids.

A view is an index map: W == leaf.reshape(-1)[index], index (N0, N1) of distinct flat leaf
entries. It is stored as a `View`, the index as a strided layout (offset, sizes, strides: a
handful of ints, what `numpy.lib.stride_tricks.as_strided` takes), which every transpose /
reshape / reversal chain of the driver's layouts is; `View.index()` gives the array back.
Functions here take a `View` or an index array.

Layer names are the driver's: `qjax.rules.path_name` of the leaf ('block1/Conv_0'), and
'name[i]' for slice i of a scan-stacked leaf (`split_name`).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["View", "Targets", "default", "of_index", "as_index", "check", "matrix", "put",
           "split_name", "layers_of", "kernel_views"]


@dataclasses.dataclass(frozen=True)
class View:
  """A matrix (N0, N1) laid over a leaf: matrix entry (t, j), at row-major position
  p = t * N1 + j, is flat leaf entry offset + sum_k digit_k(p) * strides[k], where the digits
  write p in the mixed radix `sizes` (outermost first). Hashable (a static pytree field)."""
  shape: tuple[int, int]
  offset: int
  sizes: tuple[int, ...]
  strides: tuple[int, ...]

  def index(self) -> np.ndarray:
    """(N0, N1) int64 flat leaf index of every matrix entry."""
    idx = np.full((), self.offset, np.int64)
    for size, stride in zip(self.sizes, self.strides):
      idx = idx[..., None] + np.arange(size, dtype=np.int64) * stride
    return idx.reshape(self.shape)


def default(shape: tuple[int, ...], slice_key: tuple[int, ...] = ()) -> View:
  """The view without a driver: `qjax.grids.as_matrix` of the leaf (or of leaf[i][j]...)."""
  shape = tuple(int(s) for s in shape)
  offset = 0
  for i in slice_key:
    if not shape or not 0 <= i < shape[0]:
      raise ValueError(f"slice {list(slice_key)} does not index a leaf of shape {shape}")
    shape = shape[1:]
    offset += int(i) * math.prod(shape)
  if len(shape) < 2:
    raise ValueError(f"a kernel needs ndim >= 2 (N0, N1), got shape {shape}")
  n = math.prod(shape)
  return View((n // shape[-1], shape[-1]), offset, (n,), (1,))


def _divisors_desc(n: int) -> list[int]:
  small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
  return sorted(set(small + [n // d for d in small]), reverse=True)


def _strided(v: np.ndarray) -> tuple[int, tuple[int, ...], tuple[int, ...]] | None:
  """(offset, sizes, strides) (outermost first) with v == the strided enumeration, or None."""
  n = v.size
  offset = int(v[0])
  d = v - offset
  sizes, strides = [], []
  inner = 1  # product of the digit sizes found so far (innermost first)
  while inner < n:
    stride = int(d[inner])
    rest = n // inner
    heads = d[::inner][:rest]
    bad = np.nonzero(heads != np.arange(rest, dtype=np.int64) * stride)[0]
    run = int(bad[0]) if bad.size else rest  # the longest arithmetic run of digit heads
    size = None
    for r in _divisors_desc(rest):  # the largest digit size whose blocks all repeat
      if r < 2:
        break
      if r > run:
        continue
      blocks = d.reshape(-1, r, inner)
      if np.array_equal(blocks - blocks[:, :1, :],
                        np.broadcast_to((np.arange(r, dtype=np.int64) * stride)[None, :, None],
                                        blocks.shape)):
        size = r
        break
    if size is None:
      return None
    sizes.append(size)
    strides.append(stride)
    inner *= size
  return offset, tuple(sizes[::-1]), tuple(strides[::-1])


def of_index(index: Any) -> View:
  """The `View` of an (N0, N1) integer index map (e.g. `qjax.driver.LayerInfo.leaf_index()`).

  Raises:
    ValueError: index is not a non-empty 2-D integer array, or not a strided layout (an index
      map that no transpose / reshape / reversal chain makes).
  """
  if isinstance(index, View):
    return index
  idx = np.asarray(index)
  if idx.ndim != 2 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
    raise ValueError(f"a view must be a non-empty 2-D integer index map (N0, N1), got "
                     f"{idx.dtype} array of shape {idx.shape}")
  found = _strided(idx.reshape(-1).astype(np.int64))
  if found is None:
    raise ValueError("the index map is not a strided layout of the leaf (no transpose / "
                     "reshape chain makes it)")
  view = View(tuple(int(s) for s in idx.shape), *found)
  if not np.array_equal(view.index(), idx):  # the digit search is exact; this is its proof
    raise ValueError("the index map is not a strided layout of the leaf")
  return view


def as_index(view: Any) -> np.ndarray:
  """The (N0, N1) int64 index map of a `View` or an index array."""
  if isinstance(view, View):
    return view.index()
  return np.asarray(view).astype(np.int64)


def check(view: Any, leaf_shape: tuple[int, ...], name: str = "view") -> np.ndarray:
  """The index map of `view`, validated against a leaf of `leaf_shape` (ValueError naming
  `name`): 2-D, integer, entries in range and distinct."""
  idx = np.asarray(view.index() if isinstance(view, View) else view)
  if idx.ndim != 2 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
    raise ValueError(f"{name}: a view must be a non-empty 2-D integer index map (N0, N1), got "
                     f"{idx.dtype} array of shape {idx.shape}")
  n = math.prod(leaf_shape)
  if idx.min() < 0 or idx.max() >= n:
    raise ValueError(f"{name}: the view indexes entries [{idx.min()}, {idx.max()}], the leaf "
                     f"{tuple(leaf_shape)} has {n}")
  if np.bincount(idx.reshape(-1), minlength=n).max() > 1:
    raise ValueError(f"{name}: the view uses a leaf entry twice (it must be one-to-one)")
  return idx.astype(np.int64)


def _jnp_index(idx: np.ndarray) -> jax.Array:
  return jnp.asarray(idx.astype(np.int32) if idx.size and idx.max() < 2**31 else idx)


def matrix(leaf: Any, view: Any = None) -> jax.Array:
  """The leaf's matrix under `view` (None: `qjax.grids.as_matrix`)."""
  leaf = jnp.asarray(leaf)
  if view is None:
    return leaf.reshape(-1, leaf.shape[-1])
  return leaf.reshape(-1)[_jnp_index(as_index(view))]


def put(leaf: Any, view: Any, M: Any) -> jax.Array:
  """The leaf with the entries of its matrix under `view` replaced by M (cast to its dtype);
  entries outside the view (other scan slices) are kept."""
  leaf = jnp.asarray(leaf)
  M = jnp.asarray(M).astype(leaf.dtype)
  if view is None:
    return M.reshape(leaf.shape)
  flat = leaf.reshape(-1).at[_jnp_index(as_index(view)).reshape(-1)].set(M.reshape(-1))
  return flat.reshape(leaf.shape)


_SLICE = re.compile(r"^(.*?)((?:\[\d+\])+)$")


def split_name(name: str) -> tuple[str, tuple[int, ...]]:
  """('leaf name', scan slice) of a driver layer name: 'enc/Dense_0[2]' -> ('enc/Dense_0', (2,))."""
  m = _SLICE.match(name)
  if m is None:
    return name, ()
  return m.group(1), tuple(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))


def layers_of(views: Mapping[str, Any] | None, leaves: Mapping[str, tuple[int, ...]]
              ) -> dict[str, list[tuple[str, Any]]]:
  """{leaf name: [(layer name, View or index map)]} of `views` on leaves {name: shape}, slices
  in order; ValueError naming the layer when a view names no leaf, does not fit it (`check`),
  or a leaf has a whole-leaf view besides slice views."""
  out: dict[str, list[tuple[tuple[int, ...], str, Any]]] = {}
  for layer, view in (views or {}).items():
    leaf, key = split_name(layer)
    if leaf not in leaves:
      raise ValueError(f"views: {layer!r} names no parameter; the parameters are "
                       f"{sorted(leaves)}")
    check(view, leaves[leaf], f"views[{layer!r}]")
    out.setdefault(leaf, []).append((key, layer, view))
  for leaf, entries in out.items():
    if len(entries) > 1 and any(key == () for key, _, _ in entries):
      raise ValueError(f"views: {leaf!r} has a view of the whole leaf and of its slices "
                       f"{sorted(layer for key, layer, _ in entries if key)}")
  return {leaf: [(layer, view) for _, layer, view in sorted(entries, key=lambda e: e[0])]
          for leaf, entries in out.items()}


class Targets(dict):
  """{layer name: `qjax.grids.Grid` or 1-D alphabet} with the views they were fitted on.

  What `qjax.quantize_rtn` and `return_grids=True` of `qjax.gpfq` / `qjax.gptq` /
  `qjax.quantize_msq` return, and what `qjax.export.pack` takes: `views` {layer name: View} holds
  the matrix each grid belongs to (layers without an entry use the default view), so
  `export.pack(q, targets)` packs every grid exactly. A plain dict works wherever this does.
  """

  def __init__(self, *args, views: Mapping[str, Any] | None = None, **kwargs):
    super().__init__(*args, **kwargs)
    self.views: dict[str, Any] = dict(views or {})

  def add(self, name: str, target: Any, view: Any = None) -> None:
    """Record `target` for layer `name`, on `view` (a View or an index map; stored compactly
    as a View when it is strided)."""
    self[name] = target
    if view is not None:
      try:
        view = of_index(view)
      except ValueError:
        view = np.asarray(view)  # exact still; `qjax.export.pack` explains why it cannot pack
      self.views[name] = view

  def __repr__(self) -> str:
    return f"Targets({dict.__repr__(self)}, views={sorted(self.views)})"


def kernel_views(params: Any, apply_fn: Any, batch: Any,
                 apply_kwargs: Mapping[str, Any] | None = None) -> dict[str, View]:
  """The matrix of every weight op of `apply_fn(params, batch)`, as the driver quantizes it.

  Traces the function once (`qjax.driver.prepare`: no forward pass, no quantization); a weight
  used by several ops (a tied embedding) has the view of its first op, as the driver quantizes
  it there; ops the driver cannot quantize (inside `while` / `cond`) have none.

  Args:
    params, apply_fn, batch, apply_kwargs: as `qjax.gpfq` (only the batch's shapes matter).

  Returns:
    {layer name ('block1/Conv_0', 'stack/Dense_0[i]'): View}; pass it as `views=` to
    `qjax.quantize_rtn` and `qjax.export.pack`.
  """
  from qjax import driver  # imported here: tracing is only needed for this function
  from qjax import layouts
  prep = driver.prepare(params, apply_fn, batch, apply_kwargs)
  program = prep.program
  out: dict[str, View] = {}
  seen = set()
  for op in program.stops:
    key = (op.leaf, op.prov.slice_key)
    if op.status != "ok" or op.layout is None or key in seen:
      continue
    seen.add(key)
    shape = tuple(np.shape(program.leaves[op.leaf]))
    # W == leaf.reshape(-1)[index], as the driver's LayerInfo.leaf_index.
    index = layouts.leaf_index(shape, op.prov, op.layout)
    try:
      out[op.name] = of_index(index)
    except ValueError as e:
      raise ValueError(f"layer {op.name!r}: {e}") from None
  return out
