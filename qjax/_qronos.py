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
from qjax import mesh as mesh_lib
from qjax import views as views_lib
from qjax._gpfq import kernels
from qjax._gpfq import layer as gpfq_layer_lib
from qjax._gptq import _HIGHEST, column_loop, grid_operands, inverse_cholesky_upper, with_grid

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


def qronos_grams(W: Any, X: Any, X_tilde: Any, dtype: Any = jnp.float32,
                 reduce_chunks: int | None = None):
  """(H = X~^T X~, G = X~^T X) of arrays or of a stream of (x, xt) chunks, checked as
  `qjax.gpfq_layer` checks them (shapes naming X / X_tilde, NaN/Inf, 0 rows); `reduce_chunks`:
  rows summed in a device-independent order (`qjax.mesh.exact_tmm`)."""
  return kernels.gram_from_chunks(gpfq_layer_lib._chunks(W, X, X_tilde), W.shape[0], dtype,
                                  reduce_chunks)


def qronos_layer(W: Any, X: Any, X_tilde: Any, grid: Any, *, damp: float = 0.01,
                 damp_rule: DampRule = "mean", act_order: bool = False, block_size: int = 128,
                 return_grid: bool = False, layer: str | None = None,
                 dtype: Any = jnp.float32, reduce_chunks: int | None = None):
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
    reduce_chunks: None, or C: H and G summed over C fixed row chunks in a fixed order
      (`qjax.mesh.exact_tmm`), so rows split over devices give the one-device Grams bit for bit.

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
    ops = grid_operands(grid, W.shape, dtype)
    mesh_lib.check_reduce_chunks(reduce_chunks)
    H, G = qronos_grams(W, X, X_tilde, dtype, reduce_chunks)
  except (ValueError, TypeError) as e:
    if not where:
      raise
    raise type(e)(where + str(e)) from None
  Q, scale, zero, finite = _qronos(
      W.astype(dtype), H, G, ops.scale, ops.zero, ops.group_of_row, ops.levels,
      jnp.asarray(damp, dtype), mode=ops.mode, spec=ops.spec, maxq=ops.maxq,
      block_size=int(block_size), act_order=bool(act_order), damp_rule=damp_rule)
  if not isinstance(finite, jax.core.Tracer) and not bool(finite):
    raise ValueError(f"{where}X_tilde^T X_tilde + damping is not positive definite (Cholesky "
                     f"failed, damp={damp}): raise damp or use more calibration data")
  return with_grid(Q.astype(jax.dtypes.canonicalize_dtype(W.dtype)), grid,
                   ops._replace(scale=scale, zero=zero), return_grid)


# ------------------------------------------------------------------------------------------------
# The whole network on the one-pass driver (qjax.driver).


def qronos_quantizer(*, granularity: str = "channel", group_size: int | None = None,
                     symmetric: bool = False, scale_method: str = "max",
                     alphabet: str | None = None, C: float = 1.0, block_size: int = 128,
                     damp: float = 0.01, damp_rule: DampRule = "mean", act_order: bool = False,
                     grids_out: views_lib.Targets | None = None):
  """The Qronos `quantize_layer` for `qjax.driver.run`: per independent problem, H = X~^T X~
  and G = X~^T X summed over the chunks, the layer's grid `GridSpec(info.bits, granularity,
  ...)` (or the GPFQ alphabet), then `qronos_layer`; extras: the RTN (MSQ) error on the same grid.
  Fitted grids go into `grids_out` with their views, as `qjax._gptq.gptq_quantizer`."""
  def quantize_layer(name: str, W: jax.Array, chunks, info):
    W = jnp.asarray(W, jnp.float32)
    exact = getattr(info, "reduce_chunks", None)
    if exact is not None:  # W whole: products over its split rows would sum partials
      W = mesh_lib.replicated(W)
    if alphabet is not None:
      target = alphabets.levels_for(W, info.bits, C, alphabet) if bool(jnp.any(W != 0)) else (
          jnp.zeros((1,), jnp.float32))
    else:
      target = grids_lib.GridSpec(info.bits, granularity, group_size, symmetric=symmetric,
                                  method=scale_method)
    slices = info.group_slices()
    Qs, gs = [], []
    for rows, cols in slices:
      data = chunks if len(slices) == 1 else [(x[:, rows], xt[:, rows]) for x, xt in chunks]
      Q, g = qronos_layer(W[:, cols], data, None, target, damp=damp, damp_rule=damp_rule,
                          act_order=act_order, block_size=block_size, return_grid=True,
                          layer=name, reduce_chunks=exact)
      Qs.append(Q)
      gs.append(g)
    Q = jnp.concatenate(Qs, axis=1) if len(Qs) > 1 else Qs[0]
    if alphabet is not None:
      rtn, grid = alphabets.msq(W, target), None
    else:
      grid = gs[0] if len(gs) == 1 else grids_lib.Grid(
          jnp.concatenate([g.scale for g in gs], axis=1),
          jnp.concatenate([g.zero for g in gs], axis=1), bits=gs[0].bits,
          symmetric=gs[0].symmetric, group_size=gs[0].group_size, per_tensor=False)
      rtn = grid.round(W)
    if grids_out is not None:
      grids_out.add(name, target if grid is None else grid,
                    None if grid is None else info.leaf_index())
    return Q, dict(msq_error=info.error(rtn))
  return quantize_layer


def qronos(params: Any, apply_fn: Any, batch: Any, *, bits: Any = 4,
           granularity: str = "channel", group_size: int | None = None, symmetric: bool = False,
           scale_method: str = "max", alphabet: str | None = None, C: float = 1.0,
           block_size: int = 128, damp: float = 0.01, damp_rule: DampRule = "mean",
           damp_grid: Iterable[float] | None = None, holdout_fraction: float = 0.2,
           holdout_loss: Any = None, act_order: bool = False, skip: str | None = None,
           last_layer_float: bool = False, bias_correction: bool = False, patch_p: float = 1.0,
           patch_stride: str = "layer", key: Any = None, apply_kwargs: Any = None,
           progress: bool = True, return_grids: bool = False, act: Any = None,
           act_scales: Any = None, reduce_chunks: int | None = None):
  """Quantize any JAX model with Qronos, layer by layer in program order, on `qjax.driver`.

  Layer i sees X from the float network and X~ from the network with layers < i quantized, both
  on `batch` in one lockstep pass (as `qjax.gpfq`), and runs `qronos_layer` on H = X~^T X~ and
  G = X~^T X. Grids, bits rules, skip, patches, report and export as `qjax.gptq`.

  Args:
    params, apply_fn, batch, bits, granularity, group_size, symmetric, scale_method, alphabet,
      C, block_size, skip, last_layer_float, bias_correction, patch_p, patch_stride, key,
      apply_kwargs, progress, return_grids, act, act_scales: as `qjax.gptq`.
    damp, damp_rule, act_order: as `qronos_layer`.
    damp_grid: values of damp to try: the network is quantized on the first
      1 - holdout_fraction of the (single) batch for each, and the one with the least
      `holdout_loss` (default: relative output error ||f_q - f||^2 / ||f||^2) on the held-out
      tail wins; the report's `damp` is the choice and `C_search` the (damp, loss) pairs. Never
      give it test data: shuffle the calibration batch first.
    reduce_chunks: None, or C for a deterministic reduction (H, G over C fixed row chunks,
      weights used whole), so one device and every mesh give the same Q bit for bit, as
      `qjax.gptq`.

  Returns:
    (quantized params, `qjax.driver.Report`), plus the grids with return_grids.
  """
  import dataclasses
  import time
  from qjax import driver
  from qjax.calibration import holdout_size, output_error
  start = time.perf_counter()
  if alphabet is None:
    grids_lib.GridSpec(4, granularity, group_size, symmetric=symmetric, method=scale_method)
  elif alphabet not in ("paper", "reference", "uniform"):
    raise ValueError(f"alphabet must be None, 'paper', 'reference' or 'uniform', got "
                     f"{alphabet!r}")
  damps = (damp,) if damp_grid is None else tuple(damp_grid)
  if not damps:
    raise ValueError("damp_grid must hold at least one value")
  damps = tuple(_check_damp(d, damp_rule) for d in damps)
  if damp_grid is not None and not 0.0 < holdout_fraction < 1.0:
    raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
  driver.check_options(patch_p, patch_stride, key)
  mesh_lib.check_reduce_chunks(reduce_chunks)
  options = dict(bits=bits, skip=skip, last_layer_float=last_layer_float,
                 bias_correction=bias_correction, patch_p=patch_p, patch_stride=patch_stride,
                 key=key, progress=progress, method="qronos", act=act, act_scales=act_scales,
                 reduce_chunks=reduce_chunks)

  def make(d, out):
    return qronos_quantizer(granularity=granularity, group_size=group_size, symmetric=symmetric,
                            scale_method=scale_method, alphabet=alphabet, C=C,
                            block_size=block_size, damp=d, damp_rule=damp_rule,
                            act_order=act_order, grids_out=out)

  if damp_grid is None:
    fitted = views_lib.Targets()
    prep = driver.prepare(params, apply_fn, batch, apply_kwargs)
    q_params, report = driver.execute(prep, make(damps[0], fitted), **options)
    report = dataclasses.replace(report, damp=damps[0], seconds=time.perf_counter() - start)
    return (q_params, report, fitted) if return_grids else (q_params, report)

  batches = driver.as_batches(batch)
  if len(batches) != 1:
    raise ValueError(f"damp_grid needs one calibration batch (its tail is held out), got "
                     f"{len(batches)} batches")
  n = driver.leading_size(batches[0])
  n_hold = holdout_size(n, holdout_fraction)
  if n - n_hold < 1:
    raise ValueError(f"holdout_fraction={holdout_fraction} leaves no calibration rows of {n}")
  calib = jax.tree_util.tree_map(lambda x: x[:n - n_hold], batches[0])
  hold = jax.tree_util.tree_map(lambda x: x[n - n_hold:], batches[0])
  prep = driver.prepare(params, apply_fn, calib, apply_kwargs)
  forward = jax.jit(prep.fn)
  float_out = forward(prep.params, hold)
  loss_fn = output_error if holdout_loss is None else holdout_loss
  best, scores, passes = None, [], 1
  for d in damps:
    out = views_lib.Targets()
    q_params, report = driver.execute(prep, make(d, out), **options)
    q_vars = {"params": q_params} if prep.wrapped else q_params
    loss = float(loss_fn(forward(q_vars, hold), float_out))
    passes += report.forward_passes + 1
    scores.append((d, loss))
    if best is None or loss < best[0]:
      best = (loss, d, q_params, report, out)
  _, d, q_params, report, fitted = best
  report = dataclasses.replace(report, damp=d, C_search=tuple(scores), forward_passes=passes,
                               seconds=time.perf_counter() - start)
  return (q_params, report, fitted) if return_grids else (q_params, report)
