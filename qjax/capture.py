"""Finding the Dense/Conv calls of a linen model, their inputs, and conv patch matrices.

GPFQ (seed 003, Alg. 1) quantizes a network layer by layer and needs, for every layer in call
order, the input the layer sees. `capture` finds those calls without touching the model code: it
runs `apply_fn` once under `flax.linen.intercept_methods` and records every `nn.Dense` and
`nn.Conv` call (module path, kernel shape, conv attributes, input array). Other modules that own
a `kernel` parameter (nn.DenseGeneral, nn.Einsum, nn.ConvTranspose, nn.ConvLocal, masked convs,
custom layers) are recorded as kind "unsupported" so a caller can warn about them.

A convolution becomes a matrix product on image patches (Sec. 2.3): `conv_patches` unfolds the
input with `jax.lax.conv_general_dilated_patches`, whose features come in channel-major order
(Cin, kh, kw); `kernel_to_matrix` reorders an HWIO kernel (kh, kw, Cin, Cout) to the matching
(Cin*kh*kw, Cout) matrix, so that `patches @ kernel_to_matrix(kernel)` is the conv output.
The paper extracts disjoint patches (stride = kernel size) and keeps a random fraction p = 0.25
of each image's patches (Sec. 3.1): `sample_patch_indices` draws them with an explicit key, so the
float and the quantized network can use the very same positions.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Literal, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Padding = str | Sequence[tuple[int, int]]
PatchStride = Literal["kernel", "layer"]


class ConvSpec(NamedTuple):
  """The attributes of an `nn.Conv` call that shape its patches (all tuples have one entry per
  spatial axis; `padding` as `flax.linen.linear.canonicalize_padding` returns it)."""
  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]
  padding: Padding
  input_dilation: tuple[int, ...]
  kernel_dilation: tuple[int, ...]
  feature_group_count: int


@dataclasses.dataclass(frozen=True)
class LayerCall:
  """One call of a layer with a `kernel` parameter, as seen by `capture`.

  Attributes:
    path: '/'-joined module path, e.g. 'block1/Conv_0'; the kernel lives at
      `variables['params'][*path.split('/')]['kernel']`.
    kind: 'dense', 'conv' or 'unsupported'.
    module_type: class name of the module, e.g. 'Conv' or 'DenseGeneral'.
    kernel_shape: shape of the kernel parameter.
    use_bias: whether the layer has a `bias` parameter next to its kernel.
    conv: the conv attributes (kind 'conv' only).
    inputs: the layer's input (an array, or a tracer when `capture` runs under a transform).
    module: an unbound copy of the module, to re-apply this one layer on its own.
    reason: why a layer is 'unsupported'.
  """
  path: str
  kind: Literal["dense", "conv", "unsupported"]
  module_type: str
  kernel_shape: tuple[int, ...]
  use_bias: bool
  conv: ConvSpec | None
  inputs: Any
  module: nn.Module
  reason: str = ""


def _tuple(x: int | Sequence[int] | None, n: int) -> tuple[int, ...]:
  if x is None:  # flax treats None as 1
    return (1,) * n
  if isinstance(x, int):
    return (x,) * n
  return tuple(int(v) for v in x)


def conv_spec(module: nn.Conv) -> ConvSpec:
  """The patch-relevant attributes of an `nn.Conv`, broadcast like flax does."""
  ks = _tuple(module.kernel_size, 1)  # an int kernel_size means a 1-D conv in flax
  n = len(ks)
  padding = nn.linear.canonicalize_padding(module.padding, n)
  if not isinstance(padding, str):
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return ConvSpec(ks, _tuple(module.strides, n), padding, _tuple(module.input_dilation, n),
                  _tuple(module.kernel_dilation, n), int(module.feature_group_count))


def _classify(module: nn.Module) -> tuple[str, str]:
  """(kind, reason) of a module that owns a kernel."""
  if isinstance(module, nn.Dense):
    return "dense", ""
  if isinstance(module, nn.Conv):
    if module.mask is not None:
      return "unsupported", "nn.Conv with a `mask` (the masked kernel is not a free matrix)"
    return "conv", ""
  return "unsupported", (f"{type(module).__name__} is not nn.Dense or nn.Conv "
                         "(GPFQ needs a plain matrix product of the input with the kernel)")


def capture(apply_fn: Callable[..., Any], variables: Any, *args: Any,
            **kwargs: Any) -> tuple[Any, list[LayerCall]]:
  """Run `apply_fn(variables, *args, **kwargs)` once and record its layer calls in call order.

  Only modules that own a `params/kernel` are recorded; a layer called inside another recorded
  layer (e.g. a subclass calling `super().__call__`) is recorded once, by the outer call.
  Works eagerly and under `jax.jit` / `jax.eval_shape` (then `inputs` are tracers, which the
  caller must return from the transformed function, not keep).

  Args:
    apply_fn: e.g. `model.apply`; must not be `jax.jit`-wrapped (a compiled function runs no
      Python, so nothing could be intercepted).
    variables: the variables passed as its first argument.
    *args: further positional arguments (typically the input batch).
    **kwargs: keyword arguments for `apply_fn` (e.g. `train=False`).

  Returns:
    (output of apply_fn, list of `LayerCall`).
  """
  calls: list[LayerCall] = []
  active: list[nn.Module] = []  # recorded layers currently running (to skip nested calls)

  def interceptor(next_fun, call_args, call_kwargs, context):
    module = context.module
    if (context.method_name != "__call__" or active
        or not module.has_variable("params", "kernel")):
      return next_fun(*call_args, **call_kwargs)
    kind, reason = _classify(module)
    inputs = call_args[0] if call_args else next(iter(call_kwargs.values()), None)
    calls.append(LayerCall(
        path="/".join(module.path), kind=kind, module_type=type(module).__name__,
        kernel_shape=tuple(module.get_variable("params", "kernel").shape),
        use_bias=module.has_variable("params", "bias"),
        conv=conv_spec(module) if kind == "conv" else None,
        inputs=inputs, module=module.clone(parent=None), reason=reason))
    active.append(module)
    try:
      return next_fun(*call_args, **call_kwargs)
    finally:
      active.pop()

  with nn.intercept_methods(interceptor):
    out = apply_fn(variables, *args, **kwargs)
  return out, calls


# ---------------------------------------------------------------------------------------------
# Kernels as matrices.


def kernel_to_matrix(kernel: jax.Array) -> jax.Array:
  """HWIO kernel (k1, ..., kn, Cin_g, Cout) -> (Cin_g*k1*...*kn, Cout), rows channel-major.

  The row order (Cin, k1, ..., kn) matches the features of `conv_patches` (Sec. 2.3: each kernel
  vectorized exactly like the patches). A 2-D Dense kernel is returned unchanged.
  """
  if kernel.ndim == 2:
    return kernel
  n = kernel.ndim - 2
  perm = (n,) + tuple(range(n)) + (n + 1,)
  return jnp.transpose(kernel, perm).reshape(-1, kernel.shape[-1])


def matrix_to_kernel(matrix: jax.Array, kernel_shape: Sequence[int]) -> jax.Array:
  """Inverse of `kernel_to_matrix`: (Cin_g*k1*...*kn, Cout) -> kernel of `kernel_shape`."""
  kernel_shape = tuple(kernel_shape)
  if len(kernel_shape) == 2:
    return matrix.reshape(kernel_shape)
  n = len(kernel_shape) - 2
  cin_first = (kernel_shape[n],) + kernel_shape[:n] + (kernel_shape[-1],)
  perm = tuple(range(1, n + 1)) + (0, n + 1)
  return jnp.transpose(matrix.reshape(cin_first), perm)


def group_slices(n_rows: int, n_cols: int, groups: int) -> list[tuple[slice, slice]]:
  """(row slice, column slice) of each group's block in the patch matrix / kernel matrix.

  With `feature_group_count = G`, group g sees input channels [g*Cin/G, (g+1)*Cin/G) and produces
  output channels [g*Cout/G, (g+1)*Cout/G). Channel-major patches keep a group's features
  contiguous, so each group is one block: one GPFQ problem per group.

  Args:
    n_rows: features per group of the full patch matrix, i.e. the kernel matrix row count
      (Cin/G * k1*...*kn); the patch matrix has G times as many columns.
    n_cols: Cout.
    groups: G.
  """
  if n_cols % groups:
    raise ValueError(f"Cout={n_cols} is not divisible by feature_group_count={groups}")
  out_g = n_cols // groups
  return [(slice(g * n_rows, (g + 1) * n_rows), slice(g * out_g, (g + 1) * out_g))
          for g in range(groups)]


# ---------------------------------------------------------------------------------------------
# Conv patches.


def _pre_pad(x: jax.Array, padding: Padding, kernel_size: Sequence[int],
             kernel_dilation: Sequence[int]) -> tuple[jax.Array, Padding]:
  """Apply flax's own pre-padding modes (CIRCULAR, REFLECT, CAUSAL) exactly as `nn.Conv` does."""
  if padding in ("CIRCULAR", "REFLECT"):
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
    pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
    mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding]
    return jnp.pad(x, pads, mode=mode), "VALID"
  if padding == "CAUSAL":
    if len(kernel_size) != 1:
      raise ValueError("CAUSAL padding is only defined for 1-D convolutions")
    left = kernel_dilation[0] * (kernel_size[0] - 1)
    return jnp.pad(x, [(0, 0), (left, 0), (0, 0)]), "VALID"
  return x, padding


def conv_patches(x: jax.Array, kernel_size: Sequence[int], strides: Sequence[int] | int = 1,
                 padding: Padding | int = "VALID", *,
                 input_dilation: Sequence[int] | int = 1,
                 kernel_dilation: Sequence[int] | int = 1,
                 padding_strides: Sequence[int] | int | None = None) -> jax.Array:
  """Unfold a channels-last batch into vectorized patches (the rows of X in Sec. 2.3).

  `patches @ kernel_to_matrix(kernel)` equals `nn.Conv(..., strides, padding)(x)` reshaped to
  (N, T, Cout) when `padding_strides` is None (or equals `strides`).

  Args:
    x: (N, *spatial, Cin) input.
    kernel_size: (k1, ..., kn).
    strides: the strides at which patches are taken: the layer's own, or the kernel size for
      the paper's disjoint patches.
    padding: any `nn.Conv` padding ('SAME', 'VALID', 'SAME_LOWER', 'CIRCULAR', 'REFLECT',
      'CAUSAL', an int, or (low, high) pairs).
    input_dilation: as in `nn.Conv`.
    kernel_dilation: as in `nn.Conv`.
    padding_strides: the strides a string padding ('SAME') is resolved for; pass the layer's
      own strides when sampling with other strides, so the patches see exactly the zero border
      the layer sees. Defaults to `strides`.

  Returns:
    (N, T, Cin*k1*...*kn) patches, features channel-major (Cin, k1, ..., kn), T positions
    in row-major order of the output grid.
  """
  n = len(kernel_size)
  kernel_size = tuple(int(k) for k in kernel_size)
  strides = _tuple(strides, n)
  input_dilation = _tuple(input_dilation, n)
  kernel_dilation = _tuple(kernel_dilation, n)
  padding_strides = strides if padding_strides is None else _tuple(padding_strides, n)
  padding = nn.linear.canonicalize_padding(padding, n)
  x, padding = _pre_pad(x, padding, kernel_size, kernel_dilation)
  if isinstance(padding, str):
    # Resolve e.g. 'SAME' for the layer's strides (and dilated sizes), like lax would.
    in_dilated = [(s - 1) * d + 1 for s, d in zip(x.shape[1:-1], input_dilation)]
    k_dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
    padding = jax.lax.padtype_to_pads(in_dilated, k_dilated, padding_strides, padding)
  dn = nn.linear._conv_dimension_numbers(x.shape)  # NHWC / HWIO, as nn.Conv uses
  patches = jax.lax.conv_general_dilated_patches(
      x, kernel_size, strides, tuple(tuple(p) for p in padding), lhs_dilation=input_dilation,
      rhs_dilation=kernel_dilation, dimension_numbers=dn,
      precision=jax.lax.Precision.HIGHEST)  # an exact copy, also on TPU
  return patches.reshape(x.shape[0], -1, patches.shape[-1])


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


def layer_rows(layer: LayerCall, x: jax.Array, *, key: jax.Array | None = None,
               patch_p: float = 0.25, patch_stride: PatchStride = "kernel") -> jax.Array:
  """The data matrix (m, N0) of one layer call: what GPFQ calls X (or X~) for this layer.

  Dense: the input with all leading axes flattened. Conv: vectorized patches (Sec. 2.3), taken
  at stride = kernel extent (disjoint patches, the paper) or at the layer's own strides, keeping
  a fraction `patch_p` of each image's positions drawn with `key`. The same key gives the same
  positions, which is how X and X~ are kept row-aligned.

  Args:
    layer: the captured call (its `inputs` are not used; `x` is).
    x: an input of the layer (float or quantized network), same shape as the captured one.
    key: PRNG key for the patch sample (needed when patch_p < 1, conv only).
    patch_p: fraction of each image's patches kept.
    patch_stride: "kernel" (disjoint patches) or "layer".

  Returns:
    (m, N0) array; for grouped convs N0 = G * rows of the kernel matrix (see `group_slices`).
  """
  if layer.kind == "dense":
    return x.reshape(-1, x.shape[-1])
  if layer.kind != "conv":
    raise ValueError(f"layer {layer.path!r} ({layer.module_type}) has no GPFQ data matrix: "
                     f"{layer.reason}")
  spec = layer.conv
  n = len(spec.kernel_size)
  x = x.reshape((-1,) + x.shape[x.ndim - n - 1:])  # flax flattens batch axes the same way
  if patch_stride == "kernel":
    strides = tuple((k - 1) * d + 1 for k, d in zip(spec.kernel_size, spec.kernel_dilation))
  elif patch_stride == "layer":
    strides = spec.strides
  else:
    raise ValueError(f"patch_stride must be 'kernel' or 'layer', got {patch_stride!r}")
  patches = conv_patches(x, spec.kernel_size, strides, spec.padding,
                         input_dilation=spec.input_dilation,
                         kernel_dilation=spec.kernel_dilation, padding_strides=spec.strides)
  n_images, n_positions, features = patches.shape
  if patch_p < 1.0:
    if key is None:
      raise ValueError(f"layer {layer.path!r}: a key is needed to sample patches (p={patch_p})")
    idx = sample_patch_indices(key, n_images, n_positions, patch_p)
    patches = jnp.take_along_axis(patches, idx[:, :, None], axis=1)
  return patches.reshape(-1, features)
