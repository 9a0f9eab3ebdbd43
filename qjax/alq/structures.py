"""Group structures of ALQ (Qu et al. 2020, Appendix A.2) for kernels in Flax layout.

A kernel of shape (*S, Cin, Cout) -- Dense (N0, N1) has no spatial dims S, Conv (kh, kw, Cin, Cout)
has S = (kh, kw) -- is cut into G groups of n weights each, returned as a (G, n) matrix. Groups
never mix output channels (neurons), so every structure is a relabelling of one neuron's weights:

  channel-wise          w[..., :, c]                 G = Cout,             n = |S| Cin
  subchannel-wise(k)    w[..., d:d+Cin/k, c]         G = Cout k,           n = |S| Cin / k
  pixel-wise            w[h, w, :, c]                G = Cout |S|,         n = Cin
  kernel-wise           w[:, :, d, c]                G = Cout Cin,         n = |S|

Groups are ordered output-channel major. For a Dense kernel pixel-wise equals channel-wise and
kernel-wise would give single-weight groups, which is rejected.
"""
from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp

_KINDS = ("channel", "subchannel", "pixel", "kernel")


@dataclasses.dataclass(frozen=True)
class Structure:
  """How one layer's kernel is grouped: `kind` in channel/subchannel/pixel/kernel, `k` slices."""
  kind: str
  k: int = 1

  def __post_init__(self):
    if self.kind not in _KINDS:
      raise ValueError(f"unknown ALQ structure {self.kind!r}; expected one of {_KINDS}")
    if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
      raise ValueError(f"subchannel-wise(k) needs an int k >= 1, got {self.k!r}")
    if self.kind != "subchannel" and self.k != 1:
      raise ValueError(f"{self.kind}-wise takes no k, got k={self.k}")

  def __str__(self):
    return f"subchannel-wise({self.k})" if self.kind == "subchannel" else f"{self.kind}-wise"


def channel_wise() -> Structure:
  return Structure("channel")


def subchannel_wise(k: int) -> Structure:
  return Structure("subchannel", k)


def pixel_wise() -> Structure:
  return Structure("pixel")


def kernel_wise() -> Structure:
  return Structure("kernel")


_PATTERN = re.compile(r"^\s*(channel|subchannel|pixel|kernel)(?:-wise)?\s*(?:\(\s*(\d+)\s*\))?\s*$")


def as_structure(spec: Structure | str) -> Structure:
  """A Structure from itself or a name: 'kernel-wise', 'pixel', 'subchannel-wise(2)', ..."""
  if isinstance(spec, Structure):
    return spec
  m = _PATTERN.match(str(spec))
  if m is None:
    raise ValueError(f"cannot parse ALQ structure {spec!r}; use e.g. 'channel-wise', "
                     "'subchannel-wise(2)', 'pixel-wise' or 'kernel-wise'")
  kind, k = m.group(1), m.group(2)
  if k is not None and kind != "subchannel":
    raise ValueError(f"{kind}-wise takes no argument, got {spec!r}")
  if kind == "subchannel" and k is None:
    raise ValueError(f"subchannel-wise needs a slice count, e.g. 'subchannel-wise(2)', "
                     f"got {spec!r}")
  return Structure(kind, int(k) if k is not None else 1)


def group_shape(structure: Structure, shape: tuple[int, ...], layer: str = "") -> tuple[int, int]:
  """(G, n) of a kernel of `shape`; ValueError (naming `layer`) if the structure does not fit."""
  where = f" for layer {layer!r}" if layer else ""
  if len(shape) < 2:
    raise ValueError(f"ALQ needs a kernel of rank >= 2{where}, got shape {shape}")
  spatial, cin, cout = math.prod(shape[:-2]), shape[-2], shape[-1]
  if structure.kind == "channel":
    return cout, spatial * cin
  if structure.kind == "subchannel":
    if cin % structure.k:
      raise ValueError(f"{structure} does not divide the {cin} input channels{where} "
                       f"(kernel shape {shape})")
    return cout * structure.k, spatial * cin // structure.k
  if structure.kind == "pixel":
    return cout * spatial, cin
  if len(shape) == 2:
    raise ValueError(f"kernel-wise groups a conv's spatial kernel; Dense kernel{where} has none "
                     f"(shape {shape}); use channel-wise or subchannel-wise(k)")
  return cout * cin, spatial


def _perm(structure: Structure, rank: int) -> tuple[int, ...]:
  """Axes order that makes each group contiguous, on the kernel viewed as (*S, k, Cin/k, Cout)."""
  s = tuple(range(rank - 3))  # spatial axes; then k, Cin/k, Cout
  kk, ci, co = rank - 3, rank - 2, rank - 1
  if structure.kind in ("channel", "subchannel"):
    return (co, kk) + s + (ci,)
  if structure.kind == "pixel":
    return (co,) + s + (kk, ci)
  return (co, kk, ci) + s


def _split_shape(structure: Structure, shape: tuple[int, ...]) -> tuple[int, ...]:
  k = structure.k
  return tuple(shape[:-2]) + (k, shape[-2] // k, shape[-1])


def to_groups(kernel: jax.Array, structure: Structure) -> jax.Array:
  """Kernel (*S, Cin, Cout) -> groups (G, n), output-channel major."""
  g, n = group_shape(structure, kernel.shape)
  split = kernel.reshape(_split_shape(structure, kernel.shape))
  return jnp.transpose(split, _perm(structure, split.ndim)).reshape(g, n)


def from_groups(groups: jax.Array, structure: Structure, shape: tuple[int, ...]) -> jax.Array:
  """Inverse of `to_groups`: groups (G, n) -> kernel of `shape`."""
  split = _split_shape(structure, shape)
  perm = _perm(structure, len(split))
  permuted = groups.reshape(tuple(split[a] for a in perm))
  return jnp.transpose(permuted, tuple(perm.index(a) for a in range(len(split)))).reshape(shape)
