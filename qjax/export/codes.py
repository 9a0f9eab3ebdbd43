"""The packed leaf: unsigned integer codes packed into bytes, plus what turns them back into values.

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
them back.
"""
from __future__ import annotations

import math
from typing import Any

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
  """Whether `x` is a packed kernel (the `is_leaf` of packed trees)."""
  return isinstance(x, Packed)


def _named_leaves(params: PyTree) -> list[tuple[str, Any]]:
  return [(rules.path_name(p), leaf)
          for p, leaf in jax.tree_util.tree_leaves_with_path(params, is_leaf=is_packed)]
