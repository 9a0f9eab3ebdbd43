"""Pruning in the alpha domain (Sec. 3.2, Appendix B.1, Alg. 2, Eq. 13, 29-30)."""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qjax.alq.kernel import QuantizedKernel, is_quantized
from qjax.alq.transforms import BasisState, CoordinateState, SteState, quadratic_model

PyTree = Any
AlqState = CoordinateState | BasisState | SteState


def alpha_moments(q: QuantizedKernel, mu: jax.Array, nu_max: jax.Array, alpha_domain: bool
                  ) -> tuple[jax.Array, jax.Array]:
  """AMSGrad moments of one layer in the alpha domain, (G, I_max) each.

  From a CoordinateState (`alpha_domain`) they already are; from w-domain moments (G, n) they are
  formed as the basis step's bookkeeping does: m_alpha = B^T m_w,
  v_alpha = diag(B^T diag(v_w) B) = sum_j v_w.
  """
  if alpha_domain:
    return mu, nu_max
  m = jnp.einsum("gni,gn->gi", q.B.astype(jnp.float32), mu)
  v = jnp.broadcast_to(jnp.sum(nu_max, axis=1, keepdims=True), q.alpha.shape)
  return m, v


def metric(q: QuantizedKernel, mu: jax.Array, nu_max: jax.Array, count: jax.Array,
           learning_rate: float | jax.Array, *, alpha_domain: bool, b1: float = 0.9,
           b2: float = 0.999, eps: float = 1e-8) -> jax.Array:
  """Eq. (13): modelled loss increase of zeroing alpha_i, f = -g_hat_i alpha_i + 1/2 alpha_i^2 H_ii.

  (G, I_max) float32, +inf on dead slots so they are never chosen again.
  """
  m, v = alpha_moments(q, mu, nu_max, alpha_domain)
  g_hat, h_hat = quadratic_model(m, v, count, jnp.asarray(learning_rate, jnp.float32), b1, b2, eps)
  f = -g_hat * q.alpha + 0.5 * q.alpha * q.alpha * h_hat
  return jnp.where(q.mask, f, jnp.full_like(f, jnp.inf))


def _whole(x: jax.Array) -> jax.Array:
  """x replicated if its type carries a sharding (Explicit mesh axes): top_k and the pooled sort
  need the sorted axis whole. Only the (G I_max,) scores move, never the weights."""
  sharding = jax.typeof(x).sharding
  if any(axis is not None for axis in sharding.spec):
    return jax.reshard(x, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))
  return x


def proposals_per_layer(q: QuantizedKernel, top_k: float) -> int:
  """ceil(top_k * number of slots), at least 1: the static size of a layer's proposal list."""
  return max(1, min(q.alpha.size, math.ceil(top_k * q.alpha.size)))


def prune(params: PyTree, state: AlqState, num_remove: int | jax.Array, *, top_k: float,
          learning_rate: float | jax.Array, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8) -> tuple[PyTree, AlqState]:
  """One pruning iteration of Alg. 2: remove the `num_remove` (M_p) alphas of lowest f (Eq. 13).

  Each layer proposes its ceil(top_k * G I_max) live slots of lowest f (top_k is a fraction, the
  paper's k%); the proposals of all layers are pooled, re-sorted, and the lowest `num_remove`
  removed (fewer if there are fewer live proposals): mask False, alpha 0. f uses the AMSGrad
  moments of `state` (of `coordinate`, `basis` or `ste`, after >= 1 update), with `learning_rate`
  the step size of the quadratic model. In a CoordinateState the removed slots' moments are
  zeroed. Jittable: `num_remove` may be traced, `top_k` is static.

  Returns:
    (params, state) with the slots removed.
  """
  if not 0 < top_k <= 1:
    raise ValueError(f"top_k is a fraction in (0, 1], got {top_k}")
  treedef = jax.tree.structure(params, is_leaf=is_quantized)
  leaves = treedef.flatten_up_to(params)
  mus, nus = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu_max)
  layers = [i for i, leaf in enumerate(leaves) if is_quantized(leaf)]
  if not layers:
    raise ValueError("prune: params hold no QuantizedKernel (run qjax.alq.init first)")

  cand_f, cand_index = [], []
  for i in layers:
    f = metric(leaves[i], mus[i], nus[i], state.count, learning_rate, b1=b1, b2=b2, eps=eps,
               alpha_domain=isinstance(state, CoordinateState)).reshape(-1)
    f = _whole(f)
    neg, index = jax.lax.top_k(-f, proposals_per_layer(leaves[i], top_k))
    cand_f.append(-neg)
    cand_index.append(index)
  pooled = jnp.concatenate(cand_f)
  rank = jnp.zeros(pooled.shape, jnp.int32).at[jnp.argsort(pooled, stable=True)].set(
      jnp.arange(pooled.size, dtype=jnp.int32))
  remove = (rank < num_remove) & jnp.isfinite(pooled)

  new_leaves = list(leaves)
  removed = {}
  start = 0
  for i, index in zip(layers, cand_index):
    q = leaves[i]
    hit = jnp.zeros((q.alpha.size,), bool).at[index].set(remove[start:start + index.size])
    start += index.size
    keep = q.mask & ~hit.reshape(q.mask.shape)
    removed[i] = keep
    new_leaves[i] = q.replace(alpha=jnp.where(keep, q.alpha, jnp.zeros_like(q.alpha)), mask=keep)
  params = treedef.unflatten(new_leaves)

  if isinstance(state, CoordinateState):
    def clear(tree):
      flat = treedef.flatten_up_to(tree)
      for i, keep in removed.items():
        flat[i] = jnp.where(keep, flat[i], jnp.zeros_like(flat[i]))
      return treedef.unflatten(flat)
    state = state._replace(mu=clear(state.mu), nu=clear(state.nu), nu_max=clear(state.nu_max))
  return params, state


def num_alphas(params: PyTree) -> int:
  """Eq. (29): live alphas over all quantized layers (eager)."""
  total = 0
  for leaf in jax.tree.leaves(params, is_leaf=is_quantized):
    if is_quantized(leaf):
      total += int(np.sum(np.asarray(leaf.mask)))
  return total


def schedule(m0: int, prune_ratio: float, rounds: int) -> list[int]:
  """Eq. (30): targets M^r = round(M^{r-1} (1 - prune_ratio)), r = 1..rounds."""
  if not 0 <= prune_ratio < 1:
    raise ValueError(f"prune_ratio is the fraction removed per round, in [0, 1), got {prune_ratio}")
  out, m = [], float(m0)
  for _ in range(rounds):
    m *= 1 - prune_ratio
    out.append(int(round(m)))
  return out

