"""Uniform b-bit integer grids per tensor, per output channel or per group of inputs.

The grids that post-training quantization of large models uses today (GPTQ, Frantar et al.,
ICLR 2023, Sec. 3 and its reference code), next to the per-layer alphabets of the GPFQ paper
(`qjax.alphabets`, which stay the default of `qjax.gpfq`). This module is the grid maths only
(specs, fitting, scales, codes, checks); what rounds onto the grids lives with its method: RTN in
`qjax.rtn`, GPFQ's rounders in `qjax._gpfq.rounders`, GPTQ in `qjax._gptq`.

A kernel is a matrix W (N0 inputs, N1 neurons) in Flax layout; a neuron is a column. Which entries
of a parameter leaf form that matrix is its view (`qjax.views`): by default `as_matrix`,
W.reshape(-1, W.shape[-1]) (a conv kernel (kh, kw, Cin, Cout) with rows in HWIO order); the
driver's quantizers (`qjax.gptq`, `qjax.gpfq`) use each weight op's own matrix (a conv's rows
channel-major (Cin, kh, kw), a DenseGeneral (in, heads, head_dim) kernel as (in, heads*head_dim),
...), which `qjax.quantize_rtn(..., views=qjax.views.kernel_views(...))` uses too. Group
granularity groups consecutive rows of the matrix. The rows are split into G groups
of `group_size` = g consecutive inputs (one group of all N0 rows for per-channel and per-tensor
grids), and every (group k, neuron j) has its own grid

    value(c) = scale[k, j] * (c - zero[k, j]),   integer codes c in {0, ..., 2^b - 1}

so a b-bit grid always has exactly 2^b levels and the codes are unsigned b-bit integers
(`qjax.export` packs them). Rounding is c = clip(round(w / scale + zero), 0, 2^b - 1) with
round half to even (`jnp.round`); a group whose weights are all zero has scale 0 and rounds to 0.

* Asymmetric (zero point, the reference code's default): lo = min(min w, 0), hi = max(max w, 0),
  scale = (hi - lo) / (2^b - 1), zero = round(-lo / scale): 0 is always a level.
* Symmetric, b >= 2: scale = max|w| / (2^(b-1) - 1), zero = 2^(b-1): the levels are the b-bit
  two's-complement integers {-2^(b-1), ..., 2^(b-1) - 1} times scale, so +-max|w| and 0 are
  levels (the extra most negative level is only reached by clipping; GPTQ's reference code uses
  scale = 2 max|w| / (2^b - 1) with the same zero point, so +max|w| is clipped to
  (2^(b-1) - 1) scale there). Symmetric 1-bit has no zero
  level: zero = 1/2, scale = 2 max|w|, levels {-max|w|, +max|w|} (binary weights with a scale).

The scale comes from the extremes ("max": min-max, or max|w| when symmetric) or from a small
MSE search ("mse", as in GPTQ's reference quantizer): the extremes are shrunk by ratios
1, 1 - 1/n, ..., down to 1 - max_shrink, and each (group, neuron) keeps the first ratio with the
least sum |round(w) - w|^norm. The divisions by 2^b - 1 and 2^(b-1) - 1 above are computed as
multiplications by their float32 reciprocals (XLA:CPU's float32 division is not correctly
rounded), so scales are reproducible bit for bit, e.g. by NumPy.

The last group: when g does not divide N0 the last group is short (N0 mod g rows) and its scale is
fitted on those rows only; G = ceil(N0 / g). A grid of G groups fits any W with
(G - 1) g < N0 <= G g rows.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from qjax import rules

Granularity = Literal["tensor", "channel", "group"]
ScaleMethod = Literal["max", "mse"]

__all__ = ["Grid", "GridSpec", "fit", "make", "as_matrix"]


def _check_bits(bits: Any, name: str = "bits") -> int:
  """Bits of an integer grid: codes are stored in at most one byte."""
  return rules.check_bits(bits, name, low=1, high=8)


def _check_group_size(group_size: Any, name: str = "group_size") -> int:
  if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
    raise TypeError(f"{name} must be a positive int, got {group_size!r}")
  if int(group_size) <= 0:
    raise ValueError(f"{name} must be a positive int, got {group_size}")
  return int(group_size)


def _concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def as_matrix(W: Any) -> jax.Array:
  """A kernel as its default (N0, N1) matrix W.reshape(-1, W.shape[-1]): Dense as is, conv
  (kh, kw, Cin, Cout) as (kh*kw*Cin, Cout). Not always the driver's matrix (`qjax.views`)."""
  W = jnp.asarray(W)
  if W.ndim < 2:
    raise ValueError(f"W must be a kernel with ndim >= 2 (N0, N1) or a conv kernel, got shape "
                     f"{W.shape}")
  return W.reshape(-1, W.shape[-1])


def _maxq(bits: int) -> int:
  return 2**bits - 1


def quantize_codes(w: jax.Array, scale: jax.Array, zero: jax.Array, maxq: int) -> jax.Array:
  """Float codes clip(round(w / scale + zero), 0, maxq) (scale 0: the code of 0)."""
  safe = jnp.where(scale > 0, scale, jnp.ones_like(scale))
  x = jnp.where(scale > 0, w / safe, jnp.zeros_like(w))
  return jnp.clip(jnp.round(x + zero), 0, maxq)


def dequantize(codes: jax.Array, scale: jax.Array, zero: jax.Array) -> jax.Array:
  """scale * (codes - zero)."""
  return scale * (codes - zero)


def round_to(w: jax.Array, scale: jax.Array, zero: jax.Array, maxq: int) -> jax.Array:
  """w rounded onto the grid (scale, zero, maxq), elementwise (broadcasting)."""
  return dequantize(quantize_codes(w, scale, zero, maxq), scale, zero)


@struct.dataclass
class Grid:
  """A fitted uniform grid for one (N0, N1) kernel: one (scale, zero) per (group, neuron).

  Attributes:
    scale: (G, N1) float32 step of group k of neuron j, >= 0 (0: an all-zero group).
    zero: (G, N1) float32 zero point: the (integer) code of 0, or 1/2 for symmetric 1-bit.
    bits: b in 1..8; codes are {0, ..., 2^b - 1}.
    symmetric: how the grid was fitted (see the module docstring).
    group_size: g, rows per group; None for one group of all N0 rows (per channel or tensor).
    per_tensor: True when one (scale, zero) serves the whole tensor (all entries equal).
  """
  scale: jax.Array
  zero: jax.Array
  bits: int = struct.field(pytree_node=False)
  symmetric: bool = struct.field(pytree_node=False, default=True)
  group_size: int | None = struct.field(pytree_node=False, default=None)
  per_tensor: bool = struct.field(pytree_node=False, default=False)

  @property
  def maxq(self) -> int:
    return _maxq(self.bits)

  @property
  def num_groups(self) -> int:
    return self.scale.shape[0]

  @property
  def granularity(self) -> Granularity:
    if self.group_size is not None:
      return "group"
    return "tensor" if self.per_tensor else "channel"

  def check_fits(self, shape: tuple[int, ...], name: str = "W") -> tuple[int, int]:
    """(N0, N1) of a kernel of this shape, or a ValueError when the grid does not fit it."""
    if len(shape) < 2:
      raise ValueError(f"{name} must have ndim >= 2, got shape {tuple(shape)}")
    N0, N1 = math.prod(shape[:-1]), shape[-1]
    G = self.scale.shape[0]
    if self.scale.shape[1] != N1:
      raise ValueError(f"grid does not fit {name}: the grid has {self.scale.shape[1]} neurons "
                       f"(scale shape {self.scale.shape}), {name} {tuple(shape)} has N1 = {N1}")
    want = 1 if self.group_size is None else -(-N0 // self.group_size)
    if G != want:
      raise ValueError(f"grid does not fit {name}: {name} {tuple(shape)} has N0 = {N0} inputs, "
                       f"so group_size={self.group_size} needs {want} groups, the grid has {G}")
    return N0, N1

  def group_index(self, N0: int) -> np.ndarray:
    """(N0,) int32: the group of each input row."""
    if self.group_size is None:
      return np.zeros(N0, np.int32)
    return (np.arange(N0) // self.group_size).astype(np.int32)

  def rows(self, N0: int) -> tuple[jax.Array, jax.Array]:
    """(scale, zero) expanded to one row per input, each (N0, N1)."""
    idx = self.group_index(N0)
    return self.scale[idx], self.zero[idx]

  def codes(self, W: Any) -> jax.Array:
    """Integer codes of W rounded onto the grid, int32, shape of W (conv kernels too)."""
    W = jnp.asarray(W)
    N0, _ = self.check_fits(W.shape)
    s, z = self.rows(N0)
    c = quantize_codes(as_matrix(W).astype(jnp.float32), s, z, self.maxq)
    return c.astype(jnp.int32).reshape(W.shape)

  def dequant(self, codes: Any) -> jax.Array:
    """The float32 values of integer codes (shape of a kernel this grid fits)."""
    codes = jnp.asarray(codes)
    N0, _ = self.check_fits(codes.shape, "codes")
    s, z = self.rows(N0)
    return dequantize(as_matrix(codes).astype(jnp.float32), s, z).reshape(codes.shape)

  def round(self, W: Any) -> jax.Array:
    """W rounded to the nearest level of its (group, neuron) grid (RTN); dtype of W."""
    W = jnp.asarray(W)
    return self.dequant(self.codes(W)).astype(W.dtype)

  def levels(self) -> jax.Array:
    """(G, N1, 2^b) float32: every level of every (group, neuron) grid, ascending."""
    c = jnp.arange(2**self.bits, dtype=jnp.float32).reshape(1, 1, -1)
    return dequantize(c, self.scale[..., None], self.zero[..., None])


def make(scale: Any, zero: Any, *, bits: int, symmetric: bool = True,
         group_size: int | None = None, per_tensor: bool = False) -> Grid:
  """A Grid from given scales and zero points, validated (errors name the argument)."""
  bits = _check_bits(bits)
  if group_size is not None:
    group_size = _check_group_size(group_size)
  scale = jnp.asarray(scale, jnp.float32)
  zero = jnp.asarray(zero, jnp.float32)
  if scale.ndim != 2:
    raise ValueError(f"scale must be (G, N1), got shape {scale.shape}")
  if zero.shape != scale.shape:
    raise ValueError(f"zero must have the shape of scale {scale.shape}, got {zero.shape}")
  if group_size is None and scale.shape[0] != 1:
    raise ValueError(f"group_size=None (one group per neuron) needs scale of shape (1, N1), got "
                     f"{scale.shape}")
  if _concrete(scale) and _concrete(zero):
    with jax.ensure_compile_time_eval():
      if bool(jnp.isnan(scale).any()) or bool(jnp.isinf(scale).any()):
        raise ValueError("scale contains NaN or Inf")
      if bool((scale < 0).any()):
        raise ValueError("scale must be >= 0")
      if bool(jnp.isnan(zero).any()) or bool(jnp.isinf(zero).any()):
        raise ValueError("zero contains NaN or Inf")
  return Grid(scale, zero, bits=bits, symmetric=bool(symmetric), group_size=group_size,
              per_tensor=bool(per_tensor))


@dataclasses.dataclass(frozen=True)
class GridSpec:
  """How to fit a grid to a kernel (hashable: usable as a static argument).

  Attributes:
    bits: b in 1..8.
    granularity: "tensor" (one scale), "channel" (one per neuron) or "group" (one per
      `group_size` consecutive inputs of each neuron; the last group may be short).
    group_size: g > 0, required for (and only for) granularity "group".
    symmetric: symmetric (zero point fixed) or asymmetric (min-max zero point) grid.
    method: "max" (min-max / max|w|) or "mse" (search over clipping ratios).
    mse_grid, max_shrink, norm: the MSE search tries ratios 1 - i / mse_grid for
      i < max_shrink * mse_grid and minimises sum |round(w) - w|^norm (GPTQ's reference quantizer
      uses 100, 0.8 and 2.4).
  """
  bits: int
  granularity: Granularity = "channel"
  group_size: int | None = None
  symmetric: bool = True
  method: ScaleMethod = "max"
  mse_grid: int = 20
  max_shrink: float = 0.8
  norm: float = 2.4

  def __post_init__(self):
    _check_bits(self.bits)
    if self.granularity not in ("tensor", "channel", "group"):
      raise ValueError(f"granularity must be 'tensor', 'channel' or 'group', got "
                       f"{self.granularity!r}")
    if self.granularity == "group":
      if self.group_size is None:
        raise ValueError("granularity='group' needs a group_size")
      _check_group_size(self.group_size)
    elif self.group_size is not None:
      raise ValueError(f"group_size is only used with granularity='group', got "
                       f"group_size={self.group_size} with granularity={self.granularity!r}")
    if self.method not in ("max", "mse"):
      raise ValueError(f"method must be 'max' or 'mse', got {self.method!r}")
    if self.method == "mse":
      _check_group_size(self.mse_grid, "mse_grid")
      if not 0.0 < float(self.max_shrink) < 1.0:
        raise ValueError(f"max_shrink must be in (0, 1), got {self.max_shrink}")
      if not float(self.norm) > 0:
        raise ValueError(f"norm must be > 0, got {self.norm}")

  @property
  def maxq(self) -> int:
    return _maxq(self.bits)

  def num_groups(self, N0: int) -> int:
    return 1 if self.group_size is None else -(-N0 // self.group_size)

  def ratios(self) -> np.ndarray:
    if self.method == "max":
      return np.ones(1, np.float32)
    n = max(int(self.max_shrink * self.mse_grid), 1)
    return (1.0 - np.arange(n) / self.mse_grid).astype(np.float32)

  def fit(self, W: Any) -> Grid:
    """The grid of W (a kernel, conv kernels via their matrix)."""
    return fit(W, self)


def _recip(k: int) -> np.float32:
  # A multiplication by the float32 reciprocal, not a division: XLA:CPU's float32 division is
  # not correctly rounded, and scales should be reproducible bit for bit (e.g. in NumPy).
  return np.float32(1.0 / k)


def _scale_zero(lo: jax.Array, hi: jax.Array, bits: int, symmetric: bool):
  """(scale, zero) of the grid spanning [lo, hi] (lo <= 0 <= hi), any shape."""
  maxq = _maxq(bits)
  if symmetric:
    a = jnp.maximum(-lo, hi)
    if bits == 1:
      return 2.0 * a, jnp.full_like(a, 0.5)
    return a * _recip(2 ** (bits - 1) - 1), jnp.full_like(a, 2 ** (bits - 1))
  span = hi - lo  # overflows near float32's max: then scale each end first
  scale = jnp.where(jnp.isfinite(span), span * _recip(maxq), hi * _recip(maxq) - lo * _recip(maxq))
  safe = jnp.where(scale > 0, scale, jnp.ones_like(scale))
  zero = jnp.where(scale > 0, jnp.clip(jnp.round(-lo / safe), 0, maxq), jnp.zeros_like(scale))
  return scale, zero


def fit_groups(Wg: jax.Array, spec: GridSpec, valid: jax.Array | None = None):
  """(scale, zero), each (..., N1), of groups Wg (..., g, N1); `valid` (..., g, 1) masks rows.

  Rows masked out (padding) neither move the extremes (they count as 0, which every grid holds)
  nor add to the MSE search's error. Traceable: used inside GPTQ's scan for dynamic groups.
  """
  Wg = Wg.astype(jnp.float32)
  if valid is not None:
    Wg = jnp.where(valid, Wg, jnp.zeros_like(Wg))
  lo = jnp.minimum(jnp.min(Wg, axis=-2), 0.0)
  hi = jnp.maximum(jnp.max(Wg, axis=-2), 0.0)
  if spec.method == "max":
    return _scale_zero(lo, hi, spec.bits, spec.symmetric)

  def err_of(r):
    s, z = _scale_zero(r * lo, r * hi, spec.bits, spec.symmetric)
    e = jnp.abs(round_to(Wg, s[..., None, :], z[..., None, :], spec.maxq) - Wg) ** spec.norm
    if valid is not None:
      e = jnp.where(valid, e, jnp.zeros_like(e))
    return jnp.sum(e, axis=-2), s, z

  def step(best, r):
    b_err, b_s, b_z = best
    e, s, z = err_of(r)
    better = e < b_err  # strict: the first (least shrunk) ratio wins ties
    return (jnp.where(better, e, b_err), jnp.where(better, s, b_s),
            jnp.where(better, z, b_z)), None

  ratios = spec.ratios()
  first = err_of(jnp.float32(ratios[0]))
  (_, s, z), _ = jax.lax.scan(step, first, jnp.asarray(ratios[1:]))
  return s, z


def _check_spec(spec: Any = None, **kwargs) -> GridSpec:
  if spec is None:
    return GridSpec(**kwargs)
  if kwargs:
    raise TypeError(f"pass either a GridSpec or keyword arguments, not both ({sorted(kwargs)})")
  if not isinstance(spec, GridSpec):
    raise TypeError(f"spec must be a GridSpec, got {type(spec).__name__}")
  return spec


def fit(W: Any, spec: GridSpec | None = None, **kwargs) -> Grid:
  """Fit a grid to a kernel: `fit(W, GridSpec(4, "group", 128))` or `fit(W, bits=4, ...)`.

  Args:
    W: (N0, N1) kernel, or a conv kernel (fitted on its `as_matrix` (kh*kw*Cin, Cout)); for
      the driver's matrix of a leaf pass `qjax.views.matrix(leaf, view)`.
    spec: a GridSpec; or its fields as keyword arguments.

  Returns:
    A Grid with scale and zero of shape (G, N1), G = ceil(N0 / g) (1 without groups).

  Raises:
    ValueError / TypeError naming the argument: bits outside 1..8, group_size <= 0, W with NaN.
  """
  spec = _check_spec(spec, **kwargs)
  W = jnp.asarray(W)
  M = as_matrix(W).astype(jnp.float32)
  if M.size == 0:
    raise ValueError(f"W must be non-empty, got shape {W.shape}")
  if _concrete(M):
    with jax.ensure_compile_time_eval():
      if not bool(jnp.isfinite(M).all()):
        raise ValueError("W contains NaN or Inf")
  N0, N1 = M.shape
  if spec.granularity == "tensor":
    s, z = fit_groups(M.reshape(1, N0 * N1, 1), spec)
    s, z = jnp.broadcast_to(s, (1, N1)), jnp.broadcast_to(z, (1, N1))
  elif spec.granularity == "channel":
    s, z = fit_groups(M[None], spec)
  else:
    g = spec.group_size
    G = -(-N0 // g)
    Mp = jnp.pad(M, ((0, G * g - N0), (0, 0))).reshape(G, g, N1)
    valid = (np.arange(G * g) < N0).reshape(G, g, 1)
    s, z = fit_groups(Mp, spec, jnp.asarray(valid) if G * g != N0 else None)
  return Grid(s.astype(jnp.float32), z.astype(jnp.float32), bits=spec.bits,
              symmetric=spec.symmetric, group_size=spec.group_size,
              per_tensor=spec.granularity == "tensor")
