"""GPFQ for one layer: the greedy path-following recursion (paper Eq. 7-8) for all neurons at once.

For a neuron w (a column of W, Flax layout (N0 inputs, N1 neurons)), X the float network's layer
input and Xt the quantized network's, both (m, N0):

  u_0 = 0,   q_t = Q(<Xt_t, u_{t-1} + w_t X_t> / ||Xt_t||^2),   u_t = u_{t-1} + w_t X_t - q_t Xt_t

(Eq. 7-8; Q is `msq` onto the alphabet, Eq. 5). A dead feature (Xt_t = 0) gets argument 0. Two
exact forms give the same Q (up to floating-point order on an exact rounding tie):

* data form ("scan"): carries U = [u^(1) ... u^(N1)] (m, N1) and walks blocks of B inputs: one
  GEMM projects U on the block, the B x B Grams Xt_b^T Xt_b and Xt_b^T X_b correct for the steps
  inside the block, one GEMM updates U. ~6 m N0 N1 flops, memory O(m (N0 + N1)).
* Gram form ("gram"): with H = Xt^T Xt and G = Xt^T X the argument at step t is
  (sum_{j<=t} G[t,j] w_j - sum_{j<t} H[t,j] q_j) / H[t,t]; H and G are accumulated chunk by chunk
  (~4 m N0^2 flops, memory O(N0^2) whatever m), then the recursion costs O(N0^2 N1) in lazy
  GPTQ-style blocks, mostly GEMMs.

Both share one inner kernel (`_quantize_block`): given the numerators of a block of B steps
without the block's own q's, it runs the B sequential steps with a B x B Gram.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Literal

import jax
import jax.numpy as jnp
import numpy as np

from qjax.alphabets import msq

Method = Literal["auto", "scan", "gram"]
_HIGHEST = jax.lax.Precision.HIGHEST


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b at full float32 precision (no TF32/bf16 passes on accelerators)."""
  return jnp.matmul(a, b, precision=_HIGHEST)


def _tmm(a: jax.Array, b: jax.Array) -> jax.Array:
  """a^T @ b without materialising the transpose."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=_HIGHEST)


def _quantize_block(A: jax.Array, Hb: jax.Array, levels: jax.Array) -> jax.Array:
  """The B sequential steps of Eq. 8 inside one block, for all neurons.

  Args:
    A: (B, N1) numerators <Xt_t, u_start + sum_{j<=t in block} w_j X_j>, i.e. everything except
      the block's own q's.
    Hb: (B, B) block of H = Xt^T Xt.
    levels: sorted alphabet.

  Returns:
    Qb: (B, N1) quantized rows.
  """
  d = jnp.diagonal(Hb)
  alive = d > 0
  inv_d = jnp.where(alive, 1.0 / jnp.where(alive, d, jnp.ones_like(d)), jnp.zeros_like(d))

  def step(Qb, i):
    # Rows >= i of Qb are still zero, so Hb[i] @ Qb = sum_{j<i} H[t, j] q_j.
    arg = (A[i] - Hb[i] @ Qb) * inv_d[i]  # dead feature: inv_d = 0 -> argument 0
    return Qb.at[i].set(msq(arg, levels)), None

  Qb, _ = jax.lax.scan(step, jnp.zeros_like(A), jnp.arange(A.shape[0]))
  return Qb


def _pad_rows(a: jax.Array, rows: int) -> jax.Array:
  return jnp.pad(a, ((0, rows - a.shape[0]),) + ((0, 0),) * (a.ndim - 1))


def _gpfq_data_body(W, X, Xt, levels, block_size: int, same: bool,
                    psum: Callable[[Any], Any]) -> jax.Array:
  """Blocked data form: a scan over blocks of B inputs, then the last block (B or N0 mod B).

  `psum` sums a block's row-dependent terms (its Grams and projections) over row shards: the
  identity on one device, `jax.lax.psum` over the data axis under shard_map (`qjax._gpfq.sharded`).
  """
  (N0, N1), m = W.shape, X.shape[0]
  B = min(block_size, N0)
  nb, rest = divmod(N0, B)
  if not rest:  # the last block runs outside the scan: its U update is never needed
    nb, rest = nb - 1, B

  def block(U, start, size):
    # Column slices of X straight from its (m, N0) layout: no transposed copy of the data.
    x, xt = (jax.lax.dynamic_slice_in_dim(a, start, size, axis=1) for a in (X, Xt))
    w = jax.lax.dynamic_slice_in_dim(W, start, size, axis=0)
    Hb, Gb, proj = psum((_tmm(xt, xt), None if same else _tmm(xt, x), _tmm(xt, U)))
    Gb = Hb if same else Gb
    A = proj + _mm(jnp.tril(Gb), w)
    q = _quantize_block(A, Hb, levels)
    return (U + _mm(x, w - q) if same else U + _mm(x, w) - _mm(xt, q)), q

  U, Q = jax.lax.scan(lambda U, k: block(U, k * B, B), jnp.zeros((m, N1), W.dtype),
                      jnp.arange(nb))
  return jnp.concatenate([Q.reshape(nb * B, N1), block(U, nb * B, rest)[1]])


@functools.partial(jax.jit, static_argnames=("block_size", "same"))
def _gpfq_data(W, X, Xt, levels, block_size: int, same: bool) -> jax.Array:
  """The data form on one device."""
  return _gpfq_data_body(W, X, Xt, levels, block_size, same, psum=lambda t: t)


@functools.partial(jax.jit, static_argnames=("block_size",))
def _gpfq_gram(W, H, G, levels, block_size: int) -> jax.Array:
  """Gram form in lazy blocks: per block one (B, N0) x (N0, N1) GEMM brings in all earlier q's."""
  (N0, N1), B = W.shape, min(block_size, W.shape[0])
  n = -(-N0 // B) * B
  pad = ((0, n - N0), (0, n - N0))  # padded inputs are dead features, dropped at the end
  Hp = jnp.pad(H, pad)
  GW = _mm(jnp.tril(jnp.pad(G, pad)), _pad_rows(W, n))

  def block(Q, k):
    s = k * B
    H_rows = jax.lax.dynamic_slice(Hp, (s, 0), (B, n))
    # Q rows >= s are still zero: only earlier blocks contribute.
    A = jax.lax.dynamic_slice(GW, (s, 0), (B, N1)) - _mm(H_rows, Q)
    q = _quantize_block(A, jax.lax.dynamic_slice(H_rows, (0, s), (B, B)), levels)
    return jax.lax.dynamic_update_slice(Q, q, (s, 0)), None

  Q, _ = jax.lax.scan(block, jnp.zeros((n, N1), W.dtype), jnp.arange(n // B))
  return Q[:N0]


@jax.jit
def _add_gram(H, G, x, xt):
  return H + _tmm(xt, xt), G + _tmm(xt, x)


@jax.jit
def _add_gram_same(H, x):
  return H + _tmm(x, x)


# ------------------------------------------------------------------------------------------------
# Eager validation and input handling.


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
  if not _all_finite(W):
    raise ValueError("W contains NaN or Inf")


def _check_levels(levels: Any, dtype) -> jax.Array:
  levels = jnp.asarray(levels, dtype)
  if levels.ndim != 1 or levels.shape[0] == 0:
    raise ValueError(f"levels must be a non-empty 1-D array, got shape {levels.shape}")
  if not _all_finite(levels):
    raise ValueError("levels contain NaN or Inf")
  return jnp.sort(levels)


def _check_pair(N0: int, x: Any, xt: Any, where: str = "") -> None:
  for name, a in (("X", x), ("X_tilde", xt)):
    if getattr(a, "ndim", None) != 2 or a.shape[1] != N0:
      raise ValueError(f"{name}{where} must have shape (m, N0={N0}) to match W, got shape "
                       f"{getattr(a, 'shape', None)}")
    if not _all_finite(a):
      raise ValueError(f"{name}{where} contains NaN or Inf")
  if x.shape != xt.shape:
    raise ValueError(f"X{where} and X_tilde{where} must have the same shape, got {x.shape} and "
                     f"{xt.shape}")


def _is_array(a: Any) -> bool:
  return hasattr(a, "shape") and hasattr(a, "dtype")


def _chunks(W, X, X_tilde) -> Iterable[tuple[Any, Any]]:
  """Validated (x, xt) pairs: one pair for arrays, else the pairs of the iterable X."""
  if _is_array(X):
    X_tilde = X if X_tilde is None else X_tilde
    _check_pair(W.shape[0], X, X_tilde)
    yield X, X_tilde
    return
  if X_tilde is not None:
    raise ValueError("when X is an iterable of (X_chunk, X_tilde_chunk) pairs, X_tilde must be "
                     "None")
  n = 0
  for i, pair in enumerate(X):
    x, xt = pair
    _check_pair(W.shape[0], x, xt, where=f" chunk {i}")
    n += 1
    yield x, xt
  if n == 0:
    raise ValueError("X is an empty iterable of chunks")


def _gram(W, X, X_tilde, dtype) -> tuple[jax.Array, jax.Array]:
  """H = Xt^T Xt and G = Xt^T X accumulated over chunks (memory O(N0^2), whatever m)."""
  N0 = W.shape[0]
  H = G = jnp.zeros((N0, N0), dtype)
  same = True
  for x, xt in _chunks(W, X, X_tilde):
    previous = H
    if x is xt and same:
      H = G = _add_gram_same(H, jnp.asarray(x, dtype))
    else:
      same = False
      H, G = _add_gram(H, G, jnp.asarray(x, dtype), jnp.asarray(xt, dtype))
    # Wait for the previous chunk's GEMM: without it, asynchronous dispatch lets a fast producer
    # queue every chunk in memory.
    if not isinstance(previous, jax.core.Tracer):
      previous.block_until_ready()
  return H, G


# The data form's GEMMs are thin (B or N1 wide) and run at ~2/3 the rate of the Gram form's
# square ones (measured with XLA:CPU), so its flops weigh 1.5x in the "auto" choice.
_DATA_FORM_WEIGHT = 1.5


def _flops(m: int, N0: int, N1: int, B: int, same: bool) -> tuple[float, float]:
  """(data form, Gram form) flop counts as implemented for block size B; X = X_tilde drops the
  G and X_b terms."""
  B = min(B, N0)
  grams = 1.0 if same else 2.0  # H, or H and G
  updates = 1.0 if same else 2.0  # U += X_b (w - q), or U += X_b w - Xt_b q
  updated = N0 - (N0 % B or B)  # the last block's U update is skipped
  data = 2.0 * m * N1 * (N0 + updates * updated) + grams * 2.0 * m * N0 * B
  gram = grams * 2.0 * m * N0 * N0 + 4.0 * N0 * N0 * N1
  return data, gram


def _auto_method(m: int, N0: int, N1: int, B: int, same: bool) -> str:
  """The "auto" choice for array input (shared with `qjax._gpfq.sharded`)."""
  data, gram = _flops(m, N0, N1, B, same)
  return "scan" if _DATA_FORM_WEIGHT * data <= gram else "gram"


def _prepare(W: Any, X: Any, X_tilde: Any, levels: Any, method: Method, block_size: int | None,
             dtype: Any) -> tuple[jax.Array, Any, Any, bool, int, str]:
  """Checks and choices shared by `gpfq_layer` and `qjax._gpfq.sharded.gpfq_layer_sharded`.

  Returns:
    (sorted levels, X, X_tilde, same, block size B, method): a stream is materialised when the
    data form is asked for; `same` is True when X_tilde is X (array input only); "auto" is
    resolved by flop count, to "gram" for a stream (m unknown, memory O(N0^2)).
  """
  _check_W(W)
  levels = _check_levels(levels, dtype)
  if method not in ("auto", "scan", "gram"):
    raise ValueError(f"method must be 'auto', 'scan' or 'gram', got {method!r}")
  if block_size is not None and (isinstance(block_size, bool) or int(block_size) < 1):
    raise ValueError(f"block_size must be a positive int, got {block_size!r}")
  if not _is_array(X) and method == "scan":  # materialise the stream for the data form
    pairs = list(_chunks(W, X, None))
    X = jnp.concatenate([jnp.asarray(x, dtype) for x, _ in pairs])
    X_tilde = jnp.concatenate([jnp.asarray(xt, dtype) for _, xt in pairs])
  same = _is_array(X) and (X_tilde is None or X_tilde is X)
  # 128 keeps the block GEMMs efficient; the data form's block Grams add ~4 m N0 B flops.
  B = int(block_size or 128)
  if method == "auto":
    method = _auto_method(X.shape[0], *W.shape, B, same) if _is_array(X) else "gram"
  return levels, X, X_tilde, same, B, method


def gpfq_layer(W: Any, X: Any, X_tilde: Any, levels: Any, *, method: Method = "auto",
               block_size: int | None = None, dtype: Any = jnp.float32, mesh: Any = None,
               data_axis: str | None = "data", model_axis: str | None = "model") -> jax.Array:
  """Quantize one layer with GPFQ (paper Eq. 7-8), all neurons (columns of W) in parallel.

  Args:
    W: float kernel (N0, N1), Flax Dense layout (rows = inputs, columns = neurons).
    X: float-network layer input (m, N0); or an iterable of (X_chunk, X_tilde_chunk) pairs, each
      (m_i, N0), streamed so the Gram form's memory does not grow with m (then X_tilde = None).
    X_tilde: quantized-network layer input (m, N0), same rows as X; None means X_tilde = X (the
      single-layer setting of Eq. 9).
    levels: the alphabet, 1-D (e.g. from `qjax.alphabets.levels_for`); sorted here.
    method: "scan" (blocked data form), "gram" (exact Gram form) or "auto": the cheaper by flop
      count, data ~6 m N0 N1 + 4 m N0 B (weighted 1.5x for its thinner GEMMs) against Gram
      ~4 m N0^2 + 4 N0^2 N1 (X_tilde = X drops the G terms). Streamed input always uses the Gram
      form under "auto" (m unknown, memory O(N0^2)); "scan" concatenates the chunks first.
    block_size: inputs per block (both forms give the same Q for any value); None picks one.
    dtype: compute dtype (float32 by default).
    mesh: a `jax.sharding.Mesh`: split the neurons over `model_axis` and the calibration rows
      over `data_axis` (see `qjax._gpfq.sharded.gpfq_layer_sharded`; same Q). None uses the mesh
      of `jax.set_mesh` if one is set, else one device.
    data_axis: mesh axis for the rows (None: not split); only used with a mesh.
    model_axis: mesh axis for the neurons (None: not split); only used with a mesh.

  Returns:
    Q, shape and dtype of W, every entry in `levels`; with a mesh, sharded
    P(None, model_axis).

  Raises:
    ValueError: on mismatched shapes (naming the argument), NaN/Inf in W, X or X_tilde, empty
      levels or an unknown method; with a mesh, an axis not in it or N1 not divisible by the
      size of `model_axis`.
  """
  from qjax._gpfq import sharded  # imported here: sharded builds on this module's kernels
  mesh = sharded.resolve_mesh(mesh)
  if mesh is not None:
    return sharded.gpfq_layer_sharded(W, X, X_tilde, levels, mesh=mesh, method=method,
                                      data_axis=data_axis, model_axis=model_axis,
                                      block_size=block_size, dtype=dtype)
  levels, X, X_tilde, same, B, method = _prepare(W, X, X_tilde, levels, method, block_size,
                                                 dtype)
  W32 = jnp.asarray(W, dtype)
  if method == "scan":
    (x, xt), = _chunks(W, X, X_tilde)
    x = jnp.asarray(x, dtype)
    Q = _gpfq_data(W32, x, x if same else jnp.asarray(xt, dtype), levels, block_size=B,
                   same=same)
  else:
    H, G = _gram(W, X, X_tilde, dtype)
    Q = _gpfq_gram(W32, H, G, levels, block_size=B)
  return Q.astype(jax.dtypes.canonicalize_dtype(W.dtype))


@jax.jit
def _residual_scan(W, X, Xt, levels):
  def step(U, xs):
    w, x, xt = xs
    nrm = xt @ xt
    arg = (xt @ U + w * (xt @ x)) / jnp.where(nrm > 0, nrm, jnp.ones_like(nrm))
    q = msq(jnp.where(nrm > 0, arg, jnp.zeros_like(arg)), levels)
    U = U + x[:, None] * w[None, :] - xt[:, None] * q[None, :]
    return U, (q, jnp.sqrt(jnp.sum(U * U, axis=0)))

  U0 = jnp.zeros((X.shape[0], W.shape[1]), W.dtype)
  _, (Q, norms) = jax.lax.scan(step, U0, (W, X.T, Xt.T))
  return Q, norms


def gpfq_residuals(W: Any, X: Any, X_tilde: Any, levels: Any,
                   dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
  """The unblocked recursion (Eq. 7-8) step by step, returning Q and every residual norm.

  A diagnostic for the theory (Thm 2.1, 2.2 bound max_t ||u_t||_2): O(m N1) work per step, no
  blocking, arrays only.

  Returns:
    (Q, norms): Q (N0, N1) as from `gpfq_layer`; norms (N0, N1) with norms[t-1, j] = ||u_t||_2
    of neuron j, so norms[-1] = ||X w_j - X_tilde q_j||_2.
  """
  _check_W(W)
  levels = _check_levels(levels, dtype)
  X_tilde = X if X_tilde is None else X_tilde
  _check_pair(W.shape[0], X, X_tilde)
  Q, norms = _residual_scan(jnp.asarray(W, dtype), jnp.asarray(X, dtype),
                            jnp.asarray(X_tilde, dtype), levels)
  return Q.astype(jax.dtypes.canonicalize_dtype(W.dtype)), norms


@jax.jit
def _error_terms(W, Q, x, xt):
  ref = _mm(x, W)
  diff = ref - _mm(xt, Q)
  return jnp.sum(diff * diff), jnp.sum(ref * ref)


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
    n, d = _error_terms(W32, Q32, jnp.asarray(x, jnp.float32), jnp.asarray(xt, jnp.float32))
    num, den = num + float(n), den + float(d)
  if den == 0.0:
    return 0.0 if num == 0.0 else float("inf")
  return float(np.sqrt(num / den))
