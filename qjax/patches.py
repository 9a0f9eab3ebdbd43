"""Conv patches: the data matrix X of a convolution, from its input's vectorized patches.

A convolution is a matrix product on vectorized image patches (GPFQ, Zhang, Zhou & Saab, Sec.
2.3), taken from the op's own dimension numbers, padding, dilations and groups (`conv_rows`).
A patch's features are channel-major (Cin, k1, ..., kn), matching
`jax.lax.conv_general_dilated_patches` and the rows of the conv's W (`qjax.layouts`). GPFQ
keeps a random fraction of each image's positions (`sample_patch_indices`, Sec. 3.1).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal, Sequence

import jax
import jax.numpy as jnp

PatchStride = Literal["kernel", "layer"]


def sample_patch_indices(key: jax.Array, n_images: int, n_positions: int,
                         p: float) -> jax.Array:
  """Random positions, ceil(p * T) distinct ones per image (Sec. 3.1, p = 0.25 in the paper).

  Returns:
    (n_images, ceil(p * T)) int32 indices into the T positions, sorted per image.
  """
  if not 0.0 < p <= 1.0:
    raise ValueError(f"patch fraction p must be in (0, 1], got {p}")
  keep = max(1, math.ceil(p * n_positions - 1e-9))
  if keep >= n_positions:
    return jnp.broadcast_to(jnp.arange(n_positions, dtype=jnp.int32), (n_images, n_positions))
  keys = jax.random.split(key, n_images)
  idx = jax.vmap(lambda k: jax.random.permutation(k, n_positions)[:keep])(keys)
  return jnp.sort(idx, axis=1).astype(jnp.int32)


def _nhwc(x: jax.Array, lhs_spec: Sequence[int]) -> jax.Array:
  """The conv input as (N, spatial..., C)."""
  perm = (lhs_spec[0],) + tuple(lhs_spec[2:]) + (lhs_spec[1],)
  return x if perm == tuple(range(x.ndim)) else jnp.transpose(x, perm)


def conv_patches(x: jax.Array, kernel_size: Sequence[int], strides: Sequence[int],
                 padding: Sequence[tuple[int, int]], *, lhs_dilation: Sequence[int],
                 rhs_dilation: Sequence[int]) -> jax.Array:
  """Vectorized patches (N, T, Cin*k1*...*kn) of a channels-last input, features channel-major
  (Cin, k1, ..., kn), T positions in row-major order of the patch grid (Sec. 2.3)."""
  n = len(kernel_size)
  dn = jax.lax.ConvDimensionNumbers(lhs_spec=(0, n + 1) + tuple(range(1, n + 1)),
                                    rhs_spec=(n + 1, n) + tuple(range(n)),
                                    out_spec=(0, n + 1) + tuple(range(1, n + 1)))
  patches = jax.lax.conv_general_dilated_patches(
      x, tuple(kernel_size), tuple(strides), tuple(tuple(p) for p in padding),
      lhs_dilation=tuple(lhs_dilation), rhs_dilation=tuple(rhs_dilation), dimension_numbers=dn,
      precision=jax.lax.Precision.HIGHEST)  # an exact copy, also on TPU
  return patches.reshape(x.shape[0], -1, patches.shape[-1])


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """The patch-relevant parameters of a conv_general_dilated eqn (hashable, for jit)."""
  lhs_spec: tuple[int, ...]
  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]
  lhs_dilation: tuple[int, ...]
  rhs_dilation: tuple[int, ...]

  @classmethod
  def of(cls, eqn) -> ConvSpec:
    p = eqn.params
    dn = p["dimension_numbers"]
    w_shape = eqn.invars[1].aval.shape
    return cls(tuple(dn.lhs_spec), tuple(w_shape[d] for d in dn.rhs_spec[2:]),
               tuple(p["window_strides"]), tuple(tuple(int(v) for v in q) for q in p["padding"]),
               tuple(p["lhs_dilation"]), tuple(p["rhs_dilation"]))


@functools.partial(jax.jit, static_argnames=("spec", "patch_p", "patch_stride"))
def conv_rows(x: jax.Array, key: jax.Array | None, spec: ConvSpec, patch_p: float,
              patch_stride: PatchStride) -> jax.Array:
  """The data matrix X (m, G*N0) of a conv: its input's vectorized patches (Sec. 2.3).

  Patches are taken at stride = the dilated kernel extent (disjoint patches, the paper's choice)
  or at the conv's own strides, with the conv's own padding, and a fraction `patch_p` of each
  image's positions is kept, drawn with `key` (the same key gives the same positions: that is
  how X and X~ stay row-aligned).
  """
  x = _nhwc(x, spec.lhs_spec)
  if patch_stride == "kernel":
    strides = tuple((k - 1) * d + 1 for k, d in zip(spec.kernel_size, spec.rhs_dilation))
  else:
    strides = spec.strides
  patches = conv_patches(x, spec.kernel_size, strides, spec.padding,
                         lhs_dilation=spec.lhs_dilation, rhs_dilation=spec.rhs_dilation)
  n_images, n_positions, features = patches.shape
  if patch_p < 1.0:
    idx = sample_patch_indices(key, n_images, n_positions, patch_p)
    patches = jnp.take_along_axis(patches, idx[:, :, None], axis=1)
  return patches.reshape(-1, features)
