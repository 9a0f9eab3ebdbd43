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
  tx = qjax.psgd.psgd(0.01, bits={"^(Conv_0|Dense_1)$": 8, "default": 2})  # edges at 8 bit
  tx = qjax.psgd.psgd(0.01, targets=qjax.psgd.zero_targets())    # pruning
  tx = optax.inject_hyperparams(qjax.psgd.psgd, static_args="bits")(
      learning_rate=optax.cosine_decay_schedule(0.01, 1000), bits=4)
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from qjax import rules
from qjax.rounding import (BitsSpec, check_bits_spec, kernel_mask, layer_bits,
                           round_to_uniform_grid)

PyTree = Any
# Nearest targets of one tensor: (w, its layer name `qjax.rules.path_name`, e.g. 'Conv_0') -> wbar.
TargetFn = Callable[[jax.Array, str], jax.Array]


def per_layer_bits(bits: BitsSpec, names: Sequence[str]) -> dict[str, int]:
  """The bits of every layer name (`qjax.rules.path_name`, e.g. 'Conv_0'), each in 2..16.

  `bits` is one int, a callable name -> bits, or rules {regex: bits} (`qjax.rules`: `re.search`,
  first match wins, optional 'default'). The same spec can be passed to
  `qjax.quantize_uniform(params, bits=...)` so rounding uses the same grids.

  Raises:
    ValueError: bits outside 2..16 (the per-tensor symmetric grid needs b >= 2), a pattern that
      matches no layer, a layer that matches no pattern and there is no 'default'.
    TypeError: bits that are not ints (e.g. a traced array: with `optax.inject_hyperparams`, pass
      `static_args="bits"`).
  """
  return layer_bits(bits, list(names))


class UniformTargets:
  """`TargetFn` of `uniform_targets`: the nearest level of each layer's b-bit grid.

  `scale_by_position` resolves the bits spec over all the layers it scales (`for_layers`), so
  rules are checked as a whole (a pattern matching no layer is an error). Called directly, a
  rule set is resolved for that one layer.
  """

  def __init__(self, bits: BitsSpec, resolved: dict[str, int] | None = None):
    check_bits_spec(bits)
    self.bits = bits
    self._resolved = resolved

  def for_layers(self, names: Sequence[str]) -> "UniformTargets":
    """These targets with the bits of every layer in `names` resolved now (eager errors)."""
    return UniformTargets(self.bits, per_layer_bits(self.bits, names))

  def bits_of(self, name: str) -> int:
    if self._resolved is not None and name in self._resolved:
      return self._resolved[name]
    return per_layer_bits(self.bits, [name])[name]

  def __call__(self, w: jax.Array, name: str) -> jax.Array:
    return round_to_uniform_grid(w, self.bits_of(name))


def uniform_targets(bits: BitsSpec) -> UniformTargets:
  """Nearest level of the per-tensor grid Δ·{-(2^(b-1)-1), …, 2^(b-1)-1}, Δ = max|w|/(2^(b-1)-1).

  The same grid `qjax.quantize_uniform` rounds to; `bits` may differ per layer (one int, a
  callable on the layer name, or `qjax.rules` {regex: bits}; see `per_layer_bits`), each in
  2..16: at 2 bits the grid is already ternary {-absmax, 0, absmax}, and there is no 1-bit grid
  of this kind. The largest weight of a tensor is always on its own target, so PSGD barely moves
  it by the loss gradient (weight decay still shrinks it, and with it the grid).

  References:
    Kim, Yoo & Kwak, `Position-based Scaled Gradient for Model Quantization and Pruning
    <https://arxiv.org/abs/2005.11035>`_, NeurIPS 2020 (the quantization targets of Sec. 3).
  """
  return UniformTargets(bits)


def _bind(targets: TargetFn, tree: PyTree) -> TargetFn:
  """`targets` resolved over the layers of `tree` when it knows how (UniformTargets)."""
  if isinstance(targets, UniformTargets):
    names = [rules.path_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]
    return targets.for_layers(names)
  return targets


def zero_targets() -> TargetFn:
  """Target 0 for every weight: PSGD for pruning (weights collapse towards 0)."""
  return lambda w, name: jnp.zeros_like(w)


def scale_by_position(targets: TargetFn, *, normalized: bool = True, eps: float = 1e-8,
                      lambda_s: float = 150.0) -> optax.GradientTransformationExtraArgs:
  r"""Multiply each gradient elementwise by s(w), the weight's distance to its nearest target.

  With wbar = targets(w, name) per tensor (name: the layer's `qjax.rules.path_name`, 'Conv_0'),

  * normalized=True (rebuttal of the paper, Appendix B):
    s(w) = (|w - wbar| + eps) / (max |w - wbar| + eps),  so 0 < s <= 1 and a weight exactly on a
    target still moves (s = eps / (max + eps)). With 0 < s <= 1, gradient descent with step
    1/L on a convex L-smooth f never increases f:
    f(x+) - f(x) <= sum_j (s_j^2 - 2 s_j) / (2L) * grad_j^2 <= 0.
  * normalized=False (the authors' code): s(w) = lambda_s * |w - wbar|  (lambda_s = 150 for 4 bit
    on CIFAR-100); unbounded, so the step-size bound above does not hold.

  Args:
    targets: maps (tensor, layer name) to its nearest targets, e.g. `uniform_targets(bits)`,
      `zero_targets()` or any user callable (w, name) -> wbar of w's shape.
    normalized: which s(w) (see above).
    eps: keeps the normalized s strictly positive.
    lambda_s: slope of the unnormalized s.

  Returns:
    A GradientTransformationExtraArgs whose `update(grads, state, params, **extra_args)` needs
    `params` (the weights s is computed from) and ignores extra arguments (e.g. `value=loss`
    meant for another member of an `optax.chain`).

  Example::

    >>> from qjax import psgd
    >>> tx = psgd.scale_by_position(psgd.zero_targets())
    >>> w = {"kernel": jnp.array([0.5, -1.0, 0.0])}
    >>> s, _ = tx.update({"kernel": jnp.ones(3)}, tx.init(w), w)
    >>> s["kernel"].round(3)
    Array([0.5, 1. , 0. ], dtype=float32)

  References:
    Kim, Yoo & Kwak, `Position-based Scaled Gradient for Model Quantization and Pruning
    <https://arxiv.org/abs/2005.11035>`_, NeurIPS 2020 (the scaled gradient; the normalized form
    from the authors' rebuttal).
  """
  # eps = 0 makes s = 0/0 on a tensor whose weights all sit on targets.
  for name, value in (("eps", eps), ("lambda_s", lambda_s)):
    if isinstance(value, jax.core.Tracer):
      continue  # a traced hyperparameter (inject_hyperparams under jit): checked by its caller
    if not (math.isfinite(float(value)) and float(value) > 0):
      raise ValueError(f"{name} must be a finite number > 0, got {value!r}")

  def init_fn(params: PyTree) -> optax.EmptyState:
    _bind(targets, params)  # eager check of the bits rules against the layers
    # s(w) is a pure function of the current params: nothing to carry.
    return optax.EmptyState()

  def update_fn(updates: PyTree, state: optax.EmptyState, params: PyTree | None = None,
                **extra_args: Any) -> tuple[PyTree, optax.EmptyState]:
    del extra_args  # e.g. value=loss for other members of an optax.chain
    if params is None:
      raise ValueError("scale_by_position needs the current params: call "
                       "tx.update(grads, state, params)")
    bound = _bind(targets, params)

    def scale(path: tuple, g: jax.Array, w: jax.Array) -> jax.Array:
      name = rules.path_name(path)
      wbar = bound(w, name)
      if wbar.shape != w.shape:
        raise ValueError(f"targets for layer {name!r} have shape {wbar.shape}, "
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
    bits: target grid bits in 2..16 (int, callable on the layer name, or `qjax.rules`
      {regex: bits} with an optional 'default'); see
      `uniform_targets`. Give exactly one of `bits` and `targets`.
    targets: any `TargetFn`, e.g. `zero_targets()` for pruning.
    momentum: SGD momentum.
    weight_decay: L2 coefficient added after the scaling.
    mask: pytree of bools (or callable params -> pytree) marking the leaves to scale; default
      `qjax.rounding.kernel_mask` (biases and BatchNorm get plain SGD).
    normalized, eps, lambda_s: see `scale_by_position`.

  Works with `optax.inject_hyperparams(psgd, static_args=("bits", "targets", "mask"))`: bits must
  stay Python ints, and inject_hyperparams would otherwise take callables for schedules. Extra
  update arguments (`tx.update(g, s, p, value=loss)`) are accepted and passed along the chain.

  References:
    Kim, Yoo & Kwak, `Position-based Scaled Gradient for Model Quantization and Pruning
    <https://arxiv.org/abs/2005.11035>`_, NeurIPS 2020.
  """
  if (bits is None) == (targets is None):
    raise ValueError("psgd needs exactly one of `bits` (uniform grid) and `targets`")
  if not callable(learning_rate) and not isinstance(learning_rate, jax.core.Tracer) and (
      not math.isfinite(float(learning_rate))):
    raise ValueError(f"learning_rate must be finite, got {learning_rate}")
  if targets is None:
    targets = uniform_targets(bits)
  scaling = scale_by_position(targets, normalized=normalized, eps=eps, lambda_s=lambda_s)
  return optax.chain(
      optax.masked(scaling, kernel_mask if mask is None else mask),
      optax.add_decayed_weights(weight_decay),
      optax.sgd(learning_rate, momentum=momentum),
  )
