"""GPTQ for one layer (Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", ICLR 2023), on any grid of `qjax.grids`.

Objective (Eq. 1): min over Q on the grid of ||X W - X Q||_F^2 for the layer's inputs X (m, N0)
in the partly quantized network, through H = X^T X (N0, N0). W is in Flax layout (N0 inputs, N1
neurons): one input row t is quantized at a time for all neurons, and the rows still to come
absorb its error (the OBS update, Eq. 2-3, in the Cholesky form of Sec. 3, Step 3):

  dead inputs (H[t, t] = 0): H[t, t] = 1 and W[t] = 0
  H <- H + damp * mean(diag H) I                          (damping, 1% by default)
  U = upper Cholesky factor of H^-1 (H^-1 = U^T U)
  for t = 0 .. N0-1:   q_t = round(w_t) on the grid of (group of t, neuron)
                       e_t = (w_t - q_t) / U[t, t]
                       w_j -= U[t, j] e_t   for every j > t   (all neurons at once)

Lazy batch updates (Sec. 3, Step 2): inside a block of B inputs, row i is brought up to date
when it is reached, as w_i - U[block, i]^T E (E: the block's errors so far; one (B,) x (B, N1)
product per column, as GPFQ's block kernel); the rows after the block get the block's errors
once, as one GEMM. The loops are `lax.scan`s over blocks and over the columns of a block, so
the program size does not grow with N0 (compile ~2-4 s at N0 = 4608 on CPU).

Cost: one Cholesky of H (LAPACK potrf; on a CPU shared with other busy processes OpenBLAS's
threads can make it tens of times slower: set OPENBLAS_NUM_THREADS=1), a triangular inverse
(by halving, mostly GEMMs), ~2 N0^2 N1 flops of lazy updates and N0 sequential column steps.

Options (as in the reference code):
* act_order: inputs in order of decreasing diag(H) (permute W and H, un-permute Q).
* Group grids (`qjax.grids.GridSpec(..., "group", g)`): without static groups, the scale of a
  group is fitted when the loop reaches its first input, from the weights as updated by every
  earlier input. (The reference code fits on its lazily updated copy, which misses the updates
  from earlier inputs of the same block when a group starts mid-block; here the block size is
  aligned to the groups instead, so both agree whenever groups start on block boundaries, e.g.
  g = B = 128, and Q does not depend on the block size.) `static_groups=True` fits every
  group's scale from W before the loop. With act_order the groups must be static: dynamic
  groups would follow the permuted order, and Q would not lie on a grid of consecutive inputs.
* A fitted `qjax.grids.Grid` is used as given (its scales are static by construction); a 1-D
  alphabet (as `qjax.gpfq_layer` takes) rounds to the nearest level (Eq. 5 of the GPFQ paper).

Where this differs from the reference code: the grid of a GridSpec is fitted on W after the dead
inputs are zeroed (their rows become 0 in Q anyway); U is computed as the reversed Cholesky
factor of H (one Cholesky and one triangular inverse) instead of Cholesky, inverse, Cholesky.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qjax import alphabets
from qjax import grids as grids_lib
from qjax import mesh as mesh_lib
from qjax import views as views_lib

_HIGHEST = jax.lax.Precision.HIGHEST


def _tmm(a: jax.Array, b: jax.Array) -> jax.Array:
  """a^T @ b at full float32 precision without materialising the transpose."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=_HIGHEST)


def _lower_inverse(L: jax.Array, leaf: int = 512) -> jax.Array:
  """L^-1 for lower triangular L: inv([[A, 0], [C, D]]) = [[A^-1, 0], [-D^-1 C A^-1, D^-1]],
  halved down to `leaf` rows (a triangular solve), so most flops are GEMMs (~25% faster than
  one triangular solve against the identity at N0 = 4608 on CPU). Depth log2(N0 / leaf)."""
  n = L.shape[0]
  if n <= leaf:
    return jax.lax.linalg.triangular_solve(L, jnp.eye(n, dtype=L.dtype), left_side=True,
                                           lower=True)
  h = n // 2
  Ai, Di = _lower_inverse(L[:h, :h], leaf), _lower_inverse(L[h:, h:], leaf)
  C = -jnp.matmul(Di, jnp.matmul(L[h:, :h], Ai, precision=_HIGHEST), precision=_HIGHEST)
  return jnp.block([[Ai, jnp.zeros((h, n - h), L.dtype)], [C, Di]])


def inverse_cholesky_upper(H: jax.Array) -> jax.Array:
  """Upper triangular U with H^-1 = U^T U, for symmetric positive definite H.

  With P the reversal permutation and L = chol(P H P) (lower), H = V V^T for the upper V = P L P,
  so H^-1 = V^-T V^-1 and U = V^-1 = P L^-1 P.
  """
  L = jnp.linalg.cholesky(H[::-1, ::-1])
  return _lower_inverse(L)[::-1, ::-1]


def _block_size(N0: int, block_size: int, group: int | None) -> tuple[int, int]:
  """(B, padded N0): B <= block_size, aligned so that a dynamic group starts either on a block
  boundary (g a multiple of B) or lies inside one block (B a multiple of g)."""
  B = min(block_size, N0)
  step = B
  if group is not None and group < N0:
    if group <= B:
      B = (B // group) * group
      step = B
    else:
      B = max(d for d in range(1, B + 1) if group % d == 0)
      step = group
  n = -(-N0 // step) * step
  return B, n


def column_loop(W, U, scale, zero, group_of_row, levels, *, mode: str, spec, maxq: int,
                block_size: int, dynamic: bool):
  """GPTQ's column loop (lazy blocks) on W (N0, N1) with U the upper Cholesky factor of the
  damped H^-1; row t rounds onto the grid of group_of_row[t]. Shared with `qjax.qronos_layer`.

  Returns (Q (N0, N1) in the order of W's rows, scale, zero)."""
  N0, N1 = W.shape
  group = spec.group_size if spec is not None else None
  B, n = _block_size(N0, block_size, group if dynamic else None)
  Wp = jnp.pad(W, ((0, n - N0), (0, 0)))
  Up = jnp.eye(n, dtype=U.dtype).at[:N0, :N0].set(U)  # padded inputs: independent, dropped
  rows = jnp.pad(group_of_row, (0, n - N0), mode="edge")

  def round_row(w, s, z):
    if mode == "levels":
      return alphabets.msq(w, levels)
    return grids_lib.round_to(w, s, z, maxq)

  def block(carry, k):
    Wc, scale, zero = carry
    s0 = k * B
    W1 = jax.lax.dynamic_slice_in_dim(Wc, s0, B)
    U1 = jax.lax.dynamic_slice(Up, (s0, s0), (B, B))
    U1T = U1.T  # U1T[i, j] = U[s0 + j, s0 + i]: what row i received from row j of the block

    def column(c, i):
      Err, scale, zero = c
      t = s0 + i
      if dynamic:
        g = group
        valid = (t + jnp.arange(g) < N0)[:, None]
        # Rows t..t+g-1 with every earlier input's update: inside this block (B a multiple of
        # g) or, for g > B, at a block start where the lazily updated Wc is current.
        if g <= B:
          src = lambda: (jax.lax.dynamic_slice_in_dim(W1, i, g)  # noqa: E731
                         - _tmm(jax.lax.dynamic_slice_in_dim(U1, i, g, axis=1), Err))
        else:
          src = lambda: jax.lax.dynamic_slice_in_dim(Wc, s0, g)  # noqa: E731

        def refit(sz):
          sc, zr = sz
          s_new, z_new = grids_lib.fit_groups(src()[None], spec, valid[None])
          return sc.at[t // g].set(s_new[0]), zr.at[t // g].set(z_new[0])

        scale, zero = jax.lax.cond((t % g == 0) & (t < N0), refit, lambda sz: sz, (scale, zero))
      r = rows[t]
      # Row i as updated by the block's earlier rows (Err rows >= i are still zero): one
      # (B,) x (B, N1) product per column instead of a rank-1 update of the whole block.
      w = W1[i] - jnp.matmul(U1T[i], Err, precision=_HIGHEST)
      q = round_row(w, scale[r], zero[r])
      err = (w - q) / U1[i, i]
      return (Err.at[i].set(err), scale, zero), q

    (Err, scale, zero), Q1 = jax.lax.scan(column, (jnp.zeros_like(W1), scale, zero),
                                          jnp.arange(B))
    # Lazy update of every later row with the block's errors (rows before the block see
    # U[block, j] = 0; this block's own rows are already quantized).
    Wc = Wc - _tmm(jax.lax.dynamic_slice_in_dim(Up, s0, B), Err)
    return (Wc, scale, zero), Q1

  (_, scale, zero), Q = jax.lax.scan(block, (Wp, scale, zero), jnp.arange(n // B))
  return Q.reshape(n, N1)[:N0], scale, zero


@functools.partial(jax.jit, static_argnames=("mode", "spec", "maxq", "block_size", "act_order",
                                             "dynamic"))
def _gptq(W, H, scale, zero, group_of_row, levels, damp, *, mode: str, spec, maxq: int,
          block_size: int, act_order: bool, dynamic: bool):
  """The whole layer: dead inputs, grid fit, act-order, damping, U, the blocked loop.

  Returns (Q (N0, N1) in input order, scale (G, N1), zero (G, N1), finite: U has no NaN).
  """
  N0, N1 = W.shape
  d = jnp.diagonal(H)
  dead = d == 0
  H = H + jnp.diag(jnp.where(dead, 1.0, 0.0).astype(H.dtype))
  W = jnp.where(dead[:, None], jnp.zeros_like(W), W)
  if mode == "spec" and not dynamic:  # fit on W with dead inputs zeroed, before the loop
    g = grids_lib.fit(W, spec)
    scale, zero = g.scale, g.zero
  if act_order:
    perm = jnp.argsort(-jnp.diagonal(H), stable=True)
    W, H, group_of_row = W[perm], H[perm][:, perm], group_of_row[perm]
  H = H + damp * jnp.mean(jnp.diagonal(H)) * jnp.eye(N0, dtype=H.dtype)
  U = inverse_cholesky_upper(H)
  finite = jnp.all(jnp.isfinite(U))

  Q, scale, zero = column_loop(W, U, scale, zero, group_of_row, levels, mode=mode, spec=spec,
                               maxq=maxq, block_size=block_size, dynamic=dynamic)
  if act_order:
    Q = jnp.zeros_like(Q).at[perm].set(Q)
  return Q, scale, zero, finite


def _all_finite(a: Any) -> bool:
  if isinstance(a, jax.core.Tracer):
    return True
  with jax.ensure_compile_time_eval():
    return bool(jnp.isfinite(jnp.asarray(a)).all())


def gptq_layer(W: Any, H: Any, grid: Any, *, block_size: int = 128, damp: float = 0.01,
               act_order: bool = False, static_groups: bool = False,
               return_grid: bool = False, dtype: Any = jnp.float32):
  """Quantize one layer with GPTQ (Frantar et al., ICLR 2023), all neurons at once.

  Args:
    W: float kernel (N0, N1), Flax layout (rows = inputs, columns = neurons).
    H: (N0, N0) Hessian proxy X^T X of the layer's (partly quantized network's) inputs; any
      positive scale (the reference's 2/m does not change Q: damping is relative).
    grid: a `qjax.grids.GridSpec` (fitted here, see the module docstring for groups), a fitted
      `qjax.grids.Grid` (used as is), or a 1-D alphabet (nearest level).
    block_size: inputs per lazy block (Q is the same for every value up to float rounding order;
      aligned to dynamic groups).
    damp: the fraction of mean(diag H) added to the diagonal, >= 0.
    act_order: process inputs by decreasing diag(H).
    static_groups: fit every group's scale from W before the loop (required with act_order on
      group grids given as a GridSpec).
    return_grid: also return the grid Q lies on (a Grid; None for a 1-D alphabet).
    dtype: compute dtype (float32).

  Returns:
    Q with the shape and dtype of W, every entry on the grid; with return_grid, (Q, grid).

  Raises:
    ValueError / TypeError naming the argument: W not 2-D or with NaN/Inf, H not (N0, N0) or
    with NaN/Inf, a grid that does not fit W, a bad alphabet, damp < 0, block_size <= 0,
    act_order with dynamic groups, H not positive definite after damping.
  """
  W = jnp.asarray(W)
  if W.ndim != 2 or W.size == 0:
    raise ValueError(f"W must be a non-empty 2-D (N0, N1) array, got shape {W.shape}")
  if not jnp.issubdtype(W.dtype, jnp.floating):
    raise TypeError(f"W must be a float array, got dtype {W.dtype} (cast it, e.g. "
                    "W.astype(jnp.float32): Q would be cast back and truncated)")
  N0, N1 = W.shape
  H = jnp.asarray(H)
  if H.shape != (N0, N0):
    raise ValueError(f"H must have shape (N0, N0) = ({N0}, {N0}) to match W, got {H.shape}")
  if not _all_finite(W):
    raise ValueError("W contains NaN or Inf")
  if not _all_finite(H):
    raise ValueError("H contains NaN or Inf: X^T X of the layer's inputs overflows float32 "
                     "(rescale the inputs) or the inputs hold NaN")
  if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or (
      block_size < 1):
    raise ValueError(f"block_size must be a positive int, got {block_size!r}")
  if not isinstance(damp, jax.core.Tracer) and not (np.isfinite(damp) and damp >= 0):
    raise ValueError(f"damp must be finite and >= 0, got {damp}")
  ops = grid_operands(grid, W.shape, dtype)
  mode, spec, maxq, scale, zero, group_of_row, levels = ops
  # One group (g >= N0) is fitted at t = 0, before any update: the same as static.
  dynamic = (mode == "spec" and spec.group_size is not None and spec.group_size < N0
             and not static_groups)
  if dynamic and act_order:
    raise ValueError("act_order with a group grid needs static_groups=True: dynamic groups "
                     "would follow the permuted order, so Q would not lie on a grid of "
                     "consecutive inputs")
  Q, scale, zero, finite = _gptq(
      W.astype(dtype), H.astype(dtype), scale, zero, group_of_row, levels,
      jnp.asarray(damp, dtype), mode=mode, spec=spec, maxq=maxq, block_size=int(block_size),
      act_order=bool(act_order), dynamic=dynamic)
  if not isinstance(finite, jax.core.Tracer) and not bool(finite):
    raise ValueError("H is not positive definite after damping (Cholesky failed); raise damp")
  return with_grid(Q.astype(jax.dtypes.canonicalize_dtype(W.dtype)), grid, ops._replace(
      scale=scale, zero=zero), return_grid)


class GridOperands(NamedTuple):
  """What the column loop rounds onto (`grid_operands`); mode 'spec' fits scale and zero in the
  loop, 'grid' uses the given ones, 'levels' rounds to the nearest of `levels`."""
  mode: str
  spec: grids_lib.GridSpec | None
  maxq: int
  scale: jax.Array
  zero: jax.Array
  group_of_row: jax.Array
  levels: jax.Array


def grid_operands(grid: Any, shape: tuple[int, int], dtype: Any) -> GridOperands:
  """Checked operands of `grid` (a GridSpec, a fitted Grid or a 1-D alphabet) for an (N0, N1)
  kernel; placeholders where a mode does not use them."""
  N0, N1 = shape
  levels = jnp.zeros((1,), dtype)
  if isinstance(grid, grids_lib.GridSpec):
    scale = zero = jnp.zeros((grid.num_groups(N0), N1), jnp.float32)
    group_of_row = jnp.asarray(np.arange(N0) // (grid.group_size or N0), jnp.int32)
    return GridOperands("spec", grid, grid.maxq, scale, zero, group_of_row, levels)
  if isinstance(grid, grids_lib.Grid):
    grid.check_fits(shape)
    if not _all_finite(grid.scale):
      raise ValueError("grid.scale contains NaN or Inf")
    return GridOperands("grid", None, grid.maxq, grid.scale, grid.zero,
                        jnp.asarray(grid.group_index(N0)), levels)
  if isinstance(grid, str) or not (hasattr(grid, "shape") or isinstance(grid, (list, tuple))):
    raise TypeError(f"grid must be a qjax.grids.GridSpec, a qjax.grids.Grid or a 1-D "
                    f"alphabet, got {type(grid).__name__} {grid!r}; e.g. "
                    "qjax.grids.GridSpec(4) or qjax.grids.fit(W, spec)")
  levels = jnp.asarray(grid, dtype)
  if levels.ndim != 1 or levels.shape[0] == 0:
    raise TypeError(f"grid must be a qjax.grids.GridSpec, a qjax.grids.Grid or a non-empty 1-D "
                    f"alphabet, got shape {levels.shape}")
  if not _all_finite(levels):
    raise ValueError("grid (alphabet) contains NaN or Inf")
  scale = zero = jnp.zeros((1, N1), jnp.float32)
  return GridOperands("levels", None, 0, scale, zero, jnp.zeros((N0,), jnp.int32),
                      jnp.sort(levels))


def with_grid(Q: jax.Array, grid: Any, ops: GridOperands, return_grid: bool):
  """Q, or (Q, the grid Q lies on) with return_grid: the given Grid, the one fitted from a
  GridSpec (ops' scale and zero from the loop), None for an alphabet."""
  if not return_grid:
    return Q
  if ops.mode == "levels":
    return Q, None
  if ops.mode == "grid":
    return Q, grid
  spec = ops.spec
  return Q, grids_lib.Grid(ops.scale, ops.zero, bits=spec.bits, symmetric=spec.symmetric,
                           group_size=spec.group_size, per_tensor=spec.granularity == "tensor")


# ------------------------------------------------------------------------------------------------
# The whole network on the one-pass driver (qjax.driver).


@functools.partial(jax.jit, static_argnames=("reduce_chunks",))
def _add_h(H, xt, reduce_chunks=None):
  """H + xt^T xt; with `reduce_chunks`, summed in a device-independent order (`exact_tmm`)."""
  return H + (_tmm(xt, xt) if reduce_chunks is None else
              mesh_lib.exact_tmm(xt, xt, reduce_chunks))


def gptq_quantizer(*, granularity: str = "channel", group_size: int | None = None,
                   symmetric: bool = False, scale_method: str = "max",
                   alphabet: str | None = None, C: float = 1.0, block_size: int = 128,
                   damp: float = 0.01, act_order: bool = False, static_groups: bool = False,
                   grids_out: views_lib.Targets | None = None):
  """The GPTQ `quantize_layer` for `qjax.driver.run`: H = sum over chunks of X~^T X~ per
  independent problem, the layer's grid `GridSpec(info.bits, granularity, ...)` (or the GPFQ
  alphabet `qjax.alphabets.levels_for(W, bits, C, alphabet)`), then `gptq_layer`; the extras
  record the RTN (MSQ) error on the same grid and data. Fitted grids go into `grids_out` (a
  `qjax.views.Targets` {layer name: Grid or alphabet}) when given, each grid with its view (the
  driver's matrix of the layer, `info.leaf_index()`) for `qjax.export.pack`."""
  def quantize_layer(name: str, W: jax.Array, chunks, info):
    W = jnp.asarray(W, jnp.float32)
    if alphabet is not None:
      target = alphabets.levels_for(W, info.bits, C, alphabet) if bool(jnp.any(W != 0)) else (
          jnp.zeros((1,), jnp.float32))
    else:
      target = grids_lib.GridSpec(info.bits, granularity, group_size, symmetric=symmetric,
                                  method=scale_method)
    slices = info.group_slices()
    Hs = [jnp.zeros((W.shape[0], W.shape[0]), jnp.float32) for _ in slices]
    exact = getattr(info, "reduce_chunks", None)
    for _, xt in chunks:
      xt = jnp.asarray(xt, jnp.float32)
      if exact is not None:
        mesh_lib.check_chunk_rows(xt, exact)
      Hs = [_add_h(H, xt if len(slices) == 1 else xt[:, rows], exact)
            for H, (rows, _) in zip(Hs, slices)]
    Qs, gs = [], []
    for H, (_, cols) in zip(Hs, slices):
      Q, g = gptq_layer(W[:, cols], H, target, block_size=block_size, damp=damp,
                        act_order=act_order, static_groups=static_groups, return_grid=True)
      Qs.append(Q)
      gs.append(g)
    Q = jnp.concatenate(Qs, axis=1) if len(Qs) > 1 else Qs[0]
    if alphabet is not None:
      rtn = alphabets.msq(W, target)
      grid = None
    else:
      grid = gs[0] if len(gs) == 1 else grids_lib.Grid(
          jnp.concatenate([g.scale for g in gs], axis=1),
          jnp.concatenate([g.zero for g in gs], axis=1), bits=gs[0].bits,
          symmetric=gs[0].symmetric, group_size=gs[0].group_size, per_tensor=False)
      # RTN on the same grid (for dynamic groups: the grid GPTQ ended with).
      rtn = grid.round(W)
    if grids_out is not None:  # an alphabet (grid None) is one set of levels: no view needed
      grids_out.add(name, target if grid is None else grid,
                    None if grid is None else info.leaf_index())
    return Q, dict(msq_error=info.error(rtn))
  return quantize_layer


def gptq(params: Any, apply_fn: Any, batch: Any, *, bits: Any = 4,
         granularity: str = "channel", group_size: int | None = None, symmetric: bool = False,
         scale_method: str = "max", alphabet: str | None = None, C: float = 1.0,
         block_size: int = 128, damp: float = 0.01, act_order: bool = False,
         static_groups: bool = False, skip: str | None = None, last_layer_float: bool = False,
         bias_correction: bool = False, patch_p: float = 1.0, patch_stride: str = "layer",
         key: Any = None, apply_kwargs: Any = None, progress: bool = True,
         return_grids: bool = False, act: Any = None, act_scales: Any = None,
         reduce_chunks: int | None = None):
  """Quantize any JAX model with GPTQ, layer by layer in program order, on `qjax.driver`.

  Layer i's H = X~^T X~ comes from the network with layers < i already quantized (GPTQ's
  sequential setting), all on `batch` in one lockstep pass (`qjax.driver.run`); a conv layer's
  rows are its patches (by default every position at the conv's own strides, as the reference
  unfolds). Options and report as `qjax.gpfq` (bits rules, skip, last_layer_float,
  bias_correction, patch sampling); the report's 'msq err' column is RTN on the same grid.

  Args:
    params, apply_fn, batch: as `qjax.gpfq` (any JAX function `apply_fn(params, batch)`).
    bits: bits for every layer or {regex: bits} with 'default' (`qjax.rules`).
    granularity, group_size, symmetric, scale_method: the grid of each layer,
      `qjax.grids.GridSpec(bits, granularity, group_size, symmetric, scale_method)`; GPTQ's
      reference default is asymmetric min-max per channel. Grids belong to each weight op's
      matrix (`qjax.views`: a conv's rows channel-major (Cin, kh, kw), a DenseGeneral kernel
      (in, heads, head_dim) as (in, heads*head_dim), ...); `qjax.quantize_rtn` with
      `views=qjax.views.kernel_views(...)` rounds onto the same grids.
    alphabet: instead of a grid, the GPFQ paper's per-layer alphabet by this rule ('paper',
      'reference', 'uniform'; `qjax.alphabets.levels_for(W, bits, C, alphabet)`).
    block_size, damp, act_order, static_groups: as `gptq_layer`.
    return_grids: also return a `qjax.views.Targets` {layer name: Grid or alphabet} that
      carries each grid's view: `qjax.export.pack(q, grids)` packs every layer exactly (conv
      group grids, DenseGeneral / Einsum / tied-embedding kernels, scan slices 'name[i]').
    act, act_scales: activation quantization (`qjax.ActSpec` or rules; `qjax.driver.run`): each
      layer's H = X^~T X^~ of its fake-quantized inputs in the quantized network; static
      scales are calibrated on that stream (`report.act_scales`) unless given.
    reduce_chunks: None, or C for a deterministic reduction: each H summed over C fixed row
      chunks in a fixed order and the segments' weights used whole, so one device and every
      mesh give the same Q bit for bit (`qjax.driver.run`; C x N0 x N0 float32 at once).

  Returns:
    (quantized params, `qjax.driver.Report`), plus the grids with return_grids.
  """
  from qjax import driver  # imported here: the driver is only needed for whole networks
  if alphabet is None:  # validate the grid options eagerly (bits come per layer)
    grids_lib.GridSpec(4, granularity, group_size, symmetric=symmetric, method=scale_method)
  elif alphabet not in ("paper", "reference", "uniform"):
    raise ValueError(f"alphabet must be None, 'paper', 'reference' or 'uniform', got "
                     f"{alphabet!r}")
  fitted = views_lib.Targets()
  fn = gptq_quantizer(granularity=granularity, group_size=group_size, symmetric=symmetric,
                      scale_method=scale_method, alphabet=alphabet, C=C,
                      block_size=block_size, damp=damp, act_order=act_order,
                      static_groups=static_groups, grids_out=fitted)
  q_params, report = driver.run(params, apply_fn, batch, fn, bits=bits, skip=skip,
                                last_layer_float=last_layer_float,
                                bias_correction=bias_correction, patch_p=patch_p,
                                patch_stride=patch_stride, key=key, apply_kwargs=apply_kwargs,
                                progress=progress, method="gptq", act=act,
                                act_scales=act_scales, reduce_chunks=reduce_chunks)
  return (q_params, report, fitted) if return_grids else (q_params, report)
