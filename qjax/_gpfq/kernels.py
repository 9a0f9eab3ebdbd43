"""GPFQ kernels for one layer: the two exact forms of the recursion (paper Eq. 7-8) and their flops.

This module only computes; `qjax._gpfq.layer.gpfq_layer` checks the inputs and picks a form,
`qjax._gpfq.sharded` runs the same functions under `jax.shard_map`.

For a neuron w (a column of W, Flax layout (N0 inputs, N1 neurons)), X the float network's layer
input and Xt the quantized network's, both (m, N0):

  u_0 = 0,   q_t = Q_t(<Xt_t, u_{t-1} + w_t X_t> / ||Xt_t||^2),   u_t = u_{t-1} + w_t X_t - q_t Xt_t

(Eq. 7-8). In the paper Q is the memoryless scalar quantizer onto one alphabet (Eq. 5, `msq`);
here it is a *rounder* (below), so row t of neuron j may be rounded onto its own grid. A dead
feature (Xt_t = 0) gets argument 0. Two exact forms give the same Q (up to floating-point order
on an exact rounding tie):

* data form ("scan", `data_form`): carries U = [u^(1) ... u^(N1)] (m, N1) and walks blocks of B
  inputs: one GEMM projects U on the block, the B x B Grams Xt_b^T Xt_b and Xt_b^T X_b correct for
  the steps inside the block, one GEMM updates U. ~6 m N0 N1 flops, memory O(m (N0 + N1)).
* Gram form ("gram", `gram_form`): with H = Xt^T Xt and G = Xt^T X the argument at step t is
  (sum_{j<=t} G[t,j] w_j - sum_{j<t} H[t,j] q_j) / H[t,t]; H and G are accumulated chunk by chunk
  (`add_gram`, ~4 m N0^2 flops, memory O(N0^2) whatever m), then the recursion costs O(N0^2 N1)
  in lazy GPTQ-style blocks, mostly GEMMs.

Both share one inner kernel (`quantize_block`): given the numerators of a block of B steps
without the block's own q's, it runs the B sequential steps with a B x B Gram.

Rounder protocol
----------------
A rounder is a pytree (a `flax.struct.dataclass`, a `typing.NamedTuple`, or any registered
pytree) with one method::

    def round_row(self, z: jax.Array, t: jax.Array) -> jax.Array

(it may have others, e.g. `round(Z)` for a whole (N0, N1) matrix; the kernels only call
`round_row`, and a value with a callable `round_row` attribute is taken as a rounder).

* `z`: float array (..., N1): the arguments of Q for input row t (0-based, 0 <= t < N0), one per
  neuron held. The kernels call it with z of shape (N1,) on one device and (N1 / M,) on a shard of
  M neuron shards (`qjax._gpfq.sharded`). A dead feature passes z = 0.
* `t`: int32 scalar, usually traced (the kernels call `round_row` inside `jax.lax.scan`): index
  with `leaf[t]` / `jax.lax.dynamic_index_in_dim`, never use it in Python control flow.
* returns the rounded *values* (not indices), shape of z; the kernels cast them to z's dtype.
* array leaves with ndim >= 2 have the neurons on their LAST axis, of size N1 (checked by
  `gpfq_layer`): per-neuron levels (L, N1), a scale per output channel (1, N1) or per group of g
  inputs and neuron (N0 / g, N1), pre-drawn uniforms (N0, N1), a key per neuron (1, N1). The
  sharded path splits them over `model_axis` exactly like W's columns, so inside `round_row` such
  a leaf's last axis always lines up with z's. Leaves with ndim 0 or 1 are shared by all neurons
  and replicated: a sorted alphabet (L,), the group of each row (N0,), a scalar threshold or scale
  (a Python scalar is fine), a 0-d key. Static settings (bits, mode strings) go in non-pytree
  fields (`flax.struct.field(pytree_node=False)`) so they stay Python values under jit.
* column j of the result may depend only on column j of z and of the per-neuron leaves (plus the
  shared leaves and t): neurons are independent, which is what makes the sharded Q exact.
* `round_row` is pure: it is traced once per compiled form and must not read global state.

Examples of rounders (`qjax._gpfq.rounders` and the quantizers of `qjax.alphabets`):

* `Levels(levels)`: the paper's nearest level of one sorted alphabet (Eq. 5); what a 1-D `levels`
  array passed to `gpfq_layer` becomes.
* per-neuron / per-group integer grid: leaves `scale` (G, N1), `zero` (G, N1), static `group_size`,
  `qmin`, `qmax`; `round_row` takes g = t // group_size, s = scale[g] (N1,), returns
  (clip(round(z / s) + zero[g], qmin, qmax) - zero[g]) * s.
* stochastic rounding (SPFQ): draws depend on t, e.g. `jax.random.fold_in(key, t)`. With one
  shared 0-d key the draws of a neuron depend on how the neurons are sharded; for a Q independent
  of the mesh keep one key per neuron ((1, N1) key array, fold in t per column with `jax.vmap`)
  or pre-drawn uniforms u (N0, N1) and use u[t].
* thresholding (sparse GPFQ, `hard_threshold_msq` / `soft_threshold_msq`): the threshold is a
  shared 0-d leaf (or (1, N1) per neuron); `round_row` thresholds z, then takes the nearest level.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from qjax import mesh as mesh_lib
from qjax.alphabets import msq

_HIGHEST = jax.lax.Precision.HIGHEST

# 128 keeps the block GEMMs efficient; the data form's block Grams add ~4 m N0 B flops.
DEFAULT_BLOCK_SIZE = 128
# The data form's GEMMs are thin (B or N1 wide) and run at ~2/3 the rate of the Gram form's
# square ones (measured with XLA:CPU), so its flops weigh 1.5x in the "auto" choice.
DATA_FORM_WEIGHT = 1.5


class Rounder(Protocol):
  """Q_t of the recursion for all neurons held: see the module docstring for the contract."""

  def round_row(self, z: jax.Array, t: jax.Array) -> jax.Array:
    ...


class Levels(NamedTuple):
  """Nearest level of one sorted alphabet shared by every neuron and row (paper Eq. 5, `msq`)."""
  levels: jax.Array  # (L,) sorted ascending, the compute dtype

  def round_row(self, z: jax.Array, t: jax.Array) -> jax.Array:
    del t  # the same alphabet for every row
    return msq(z, self.levels)


def is_rounder(a: Any) -> bool:
  """True for a rounder, False for an array or a sequence of levels."""
  return callable(getattr(a, "round_row", None))


def as_rounder(levels: Any, dtype: Any) -> Any:
  """A rounder as is; a 1-D alphabet becomes `Levels` of its sorted values in `dtype`."""
  if is_rounder(levels):
    return levels
  return Levels(jnp.sort(jnp.asarray(levels, dtype)))


def per_neuron(leaf: Any) -> bool:
  """Whether a rounder leaf has the neurons on its last axis (ndim >= 2), else it is shared."""
  return getattr(leaf, "ndim", 0) >= 2


def mm(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b at full float32 precision (no TF32/bf16 passes on accelerators)."""
  return jnp.matmul(a, b, precision=_HIGHEST)


def tmm(a: jax.Array, b: jax.Array) -> jax.Array:
  """a^T @ b without materialising the transpose."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=_HIGHEST)


def quantize_block(A: jax.Array, Hb: jax.Array, rounder: Rounder, start: Any,
                   last: int | None = None) -> jax.Array:
  """The B sequential steps of Eq. 8 inside one block, for all neurons.

  Args:
    A: (B, N1) numerators <Xt_t, u_start + sum_{j<=t in block} w_j X_j>, i.e. everything except
      the block's own q's.
    Hb: (B, B) block of H = Xt^T Xt.
    rounder: Q_t (see the module docstring).
    start: index t of the block's first row (int or traced int32).
    last: largest valid t (rows past it are padding whose q is dropped); None: no padding.

  Returns:
    Qb: (B, N1) quantized rows.
  """
  d = jnp.diagonal(Hb)
  alive = d > 0
  inv_d = jnp.where(alive, 1.0 / jnp.where(alive, d, jnp.ones_like(d)), jnp.zeros_like(d))

  def step(Qb, i):
    # Rows >= i of Qb are still zero, so Hb[i] @ Qb = sum_{j<i} H[t, j] q_j.
    arg = (A[i] - Hb[i] @ Qb) * inv_d[i]  # dead feature: inv_d = 0 -> argument 0
    t = start + i
    if last is not None:  # padded rows: keep t in [0, N0) for the rounder's per-row leaves
      t = jnp.minimum(t, last)
    return Qb.at[i].set(rounder.round_row(arg, t).astype(Qb.dtype)), None

  Qb, _ = jax.lax.scan(step, jnp.zeros_like(A), jnp.arange(A.shape[0], dtype=jnp.int32))
  return Qb


def _pad_rows(a: jax.Array, rows: int) -> jax.Array:
  return jnp.pad(a, ((0, rows - a.shape[0]),) + ((0, 0),) * (a.ndim - 1))


def data_form_body(W, X, Xt, rounder, block_size: int, same: bool,
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
    Hb, Gb, proj = psum((tmm(xt, xt), None if same else tmm(xt, x), tmm(xt, U)))
    Gb = Hb if same else Gb
    A = proj + mm(jnp.tril(Gb), w)
    q = quantize_block(A, Hb, rounder, start)
    return (U + mm(x, w - q) if same else U + mm(x, w) - mm(xt, q)), q

  U, Q = jax.lax.scan(lambda U, k: block(U, k * B, B), jnp.zeros((m, N1), W.dtype),
                      jnp.arange(nb, dtype=jnp.int32))
  return jnp.concatenate([Q.reshape(nb * B, N1), block(U, nb * B, rest)[1]])


@functools.partial(jax.jit, static_argnames=("block_size", "same"))
def data_form(W, X, Xt, rounder, block_size: int, same: bool) -> jax.Array:
  """The data form on one device: Q (N0, N1) from W (N0, N1), X and Xt (m, N0)."""
  return data_form_body(W, X, Xt, rounder, block_size, same, psum=lambda t: t)


@functools.partial(jax.jit, static_argnames=("block_size",))
def gram_form(W, H, G, rounder, block_size: int) -> jax.Array:
  """Gram form in lazy blocks: per block one (B, N0) x (N0, N1) GEMM brings in all earlier q's."""
  (N0, N1), B = W.shape, min(block_size, W.shape[0])
  n = -(-N0 // B) * B
  pad = ((0, n - N0), (0, n - N0))  # padded inputs are dead features, dropped at the end
  Hp = jnp.pad(H, pad)
  GW = mm(jnp.tril(jnp.pad(G, pad)), _pad_rows(W, n))

  def block(Q, k):
    s = k * B
    H_rows = jax.lax.dynamic_slice(Hp, (s, 0), (B, n))
    # Q rows >= s are still zero: only earlier blocks contribute.
    A = jax.lax.dynamic_slice(GW, (s, 0), (B, N1)) - mm(H_rows, Q)
    q = quantize_block(A, jax.lax.dynamic_slice(H_rows, (0, s), (B, B)), rounder, s,
                       last=N0 - 1)
    return jax.lax.dynamic_update_slice(Q, q, (s, 0)), None

  Q, _ = jax.lax.scan(block, jnp.zeros((n, N1), W.dtype), jnp.arange(n // B, dtype=jnp.int32))
  return Q[:N0]


def _tmm_rows(a: jax.Array, b: jax.Array, reduce_chunks: int | None) -> jax.Array:
  """a^T b; with `reduce_chunks`, its rows summed in a device-independent order."""
  return tmm(a, b) if reduce_chunks is None else mesh_lib.exact_tmm(a, b, reduce_chunks)


@functools.partial(jax.jit, static_argnames=("reduce_chunks",))
def add_gram(H, G, x, xt, reduce_chunks=None):
  """H + Xt^T Xt and G + Xt^T X for one chunk of rows (`reduce_chunks`: `_tmm_rows`)."""
  return H + _tmm_rows(xt, xt, reduce_chunks), G + _tmm_rows(xt, x, reduce_chunks)


@functools.partial(jax.jit, static_argnames=("reduce_chunks",))
def add_gram_same(H, x, reduce_chunks=None):
  """H + X^T X for one chunk of rows (X_tilde = X: G = H; `reduce_chunks`: `_tmm_rows`)."""
  return H + _tmm_rows(x, x, reduce_chunks)


def pairs(X: Any, X_tilde: Any) -> Iterable[tuple[Any, Any]]:
  """(x, xt) pairs: one pair for an array X (X_tilde None means X), else the pairs of X."""
  if hasattr(X, "shape") and hasattr(X, "dtype"):
    yield X, (X if X_tilde is None else X_tilde)
  else:
    yield from X


def gram_from_chunks(chunks: Iterable[tuple[Any, Any]], N0: int, dtype: Any,
                     reduce_chunks: int | None = None) -> tuple[jax.Array, jax.Array]:
  """H = Xt^T Xt and G = Xt^T X summed over (x, xt) chunks (memory O(N0^2), whatever m).

  While every chunk has xt is x, only H is accumulated and G is H. `reduce_chunks`: each
  chunk's rows summed in a device-independent order (`qjax.mesh.exact_tmm`).
  """
  H = G = jnp.zeros((N0, N0), dtype)
  same = True
  for x, xt in chunks:
    previous = H
    if reduce_chunks is not None:
      mesh_lib.check_chunk_rows(x, reduce_chunks)
    if x is xt and same:
      H = G = add_gram_same(H, jnp.asarray(x, dtype), reduce_chunks)
    else:
      same = False
      H, G = add_gram(H, G, jnp.asarray(x, dtype), jnp.asarray(xt, dtype), reduce_chunks)
    # Wait for the previous chunk's GEMM: without it, asynchronous dispatch lets a fast producer
    # queue every chunk in memory.
    if not isinstance(previous, jax.core.Tracer):
      previous.block_until_ready()
  return H, G


def run(W: Any, X: Any, X_tilde: Any, rounder: Any, method: str, block_size: int, same: bool,
        dtype: Any, reduce_chunks: int | None = None) -> jax.Array:
  """Q on one device in `dtype` by `method` ("scan": X, X_tilde arrays; "gram": arrays or an
  iterable of (x, xt) chunks in X), for inputs already checked (`qjax._gpfq.layer`);
  `reduce_chunks` (Gram form only): `gram_from_chunks`'s deterministic row sums."""
  W = jnp.asarray(W, dtype)
  if method == "scan":
    (x, xt), = pairs(X, X_tilde)
    x = jnp.asarray(x, dtype)
    return data_form(W, x, x if same else jnp.asarray(xt, dtype), rounder, block_size=block_size,
                     same=same)
  H, G = gram_from_chunks(pairs(X, X_tilde), W.shape[0], dtype, reduce_chunks)
  return gram_form(W, H, G, rounder, block_size=block_size)


@jax.jit
def residual_form(W, X, Xt, rounder):
  """The unblocked recursion step by step: Q and ||u_t||_2 of every neuron after every step."""
  def step(U, xs):
    w, x, xt, t = xs
    nrm = xt @ xt
    arg = (xt @ U + w * (xt @ x)) / jnp.where(nrm > 0, nrm, jnp.ones_like(nrm))
    q = rounder.round_row(jnp.where(nrm > 0, arg, jnp.zeros_like(arg)), t).astype(W.dtype)
    U = U + x[:, None] * w[None, :] - xt[:, None] * q[None, :]
    return U, (q, jnp.sqrt(jnp.sum(U * U, axis=0)))

  U0 = jnp.zeros((X.shape[0], W.shape[1]), W.dtype)
  t = jnp.arange(W.shape[0], dtype=jnp.int32)
  _, (Q, norms) = jax.lax.scan(step, U0, (W, X.T, Xt.T, t))
  return Q, norms


@jax.jit
def error_terms(W, Q, x, xt):
  """(||x W - xt Q||_F^2, ||x W||_F^2) for one chunk of rows."""
  ref = mm(x, W)
  diff = ref - mm(xt, Q)
  return jnp.sum(diff * diff), jnp.sum(ref * ref)


# ------------------------------------------------------------------------------------------------
# Flop model and the "auto" choice.


class GpfqFlops(NamedTuple):
  """Flop counts of one GPFQ layer as implemented, and what method="auto" picks for it."""
  scan: float  # data form: projections, block Grams, U updates
  gram: float  # Gram form: H (and G) accumulation, tril(G) @ W, the blocked recursion
  method: str  # "scan" or "gram": the form gpfq_layer(method="auto") runs on arrays of this shape
  block_size: int  # B the counts are for (min(block_size, N0))
  scan_weight: float  # the auto choice runs "scan" iff scan_weight * scan <= gram


def flops(m: int, N0: int, N1: int, block_size: int, same: bool) -> tuple[float, float]:
  """(data form, Gram form) flop counts as implemented for block size B; X = X_tilde drops the
  G and X_b terms."""
  B = min(block_size, N0)
  grams = 1.0 if same else 2.0  # H, or H and G
  updates = 1.0 if same else 2.0  # U += X_b (w - q), or U += X_b w - Xt_b q
  updated = N0 - (N0 % B or B)  # the last block's U update is skipped
  data = 2.0 * m * N1 * (N0 + updates * updated) + grams * 2.0 * m * N0 * B
  gram = grams * 2.0 * m * N0 * N0 + 4.0 * N0 * N0 * N1
  return data, gram


def auto_method(m: int, N0: int, N1: int, block_size: int, same: bool) -> str:
  """The "auto" choice for array input: the cheaper form by weighted flop count."""
  data, gram = flops(m, N0, N1, block_size, same)
  return "scan" if DATA_FORM_WEIGHT * data <= gram else "gram"
