"""Pruning in the alpha domain (Qu et al. 2020, Sec. 3.2, Appendix B.1, Alg. 2, Eq. (13),
(29)-(30)).

References:
  Qu, Zhou, Cheng & Thiele, `Adaptive Loss-aware Quantization for Multi-bit Networks
  <https://arxiv.org/abs/1912.08883>`_, CVPR 2020.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from optax import tree_utils as otu

from qjax import rules
from qjax.alq.kernel import QuantizedKernel, is_quantized
from qjax.alq.transforms import ScaleByLossAwareAmsgradState, quadratic_model

PyTree = Any
_MOMENTS = ScaleByLossAwareAmsgradState.__name__


def _in_moments(path: tuple, value: Any) -> bool:
  """optax.tree_utils filter: a field of a ScaleByLossAwareAmsgradState (not e.g. the `count`
  of optax.inject_hyperparams' own state)."""
  del value
  return bool(path) and getattr(path[-1], "tuple_name", None) == _MOMENTS


def loss_aware_moments(state: Any) -> ScaleByLossAwareAmsgradState:
  """The `ScaleByLossAwareAmsgradState` inside an optimizer state, found with
  `optax.tree_utils.tree_get`: the state of `coordinate`, `basis`, `ste` or
  `scale_by_loss_aware_amsgrad`, also chained with other transformations or wrapped by
  `optax.inject_hyperparams`.

  Raises:
    ValueError: `state` holds none, or more than one.
  """
  fields = {}
  for name in ScaleByLossAwareAmsgradState._fields:
    try:
      value = otu.tree_get(state, name, filtering=_in_moments)
    except KeyError as e:
      raise ValueError(f"state holds more than one {_MOMENTS} (several ALQ transformations "
                       f"chained?); prune needs exactly one") from e
    if value is None:
      raise ValueError(f"state holds no {_MOMENTS}: give the state of qjax.alq.coordinate, "
                       f"basis or ste (possibly chained or under optax.inject_hyperparams), "
                       f"got {type(state).__name__}")
    fields[name] = value
  return ScaleByLossAwareAmsgradState(**fields)


def _is_alpha_domain(q: QuantizedKernel, mu: jax.Array, layer: str,
                     alpha_domain: bool | None) -> bool:
  """Whether a layer's moments are (G, I_max) alpha-domain ones or (G, n) w-domain ones."""
  a_shape, w_shape = tuple(q.alpha.shape), tuple(q.B.shape[:2])
  shape = tuple(jnp.shape(mu))
  fits = {True: shape == a_shape, False: shape == w_shape}
  if alpha_domain is None:
    if fits[True] and fits[False]:
      raise ValueError(f"prune: layer {layer!r} has group size n = I_max = {a_shape[1]}, so its "
                       f"moments of shape {shape} may be in the alpha or the w domain; pass "
                       f"alpha_domain=True (qjax.alq.coordinate) or False (basis, ste)")
    alpha_domain = fits[True]
  if not fits[alpha_domain]:
    raise ValueError(f"prune: layer {layer!r} has moments of shape {shape}; expected "
                     f"{a_shape if alpha_domain else w_shape} in the "
                     f"{'alpha' if alpha_domain else 'w'} domain (alpha {a_shape}, groups "
                     f"{w_shape})")
  return alpha_domain


def alpha_moments(q: QuantizedKernel, mu: jax.Array, nu_max: jax.Array, alpha_domain: bool
                  ) -> tuple[jax.Array, jax.Array]:
  """AMSGrad moments of one layer in the alpha domain, (G, I_max) each.

  Moments of `coordinate` (`alpha_domain`) already are; from w-domain moments (G, n) they are
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


def prune(params: PyTree, state: Any, num_remove: int | jax.Array, *, top_k: float,
          learning_rate: float | jax.Array, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8, alpha_domain: bool | None = None) -> tuple[PyTree, Any]:
  """One pruning iteration of Alg. 2: remove the `num_remove` (M_p) alphas of lowest f (Eq. (13)).

  Each layer proposes its ceil(top_k * G I_max) live slots of lowest f (top_k is a fraction, the
  paper's k%); the proposals of all layers are pooled, re-sorted, and the lowest `num_remove`
  removed (fewer if there are fewer live proposals): mask False, alpha 0. f uses the AMSGrad
  moments found in `state` (`loss_aware_moments`: the state of `coordinate`, `basis` or `ste`,
  after >= 1 update, also inside `optax.chain` or `optax.inject_hyperparams`), with
  `learning_rate` the step size of the quadratic model. Alpha-domain moments (of `coordinate`)
  are used as they are, and the removed slots' moments are zeroed; w-domain moments (of `basis`,
  `ste`) are carried to the alpha domain (`alpha_moments`). Jittable: `num_remove` may be
  traced, `top_k` is static.

  Args:
    params: the quantized tree.
    state: an optimizer state holding one `ScaleByLossAwareAmsgradState`.
    num_remove: M_p, alphas to remove.
    top_k: fraction of a layer's slots it proposes, in (0, 1].
    learning_rate: step size of the quadratic model.
    b1, b2, eps: the AMSGrad constants of the transformation.
    alpha_domain: which domain the moments are in; None infers it from their shapes (alpha
      (G, I_max) or groups (G, n)), which is ambiguous only for a layer with n == I_max.

  Returns:
    (params, state) with the slots removed.

  References:
    Qu et al. 2020, Eq. (13), Alg. 2.
  """
  if not 0 < top_k <= 1:
    raise ValueError(f"top_k is a fraction in (0, 1], got {top_k}")
  moments = loss_aware_moments(state)
  treedef = jax.tree.structure(params, is_leaf=is_quantized)
  paths_leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]
  leaves = [leaf for _, leaf in paths_leaves]
  mus, nus = treedef.flatten_up_to(moments.mu), treedef.flatten_up_to(moments.nu_max)
  layers = [i for i, leaf in enumerate(leaves) if is_quantized(leaf)]
  if not layers:
    raise ValueError("prune: params hold no QuantizedKernel (run qjax.alq.init first)")
  domains = {i: _is_alpha_domain(leaves[i], mus[i], rules.path_name(paths_leaves[i][0]),
                                 alpha_domain) for i in layers}

  cand_f, cand_index = [], []
  for i in layers:
    f = metric(leaves[i], mus[i], nus[i], moments.count, learning_rate, b1=b1, b2=b2, eps=eps,
               alpha_domain=domains[i]).reshape(-1)
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
    if domains[i]:
      removed[i] = keep
    new_leaves[i] = q.replace(alpha=jnp.where(keep, q.alpha, jnp.zeros_like(q.alpha)), mask=keep)
  params = treedef.unflatten(new_leaves)

  if removed:  # alpha-domain moments of removed slots restart from 0, as the slot is gone
    def clear(tree):
      flat = treedef.flatten_up_to(tree)
      for i, keep in removed.items():
        flat[i] = jnp.where(keep, flat[i], jnp.zeros_like(flat[i]))
      return treedef.unflatten(flat)
    state = otu.tree_set(state, _in_moments, mu=clear(moments.mu), nu=clear(moments.nu),
                         nu_max=clear(moments.nu_max))
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

