"""GPFQ for one layer (paper Eq. 7-8), all neurons at once: `gpfq_layer` checks and dispatches.

The computation is in `qjax._gpfq.kernels` (the data and Gram forms, the flop model and the
"auto" choice, and the rounder protocol); `qjax._gpfq.sharded` runs the same kernels on a mesh.
This module checks the inputs eagerly (ValueError/TypeError naming the argument), picks the form
and the device path, and holds the per-layer diagnostics `gpfq_residuals` and `relative_error`.
"""
from __future__ import annotations

from typing import Any, Iterable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qjax._gpfq import kernels
from qjax._gpfq import rounders
from qjax._gpfq import sharded
from qjax._gpfq.kernels import GpfqFlops
from qjax import grids
from qjax import mesh as mesh_lib

Method = Literal["auto", "scan", "gram"]


# ------------------------------------------------------------------------------------------------
# Eager checks and input handling.


def _all_finite(a: Any) -> bool:
  if isinstance(a, jax.core.Tracer):
    return True  # values unknown under an outer jit; shapes are still checked
  if isinstance(a, np.ndarray):
    return bool(np.isfinite(a).all())
  with jax.ensure_compile_time_eval():  # concrete even when called inside an outer trace
    return bool(jnp.isfinite(a).all())


def _check_W(W: Any) -> None:
  if getattr(W, "ndim", None) != 2 or W.size == 0:
    raise ValueError(f"W must be a non-empty 2-D (N0, N1) array, got shape "
                     f"{getattr(W, 'shape', None)}")
  if not jnp.issubdtype(W.dtype, jnp.floating):
    raise TypeError(f"W must be a float array, got dtype {W.dtype} (cast it, e.g. "
                    "W.astype(jnp.float32): Q would be cast back and truncated)")
  if not _all_finite(W):
    raise ValueError("W contains NaN or Inf")


def _check_levels(levels: Any, dtype) -> jax.Array:
  levels = jnp.asarray(levels, dtype)
  if levels.ndim != 1 or levels.shape[0] == 0:
    raise ValueError(f"levels must be a non-empty 1-D array, got shape {levels.shape}")
  if not _all_finite(levels):
    raise ValueError("levels contain NaN or Inf")
  return jnp.sort(levels)


def _check_rounder(rounder: Any, N1: int, dtype) -> None:
  """The shape rules of the rounder protocol (qjax._gpfq.kernels), checked before any tracing."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(rounder):
    name = f"levels{jax.tree_util.keystr(path)}"
    if not (hasattr(leaf, "ndim") or isinstance(leaf, (int, float, bool, np.generic))):
      raise TypeError(f"{name}: a rounder's pytree leaves must be arrays or scalars, got "
                      f"{type(leaf).__name__} (make static settings non-pytree fields)")
    if kernels.per_neuron(leaf) and leaf.shape[-1] != N1:
      raise ValueError(f"{name} has shape {leaf.shape}: a rounder leaf with 2 or more dims must "
                       f"have the N1={N1} neurons of W on its last axis")
    leaf_dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    if jnp.issubdtype(leaf_dtype, jnp.inexact) and not _all_finite(leaf):
      raise ValueError(f"{name} contains NaN or Inf")
  z = jax.ShapeDtypeStruct((N1,), dtype)
  t = jax.ShapeDtypeStruct((), jnp.int32)
  out = jax.eval_shape(lambda r, z, t: r.round_row(z, t), rounder, z, t)
  if getattr(out, "shape", None) != (N1,) or not jnp.issubdtype(out.dtype, jnp.floating):
    raise TypeError(f"levels.round_row(z, t) must return float values shaped like z {(N1,)}, got "
                    f"{out}")


def _check_quantizer(levels: Any, N1: int, dtype) -> Any:
  """The rounder for `levels`: a 1-D alphabet becomes `kernels.Levels` of its sorted values."""
  if kernels.is_rounder(levels):
    _check_rounder(levels, N1, dtype)
    return levels
  return kernels.Levels(_check_levels(levels, dtype))


def _check_pair(N0: int, x: Any, xt: Any, where: str = "") -> None:
  for name, a in (("X", x), ("X_tilde", xt)):
    if getattr(a, "ndim", None) != 2 or a.shape[1] != N0:
      raise ValueError(f"{name}{where} must have shape (m, N0={N0}) to match W, got shape "
                       f"{getattr(a, 'shape', None)}")
    # One reduction checks both: the sum of squares is finite iff no entry is NaN/Inf and
    # the Gram does not overflow float32.
    if not _all_finite(jnp.sum(jnp.square(jnp.asarray(a, jnp.float32)))):
      if not _all_finite(a):
        raise ValueError(f"{name}{where} contains NaN or Inf")
      raise ValueError(f"{name}{where} is too large for float32: its Gram {name}^T {name} "
                       f"overflows (max |{name}| = {float(jnp.max(jnp.abs(a))):.3g}); rescale "
                       "the inputs")
  if x.shape != xt.shape:
    raise ValueError(f"X{where} and X_tilde{where} must have the same shape, got {x.shape} and "
                     f"{xt.shape}")


def _no_rows(what: str) -> ValueError:
  return ValueError(f"{what} has 0 rows: GPFQ needs calibration rows (m >= 1), e.g. a batch of "
                    "layer inputs")


def _is_array(a: Any) -> bool:
  return hasattr(a, "shape") and hasattr(a, "dtype")


def _chunks(W, X, X_tilde) -> Iterable[tuple[Any, Any]]:
  """Checked (x, xt) pairs: one pair for arrays, else the pairs of the iterable X."""
  if _is_array(X):
    X_tilde = X if X_tilde is None else X_tilde
    _check_pair(W.shape[0], X, X_tilde)
    if X.shape[0] == 0:
      raise _no_rows("X")
    yield X, X_tilde
    return
  if X_tilde is not None:
    raise ValueError("when X is an iterable of (X_chunk, X_tilde_chunk) pairs, X_tilde must be "
                     "None")
  n = rows = 0
  for i, pair in enumerate(X):
    x, xt = pair
    _check_pair(W.shape[0], x, xt, where=f" chunk {i}")
    n, rows = n + 1, rows + x.shape[0]
    yield x, xt
  if n == 0:
    raise ValueError("X is an empty iterable of chunks")
  if rows == 0:
    raise _no_rows(f"X (all {n} chunks)")


def _check_block_size(block_size: Any) -> int:
  if block_size is not None and (isinstance(block_size, bool) or int(block_size) < 1):
    raise ValueError(f"block_size must be a positive int, got {block_size!r}")
  return int(block_size or kernels.DEFAULT_BLOCK_SIZE)


def _prepare(W: Any, X: Any, X_tilde: Any, levels: Any, method: Method, block_size: int | None,
             dtype: Any) -> tuple[Any, Any, Any, bool, int, str]:
  """Checks and choices of `gpfq_layer`.

  Returns:
    (rounder, X, X_tilde, same, block size B, method): array input is checked here, a stream of
    chunks is returned as a generator that checks each chunk as it is consumed (materialised when
    the data form is asked for); `same` is True when X_tilde is X (array input only); "auto" is
    resolved by flop count (`kernels.auto_method`), to "gram" for a stream (m unknown, memory
    O(N0^2)).
  """
  _check_W(W)
  rounder = _check_quantizer(levels, W.shape[1], dtype)
  if method not in ("auto", "scan", "gram"):
    raise ValueError(f"method must be 'auto', 'scan' or 'gram', got {method!r}")
  B = _check_block_size(block_size)
  if _is_array(X):
    (X, X_tilde), = _chunks(W, X, X_tilde)  # checked now
  elif method == "scan":  # materialise the stream for the data form
    pairs = list(_chunks(W, X, X_tilde))
    X = jnp.concatenate([jnp.asarray(x, dtype) for x, _ in pairs])
    X_tilde = jnp.concatenate([jnp.asarray(xt, dtype) for _, xt in pairs])
  else:
    X, X_tilde = _chunks(W, X, X_tilde), None  # checked chunk by chunk while accumulating
  same = _is_array(X) and X_tilde is X
  if method == "auto":
    method = kernels.auto_method(X.shape[0], *W.shape, B, same) if _is_array(X) else "gram"
  return rounder, X, X_tilde, same, B, method


# ------------------------------------------------------------------------------------------------
# Public entries.


def _with_quantizer(W: Any, levels: Any, quantizer: str, key: Any, lambda_: Any) -> Any:
  """`levels` with the quantizer applied: a `qjax.grids.Grid` or (for a quantizer other than
  msq) a 1-D alphabet becomes a `qjax._gpfq.rounders.rounder`; msq on an alphabet keeps the
  alphabet, so the default path is unchanged."""
  if quantizer not in rounders.QUANTIZERS:
    raise ValueError(f"quantizer must be one of {rounders.QUANTIZERS}, got {quantizer!r}")
  if kernels.is_rounder(levels):
    if quantizer != "msq" or key is not None or lambda_ is not None:
      raise ValueError("levels is a rounder: it carries its own quantizer, so quantizer, key "
                       "and lambda_ must be left at their defaults (or pass the Grid or the 1-D "
                       "alphabet itself with quantizer=..., key=..., lambda_=...)")
    return levels
  if isinstance(levels, grids.GridSpec):
    raise TypeError("levels is a GridSpec (a recipe, not fitted): pass a Grid, "
                    "qjax.grids.fit(W, spec), or a 1-D alphabet")
  if isinstance(levels, str):
    raise TypeError(f"levels must be a qjax.grids.Grid, a 1-D alphabet or a rounder, got the "
                    f"string {levels!r}; use qjax.grids.fit(W, spec)")
  if isinstance(levels, grids.Grid):
    _check_W(W)
    levels.check_fits(W.shape)
    return rounders.rounder(levels, W.shape[0], W.shape[1], quantizer=quantizer, key=key,
                            lambda_=lambda_)
  if quantizer == "msq" and key is None and lambda_ is None:
    return levels
  _check_W(W)
  return rounders.rounder(_check_levels(levels, jnp.float32), W.shape[0], W.shape[1],
                          quantizer=quantizer, key=key, lambda_=lambda_)


class _Permuted(NamedTuple):
  """A rounder seen through an input permutation: step t rounds row perm[t] of the original
  order (its group's grid, its pre-drawn uniforms), so grids stay those of the original rows."""
  inner: Any
  perm: jax.Array  # (N0,) int32, shared by all neurons

  def round_row(self, z: jax.Array, t: jax.Array) -> jax.Array:
    return self.inner.round_row(z, self.perm[t])


def _act_order(W, X, X_tilde, levels):
  """(perm, W[perm], the data with columns permuted, the rounder seen through perm) for inputs
  in order of decreasing diag(X~^T X~) (stable: ties keep their order)."""
  W = jnp.asarray(W)
  _check_W(W)
  array = _is_array(X)
  pairs = list(_chunks(W, X, X_tilde))  # checked; a stream is read once and kept
  d = sum(jnp.sum(jnp.square(jnp.asarray(xt, jnp.float32)), axis=0) for _, xt in pairs)
  perm = jnp.argsort(-d, stable=True).astype(jnp.int32)
  permuted = []
  for x, xt in pairs:
    xp = jnp.asarray(x)[:, perm]
    permuted.append((xp, xp if xt is x else jnp.asarray(xt)[:, perm]))
  data = permuted[0] if array else (permuted, None)
  if kernels.is_rounder(levels):
    levels = _Permuted(levels, perm)
  return perm, W[perm], data, levels


def gpfq_layer(W: Any, X: Any, X_tilde: Any, levels: Any, *, method: Method = "auto",
               block_size: int | None = None, dtype: Any = jnp.float32, mesh: Any = None,
               data_axis: str | None = "data", model_axis: str | None = "model",
               quantizer: str = "msq", key: Any = None, lambda_: Any = None,
               act_order: bool = False, reduce_chunks: int | None = None) -> jax.Array:
  """Quantize one layer with GPFQ (paper Eq. 7-8), all neurons (columns of W) in parallel.

  Args:
    W: float kernel (N0, N1), Flax Dense layout (rows = inputs, columns = neurons).
    X: float-network layer input (m, N0), m >= 1; or an iterable of (X_chunk, X_tilde_chunk)
      pairs, each (m_i, N0), streamed so the Gram form's memory does not grow with m (then
      X_tilde = None).
    X_tilde: quantized-network layer input (m, N0), same rows as X; None means X_tilde = X (the
      single-layer setting of Eq. 9).
    levels: the alphabet, 1-D (e.g. from `qjax.alphabets.levels_for`; sorted here, every row and
      neuron rounds to its nearest level, Eq. 5); or a rounder, a pytree with a method
      `round_row(z, t)` giving Q_t for input row t, which can hold per-neuron or per-group grids
      (the protocol is in `qjax._gpfq.kernels`); or a fitted `qjax.grids.Grid` for W (row t of
      neuron j rounded onto the grid of (group of t, j), `qjax._gpfq.rounders.rounder`).
    method: "scan" (blocked data form), "gram" (exact Gram form) or "auto": the cheaper by flop
      count, data ~6 m N0 N1 + 4 m N0 B (weighted 1.5x for its thinner GEMMs) against Gram
      ~4 m N0^2 + 4 N0^2 N1 (X_tilde = X drops the G terms; `qjax.gpfq_flops` gives the counts
      and the choice). Streamed input always uses the Gram form under "auto" (m unknown, memory
      O(N0^2)); "scan" concatenates the chunks first.
    block_size: inputs per block (both forms give the same Q for any value); None picks 128.
    dtype: compute dtype (float32 by default).
    mesh: a `jax.sharding.Mesh`: split the neurons over `model_axis` and the calibration rows
      over `data_axis` (see `qjax._gpfq.sharded.gpfq_layer_sharded`; same Q). None uses the mesh
      of `jax.set_mesh` if one is set, else one device.
    data_axis: mesh axis for the rows (None: not split); only used with a mesh.
    model_axis: mesh axis for the neurons (None: not split); only used with a mesh.
    quantizer: Q_t of Eq. (7)-(8) on the alphabet or grid: "msq" (nearest level, Eq. 5),
      "stochastic" (SPFQ's unbiased random rounding between the two neighbouring levels, Zhang &
      Saab, "SPFQ: A stochastic algorithm and its error analysis for neural network
      quantization"; needs `key`, one key per neuron, so Q is reproducible and does not depend
      on sharding), "hard_threshold" / "soft_threshold" (the argument is thresholded by
      `lambda_` >= 0, L0 / L1, before nearest rounding: the sparsity-promoting quantizers of the
      GPFQ authors' code). Not allowed with a rounder (it carries its own).
    key: jax.random key for quantizer="stochastic" (only then).
    lambda_: threshold for the thresholding quantizers, in the units of the weights (only then).
    act_order: process the inputs in order of decreasing diag(X~^T X~) (GPTQ's act-order; both
      forms and the mesh path): W's rows and the data's columns are permuted, every row still
      rounds onto the grid (group) of its original position, Q comes back in the original order.
    reduce_chunks: None, or C: the Gram form with H and G summed over C fixed row chunks in a
      fixed order (`qjax.mesh.exact_tmm`), so rows split over devices (GSPMD) give the
      one-device Q bit for bit; C divides the rows of every chunk and is a multiple of the
      devices they are split over; C x N0 x N0 float32 partials at once. Not with a mesh.

  Returns:
    Q, shape and dtype of W, every entry a value of the rounder (in `levels` for an alphabet);
    with a mesh, sharded P(None, model_axis).

  Raises:
    ValueError: on mismatched shapes (naming the argument), 0 calibration rows, NaN/Inf in W, X,
      X_tilde or the levels, empty levels, a rounder leaf whose last axis is not N1, or an
      unknown method; with a mesh, an axis not in it or N1 not divisible by the size of
      `model_axis`.
    TypeError: a rounder whose `round_row` does not return floats shaped like its argument.
  """
  levels = _with_quantizer(W, levels, quantizer, key, lambda_)
  if act_order:
    perm, Wp, (Xp, Xtp), levels = _act_order(W, X, X_tilde, levels)
    Q = gpfq_layer(Wp, Xp, Xtp, levels, method=method, block_size=block_size, dtype=dtype,
                   mesh=mesh, data_axis=data_axis, model_axis=model_axis,
                   reduce_chunks=reduce_chunks)
    return jnp.zeros_like(Q).at[perm].set(Q)
  mesh_lib.check_reduce_chunks(reduce_chunks)
  if reduce_chunks is not None:
    method = "gram"  # the data form's block sums over rows are not chunked
  rounder, X, X_tilde, same, B, method = _prepare(W, X, X_tilde, levels, method, block_size,
                                                  dtype)
  mesh = sharded.resolve_mesh(mesh)
  if mesh is not None and reduce_chunks is not None:
    raise ValueError("reduce_chunks is for GSPMD placements (arrays on a mesh, mesh=None), not "
                     "with the shard_map path of mesh=")
  if mesh is not None:
    sharded.check_mesh(mesh, data_axis, model_axis, W.shape[1])
    return sharded.gpfq_layer_sharded(W, X, X_tilde, rounder, mesh=mesh, method=method,
                                      data_axis=data_axis, model_axis=model_axis,
                                      block_size=B, dtype=dtype)
  Q = kernels.run(W, X, X_tilde, rounder, method, B, same, dtype, reduce_chunks)
  if not _all_finite(Q):
    raise ValueError(f"GPFQ's result contains NaN or Inf: W (max |W| = "
                     f"{float(jnp.max(jnp.abs(W))):.3g}) times the inputs overflows float32; "
                     "rescale the weights or the inputs")
  return Q.astype(jax.dtypes.canonicalize_dtype(W.dtype))


def gpfq_flops(m: int, N0: int, N1: int, *, block_size: int | None = None,
               same: bool = False) -> GpfqFlops:
  """Flops of the two GPFQ forms for an (m, N0) input and N1 neurons, and the "auto" choice.

  The counts are those of the kernels as implemented (data form: projections, B x B block Grams,
  U updates; Gram form: H and G, tril(G) @ W, the blocked recursion), the same numbers
  `gpfq_layer(method="auto")` compares: it runs "scan" iff `scan_weight * scan <= gram`.

  Args:
    m: calibration rows; N0: inputs; N1: neurons (W is (N0, N1)).
    block_size: inputs per block, as in `gpfq_layer` (None: its default, 128).
    same: X_tilde is X (the G and X_tilde terms drop out).

  Returns:
    GpfqFlops(scan, gram, method, block_size, scan_weight).

  Example:
    >>> import qjax
    >>> qjax.gpfq_flops(4096, 512, 256).method
    'gram'
  """
  for name, value in (("m", m), ("N0", N0), ("N1", N1)):
    if isinstance(value, bool) or int(value) != value or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  B = min(_check_block_size(block_size), int(N0))
  m, N0, N1, same = int(m), int(N0), int(N1), bool(same)
  scan, gram = kernels.flops(m, N0, N1, B, same)
  return GpfqFlops(scan, gram, kernels.auto_method(m, N0, N1, B, same), B,
                   kernels.DATA_FORM_WEIGHT)


def gpfq_residuals(W: Any, X: Any, X_tilde: Any, levels: Any,
                   dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
  """The unblocked recursion (Eq. 7-8) step by step, returning Q and every residual norm.

  A diagnostic for the theory (Thm 2.1, 2.2 bound max_t ||u_t||_2): O(m N1) work per step, no
  blocking, arrays only. `levels` as in `gpfq_layer` (an alphabet or a rounder).

  Returns:
    (Q, norms): Q (N0, N1) as from `gpfq_layer`; norms (N0, N1) with norms[t-1, j] = ||u_t||_2
    of neuron j, so norms[-1] = ||X w_j - X_tilde q_j||_2.
  """
  _check_W(W)
  rounder = _check_quantizer(levels, W.shape[1], dtype)
  _check_pair(W.shape[0], X, X if X_tilde is None else X_tilde)  # arrays only, no stream
  (X, X_tilde), = _chunks(W, X, X_tilde)
  Q, norms = kernels.residual_form(jnp.asarray(W, dtype), jnp.asarray(X, dtype),
                                   jnp.asarray(X_tilde, dtype), rounder)
  return Q.astype(jax.dtypes.canonicalize_dtype(W.dtype)), norms


def relative_error(W: Any, Q: Any, X: Any, X_tilde: Any = None) -> float:
  """Per-layer diagnostic ||X W - X_tilde Q||_F / ||X W||_F (X, X_tilde as in `gpfq_layer`).

  Streamed chunks are summed in float64 on the host. Returns 0.0 when both norms are zero and
  inf when only ||X W||_F is.
  """
  _check_W(W)
  if getattr(Q, "shape", None) != W.shape:
    raise ValueError(f"Q must have the shape of W {W.shape}, got {getattr(Q, 'shape', None)}")
  W32, Q32 = jnp.asarray(W, jnp.float32), jnp.asarray(Q, jnp.float32)
  num = den = 0.0
  for x, xt in _chunks(W, X, X_tilde):
    n, d = kernels.error_terms(W32, Q32, jnp.asarray(x, jnp.float32),
                               jnp.asarray(xt, jnp.float32))
    num, den = num + float(n), den + float(d)
  if den == 0.0:
    return 0.0 if num == 0.0 else float("inf")
  return float(np.sqrt(num / den))
