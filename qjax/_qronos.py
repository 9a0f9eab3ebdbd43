"""Qronos for one layer and for a whole network (Zhang, Zhang, Colbert, Saab, "Qronos: Correcting
the Past by Shaping the Future... in Post-Training Quantization", arXiv 2505.11695, 2025; the
reference implementation is Brevitas `src/brevitas/graph/qronos.py`).

Qronos keeps GPFQ's mismatched objective min ||X W - X~ Q||_F (X the float network's layer
inputs, X~ the partly quantized network's) and adds GPTQ's optimal re-fit of the weights not yet
rounded. With H = X~^T X~, G = X~^T X (N0, N0), lambda the damping, Flax layout (row t = input t):

  dead inputs (H[t, t] = 0): H[t, t] = 1 and W[t] = 0 (as `qjax.gptq_layer`)
  step 1: q_0 = Q(<X~_0, X w - X~_{>0} w_{>0}> / ||X~_0||^2)
               = Q((G[0] W - H[0, >0] W[>0]) / H[0, 0])        (GPFQ's argument, float future)
  step 2: V = (H[>0, >0] + lambda I)^-1 (G[>0] W + lambda W[>0] - H[>0, 0] q_0)
               (the least-squares re-fit of the rest to X W - X~_0 q_0, ridge lambda towards W)
  step 3: GPTQ's column loop on V with U = upper Cholesky factor of (H[>0, >0] + lambda I)^-1
               (`qjax._gptq.column_loop`: lazy blocks, a `lax.scan`).

With X~ = X (G = H), step 1 gives q_0 = round(w_0) and step 2 is GPTQ's first update, so Qronos
is exactly GPTQ on H + lambda I. Act-order permutes W, H and G by decreasing diag(H) and
un-permutes Q. Grids are fitted from W before the loop (static groups, as GPTQ with
`static_groups=True`), so Q lies on the same levels as RTN / GPTQ / GPFQ on the same GridSpec.

Damping: lambda = damp x mean(diag H) (`damp_rule="mean"`, the convention of `qjax.gptq`), or the
paper's lambda = damp x lambda_max(H) (`damp_rule="max_eig"`, Brevitas' alpha = 1e-6).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Iterable, Literal

import jax
import jax.numpy as jnp
import numpy as np

from qjax import alphabets
from qjax import grids as grids_lib
from qjax import views as views_lib
from qjax._gpfq import kernels
from qjax._gpfq import layer as gpfq_layer_lib
from qjax._gptq import _HIGHEST, column_loop, inverse_cholesky_upper

DampRule = Literal["mean", "max_eig"]


def _mm(a, b):
  return jnp.matmul(a, b, precision=_HIGHEST)


@functools.partial(jax.jit, static_argnames=("mode", "spec", "maxq", "block_size", "act_order",
                                             "damp_rule"))
def _qronos(W, H, G, scale, zero, group_of_row, levels, damp, *, mode: str, spec, maxq: int,
            block_size: int, act_order: bool, damp_rule: str):
  """Returns (Q (N0, N1) in input order, scale, zero, finite: the factor has no NaN)."""
  N0, N1 = W.shape
  dead = jnp.diagonal(H) == 0
  H = H + jnp.diag(jnp.where(dead, 1.0, 0.0).astype(H.dtype))
  W = jnp.where(dead[:, None], jnp.zeros_like(W), W)
  if mode == "spec":  # static grid, fitted on W with dead inputs zeroed
    g = grids_lib.fit(W, spec)
    scale, zero = g.scale, g.zero
  if act_order:
    perm = jnp.argsort(-jnp.diagonal(H), stable=True)
    W, H, G, group_of_row = W[perm], H[perm][:, perm], G[perm][:, perm], group_of_row[perm]
  if damp_rule == "mean":
    lam = damp * jnp.mean(jnp.diagonal(H))
  else:
    lam = damp * jnp.linalg.eigvalsh(H)[-1]

  def round_row(w, r):
    if mode == "levels":
      return alphabets.msq(w, levels)
    return grids_lib.round_to(w, scale[r], zero[r], maxq)

  # Step 1: GPFQ's argument for input 0 against the float future W[>0].
  z0 = (_mm(G[0], W) - _mm(H[0, 1:], W[1:])) / H[0, 0]
  q0 = round_row(z0, group_of_row[0])
  if N0 == 1:
    Q, finite = q0[None], jnp.array(True)
  else:
    Hs = H[1:, 1:] + lam * jnp.eye(N0 - 1, dtype=H.dtype)
    U = inverse_cholesky_upper(Hs)  # Hs^-1 = U^T U
    finite = jnp.all(jnp.isfinite(U))
    # Step 2: the ridge re-fit of the rest, V = Hs^-1 rhs as two triangular products.
    rhs = _mm(G[1:], W) + lam * W[1:] - H[1:, :1] * q0[None, :]
    V = _mm(U.T, _mm(U, rhs))
    # Step 3: GPTQ's loop on V.
    Qr, scale, zero = column_loop(V, U, scale, zero, group_of_row[1:], levels, mode=mode,
                                  spec=spec, maxq=maxq, block_size=block_size, dynamic=False)
    Q = jnp.concatenate([q0[None], Qr])
  if act_order:
    Q = jnp.zeros_like(Q).at[perm].set(Q)
  return Q, scale, zero, finite


def _check_damp(damp: Any, damp_rule: str) -> float:
  if damp_rule not in ("mean", "max_eig"):
    raise ValueError(f"damp_rule must be 'mean' or 'max_eig', got {damp_rule!r}")
  if isinstance(damp, bool) or not isinstance(damp, (int, float, np.floating, np.integer)) or (
      not (math.isfinite(float(damp)) and float(damp) > 0)):
    raise ValueError(f"damp must be finite and > 0 (Qronos' step 2 solves with H + damp I), "
                     f"got {damp!r}")
  return float(damp)


def qronos_grams(W: Any, X: Any, X_tilde: Any, dtype: Any = jnp.float32):
  """(H = X~^T X~, G = X~^T X) of arrays or of a stream of (x, xt) chunks, checked as
  `qjax.gpfq_layer` checks them (shapes naming X / X_tilde, NaN/Inf, 0 rows)."""
  return kernels.gram_from_chunks(gpfq_layer_lib._chunks(W, X, X_tilde), W.shape[0], dtype)


def qronos_layer(W: Any, X: Any, X_tilde: Any, grid: Any, *, damp: float = 0.01,
                 damp_rule: DampRule = "mean", act_order: bool = False, block_size: int = 128,
                 return_grid: bool = False, layer: str | None = None,
                 dtype: Any = jnp.float32):
  """Quantize one layer with Qronos (see the module docstring), all neurons at once.

  Args:
    W: float kernel (N0, N1), Flax layout (rows = inputs, columns = neurons).
    X: the float network's layer input (m, N0); or an iterable of (X_chunk, X_tilde_chunk)
      pairs (then X_tilde = None), accumulated into H and G (memory O(N0^2) whatever m).
    X_tilde: the quantized network's layer input (m, N0), same rows as X; None means X.
    grid: a `qjax.grids.GridSpec` (fitted on W, static groups), a fitted `qjax.grids.Grid`, or a
      1-D alphabet (nearest level).
    damp: > 0; lambda = damp x mean(diag H) ('mean') or damp x lambda_max(H) ('max_eig').
    damp_rule: 'mean' (the `qjax.gptq` convention) or 'max_eig' (the paper's, alpha ~ 1e-6).
    act_order: process inputs by decreasing diag(X~^T X~).
    block_size: inputs per lazy block of step 3 (Q does not depend on it up to float order).
    return_grid: also return the grid Q lies on (None for an alphabet).
    layer: the layer's name, for error messages.
    dtype: compute dtype (float32).

  Returns:
    Q with the shape and dtype of W, every entry on the grid; with return_grid, (Q, grid).

  Raises:
    ValueError naming the argument (and `layer`): bad shapes, X and X_tilde of different shapes,
    NaN/Inf, damp <= 0 or non-finite, block_size <= 0, a Cholesky that fails.
  """
  where = f"layer {layer!r}: " if layer else ""
  try:
    W = jnp.asarray(W)
    gpfq_layer_lib._check_W(W)
    damp = _check_damp(damp, damp_rule)
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or (
        block_size < 1):
      raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    N0, N1 = W.shape
    levels = jnp.zeros((1,), dtype)
    spec = None
    if isinstance(grid, grids_lib.GridSpec):
      mode, spec, maxq = "spec", grid, grid.maxq
      scale = zero = jnp.zeros((grid.num_groups(N0), N1), jnp.float32)
      group_of_row = jnp.asarray(np.arange(N0) // (grid.group_size or N0), jnp.int32)
    elif isinstance(grid, grids_lib.Grid):
      grid.check_fits(W.shape)
      mode, maxq, scale, zero = "grid", grid.maxq, grid.scale, grid.zero
      group_of_row = jnp.asarray(grid.group_index(N0))
    else:
      levels = jnp.asarray(grid, dtype)
      if levels.ndim != 1 or levels.shape[0] == 0:
        raise TypeError(f"grid must be a qjax.grids.GridSpec, a qjax.grids.Grid or a non-empty "
                        f"1-D alphabet, got shape {levels.shape}")
      if not gpfq_layer_lib._all_finite(levels):
        raise ValueError("grid (alphabet) contains NaN or Inf")
      levels, mode, maxq = jnp.sort(levels), "levels", 0
      scale = zero = jnp.zeros((1, N1), jnp.float32)
      group_of_row = jnp.zeros((N0,), jnp.int32)
    H, G = qronos_grams(W, X, X_tilde, dtype)
  except (ValueError, TypeError) as e:
    if not where:
      raise
    raise type(e)(where + str(e)) from None
  Q, scale, zero, finite = _qronos(
      W.astype(dtype), H, G, scale, zero, group_of_row, levels, jnp.asarray(damp, dtype),
      mode=mode, spec=spec, maxq=maxq, block_size=int(block_size), act_order=bool(act_order),
      damp_rule=damp_rule)
  if not isinstance(finite, jax.core.Tracer) and not bool(finite):
    raise ValueError(f"{where}X_tilde^T X_tilde + damping is not positive definite (Cholesky "
                     f"failed, damp={damp}): raise damp or use more calibration data")
  Q = Q.astype(jax.dtypes.canonicalize_dtype(W.dtype))
  if not return_grid:
    return Q
  if mode == "levels":
    return Q, None
  if mode == "grid":
    return Q, grid
  return Q, grids_lib.Grid(scale, zero, bits=spec.bits, symmetric=spec.symmetric,
                           group_size=spec.group_size, per_tensor=spec.granularity == "tensor")
