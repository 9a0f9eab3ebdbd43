"""PSGD: position-based scaled gradient, so that plain rounding after training keeps accuracy.

Kim, Yoo & Kwak, "Position-based Scaled Gradient for Model Quantization and Pruning",
NeurIPS 2020 (arXiv:2005.11035).

The forward pass uses the full-precision weights; only the gradient is rescaled elementwise by how
far each weight is from its nearest target wbar (a grid level, or 0 for pruning):

    w <- w - lr * s(w) * grad(w)

Weights close to a target take tiny steps and stay there, so training ends with the weights
clustered on the targets and per-layer round-to-nearest (`qjax.quantize_uniform`) loses little.

Typical use::

  tx = qjax.psgd.psgd(0.01, bits=2)                              # kernels -> 2-bit grid
  tx = qjax.psgd.psgd(0.01, bits={"Conv_0|Dense_1": 8, ".*": 2})  # first/last layer at 8 bit
  tx = qjax.psgd.psgd(0.01, targets=qjax.psgd.zero_targets())    # pruning
  tx = optax.inject_hyperparams(qjax.psgd.psgd, static_args="bits")(
      learning_rate=optax.cosine_decay_schedule(0.01, 1000), bits=4)
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Union

import jax
import jax.numpy as jnp
import optax

from qjax.rounding import check_bits, kernel_mask, path_str, round_to_uniform_grid

PyTree = Any
# Nearest targets of one tensor: (w, '/'-joined path of the leaf, e.g. 'Conv_0/kernel') -> wbar.
TargetFn = Callable[[jax.Array, str], jax.Array]
# Bits per weight: one int, a callable on the leaf path, or {regex: bits} (first `re.search` wins).
BitsSpec = Union[int, Callable[[str], int], Mapping[str, int]]


def per_layer_bits(bits: BitsSpec) -> Callable[[str], int]:
  """Normalise a bits spec to a callable `path -> bits` (validated: 1 <= bits <= 16).

  Ints and dict values are checked now; a callable's results when a path is looked up. The result
  can be passed to `qjax.quantize_uniform(params, bits=...)` so rounding uses the same grids.

  Raises:
    ValueError: bits outside 1..16, or a path that matches no pattern of a dict spec.
    TypeError: bits that are not ints (e.g. a traced array: with `optax.inject_hyperparams`, pass
      `static_args="bits"`).
  """
  if isinstance(bits, Mapping):
    table = [(re.compile(p), check_bits(b, f"bits[{p!r}]")) for p, b in bits.items()]

    def from_table(path: str) -> int:
      for pattern, b in table:
        if pattern.search(path):
          return b
      raise ValueError(f"no bits pattern in {list(bits)} matches layer {path!r}")

    return from_table
  if callable(bits):
    return lambda path: check_bits(bits(path), f"bits for layer {path!r}")
  b = check_bits(bits)
  return lambda path: b


def uniform_targets(bits: BitsSpec) -> TargetFn:
  """Nearest level of the per-tensor grid Δ·{-(2^(b-1)-1), …, 2^(b-1)-1}, Δ = absmax/(2^(b-1)-1).

  The same grid `qjax.quantize_uniform` rounds to; `bits` may differ per layer (see
  `per_layer_bits`). At 2 bits the grid is {-absmax, 0, absmax}. The largest weight of a tensor
  is always on its own target, so PSGD barely moves it by the loss gradient (weight decay still
  shrinks it, and with it the grid).
  """
  bits_of = per_layer_bits(bits)
  return lambda w, path: round_to_uniform_grid(w, bits_of(path))


def zero_targets() -> TargetFn:
  """Target 0 for every weight: PSGD for pruning (weights collapse towards 0)."""
  return lambda w, path: jnp.zeros_like(w)


def scale_by_position(targets: TargetFn, *, normalized: bool = True, eps: float = 1e-8,
                      lambda_s: float = 150.0) -> optax.GradientTransformationExtraArgs:
  r"""Multiply each gradient elementwise by s(w), the weight's distance to its nearest target.

  With wbar = targets(w, path) per tensor,

  * normalized=True (rebuttal of the paper, Appendix B):
    s(w) = (|w - wbar| + eps) / (max |w - wbar| + eps),  so 0 < s <= 1 and a weight exactly on a
    target still moves (s = eps / (max + eps)). With 0 < s <= 1, gradient descent with step
    1/L on a convex L-smooth f never increases f:
    f(x+) - f(x) <= sum_j (s_j^2 - 2 s_j) / (2L) * grad_j^2 <= 0.
  * normalized=False (the authors' code): s(w) = lambda_s * |w - wbar|  (lambda_s = 150 for 4 bit
    on CIFAR-100); unbounded, so the step-size bound above does not hold.

  Args:
    targets: maps (tensor, path) to its nearest targets, e.g. `uniform_targets(bits)`,
      `zero_targets()` or any user callable (w, path) -> wbar of w's shape.
    normalized: which s(w) (see above).
    eps: keeps the normalized s strictly positive.
    lambda_s: slope of the unnormalized s.

  Returns:
    A transformation whose `update` needs `params` (the weights s is computed from).

  Example::

    >>> from qjax import psgd
    >>> tx = psgd.scale_by_position(psgd.zero_targets())
    >>> w = {"kernel": jnp.array([0.5, -1.0, 0.0])}
    >>> s, _ = tx.update({"kernel": jnp.ones(3)}, tx.init(w), w)
    >>> s["kernel"].round(3)
    Array([0.5, 1. , 0. ], dtype=float32)
  """

  def init_fn(params: PyTree) -> optax.EmptyState:
    del params  # s(w) is a pure function of the current params: nothing to carry.
    return optax.EmptyState()

  def update_fn(updates: PyTree, state: optax.EmptyState, params: PyTree | None = None
                ) -> tuple[PyTree, optax.EmptyState]:
    if params is None:
      raise ValueError("scale_by_position needs the current params: call "
                       "tx.update(grads, state, params)")

    def scale(path: tuple, g: jax.Array, w: jax.Array) -> jax.Array:
      wbar = targets(w, path_str(path))
      if wbar.shape != w.shape:
        raise ValueError(f"targets for layer {path_str(path)!r} have shape {wbar.shape}, "
                         f"expected {w.shape}")
      dist = jnp.abs(w - wbar.astype(w.dtype))
      # Hyperparameters may arrive as float32 arrays (inject_hyperparams); keep the leaf's dtype.
      if normalized:
        e = jnp.asarray(eps, dist.dtype)
        s = (dist + e) / (jnp.max(dist) + e)
      else:
        s = jnp.asarray(lambda_s, dist.dtype) * dist
      return (g * s.astype(g.dtype)).astype(g.dtype)

    return jax.tree_util.tree_map_with_path(scale, updates, params), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def psgd(learning_rate: optax.ScalarOrSchedule, bits: BitsSpec | None = None, *,
         targets: TargetFn | None = None, momentum: float = 0.9, weight_decay: float = 0.0,
         mask: PyTree | Callable[[PyTree], PyTree] | None = None, normalized: bool = True,
         eps: float = 1e-8, lambda_s: float = 150.0) -> optax.GradientTransformationExtraArgs:
  """PSGD as in the paper: scaled gradient, then weight decay (unscaled), then SGD with momentum.

    u = s(w) * grad  on masked leaves (default: Dense/Conv kernels), grad elsewhere
    u = u + weight_decay * w   (all leaves, as torch.optim.SGD; the authors turn it off at 2 bit)
    w <- w - learning_rate * trace_momentum(u)

  Args:
    learning_rate: a float or an optax schedule.
    bits: target grid bits (int, callable on the layer path, or {regex: bits}); see
      `uniform_targets`. Give exactly one of `bits` and `targets`.
    targets: any `TargetFn`, e.g. `zero_targets()` for pruning.
    momentum: SGD momentum.
    weight_decay: L2 coefficient added after the scaling.
    mask: pytree of bools (or callable params -> pytree) marking the leaves to scale; default
      `qjax.rounding.kernel_mask` (biases and BatchNorm get plain SGD).
    normalized, eps, lambda_s: see `scale_by_position`.

  Works with `optax.inject_hyperparams(psgd, static_args=("bits", "targets", "mask"))`: bits must
  stay Python ints, and inject_hyperparams would otherwise take callables for schedules.
  """
  if (bits is None) == (targets is None):
    raise ValueError("psgd needs exactly one of `bits` (uniform grid) and `targets`")
  if targets is None:
    targets = uniform_targets(bits)
  scaling = scale_by_position(targets, normalized=normalized, eps=eps, lambda_s=lambda_s)
  return optax.chain(
      optax.masked(scaling, kernel_mask if mask is None else mask),
      optax.add_decayed_weights(weight_decay),
      optax.sgd(learning_rate, momentum=momentum),
  )
