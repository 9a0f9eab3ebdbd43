"""ALQ optimizer steps as optax transformations (Qu et al. 2020, Sec. 3.3, Appendix B.2, B.4).

Every ALQ step reads AMSGrad as a diagonal quadratic model of the loss around the current
weights, as the authors' code does (beta1 0.9, beta2 0.999, eps 1e-8; PyTorch's form of the bias
correction):

  g_hat = lr / (1 - beta1^t) m,   H_hat = (sqrt(v_hat) + eps) / sqrt(1 - beta2^t),   v_hat = max v
  loss(w) ~ g_hat^T (w - w_hat) + 1/2 (w - w_hat)^T diag(H_hat) (w - w_hat)

so that the plain AMSGrad step is w <- w - g_hat / H_hat. That shared piece is one
transformation, `scale_by_loss_aware_amsgrad`; the three ALQ optimizers are it chained with the
small step that differs:

* `coordinate` = scale_by_loss_aware_amsgrad(alpha_domain=True) + `alpha_step` (Alg. 4,
  Eq. (14), (21)): B fixed; AMSGrad in the alpha domain on dl/dalpha_g = B_g^T dl/dw_hat_g.
* `basis` = scale_by_loss_aware_amsgrad() + `basis_step` (Alg. 3, Eq. (17)-(23)): moments in the
  w domain; with alpha fixed each weight's row of B is the sign pattern whose value b^T alpha is
  nearest to the target w* = w_hat - g_hat / H_hat (exact search over the 2^I_max patterns'
  values; dead slots contribute 0), then alpha = (B^T H_hat B)^{-1} B^T (H_hat w_hat - g_hat)
  (Eq. (23)) and negative alphas are made positive by flipping their basis column.
* `ste` = scale_by_loss_aware_amsgrad() + `ste_step` (Alg. 6, Eq. (31)-(37)): full-precision
  shadow weights w (in `SteState`) step w <- w - g_hat / H_hat (Eq. (33)) with the gradient of w_hat
  (STE, Eq. (31)), then B (Eq. (35)) and alpha (Eq. (36)) are refitted to the new w.

Parameters other than QuantizedKernels (biases, float layers) take the plain AMSGrad step.

Gradients: `update(grads, state, params)` takes the gradients w.r.t. the *reconstructed* tree,
i.e. `jax.grad(loss)(qjax.alq.reconstruct(params))`: a kernel-shaped dl/dw_hat where `params` has
a QuantizedKernel. That is the natural autodiff of the network and what Alg. 3 and 6 need;
Alg. 4's alpha gradient is formed inside (Eq. (14)).

Updates: the returned tree has the structure of `params`; for a QuantizedKernel it is a
QuantizedKernel of deltas -- alpha: new - old (float32), B: new - old (int8, in {-2, 0, 2}, exact),
mask: all False -- so `optax.apply_updates(params, updates)` gives the new quantized layers (for
bool leaves `p + u` is a logical or, and the transforms never revive a slot). Masks change only in
`qjax.alq.prune`, which finds the moments in any state that holds a
`ScaleByLossAwareAmsgradState` (plain, chained, or under `optax.inject_hyperparams`).

Chaining gradient transformations before these is fine (e.g. `optax.chain(optax.clip(1.0),
qjax.alq.basis(1e-3))`); chaining others after them (e.g. scaling the updates) is not
meaningful, since B must stay binary. Under `optax.inject_hyperparams`, pass
`static_args=("b1", "b2", "eps")` to keep them Python floats: as float32 arrays 1 - b1 rounds
differently and results move by float round-off.

References:
  Qu, Zhou, Cheng & Thiele, `Adaptive Loss-aware Quantization for Multi-bit Networks
  <https://arxiv.org/abs/1912.08883>`_, CVPR 2020 (Eq. (13)-(23), Alg. 2-6).
  Reddi, Kale & Kumar, `On the Convergence of Adam and Beyond
  <https://openreview.net/forum?id=ryQu7f-RZ>`_, ICLR 2018 (AMSGrad).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from qjax.alq.kernel import QuantizedKernel, group, is_quantized, map_quantized

PyTree = Any


class ScaleByLossAwareAmsgradState(NamedTuple):
  """State of `scale_by_loss_aware_amsgrad`: the AMSGrad moments behind the quadratic model."""
  count: jax.Array  # () int32; steps taken (t of the bias corrections)
  # First moment m. Per QuantizedKernel (G, n) float32 in the w domain (group layout of the
  # kernel) or (G, I_max) float32 in the alpha domain; elsewhere the param's shape and dtype.
  mu: optax.Updates
  nu: optax.Updates  # second moment v; shapes and dtypes as mu
  nu_max: optax.Updates  # running max of v (AMSGrad's v_hat); shapes and dtypes as mu


class QuadraticModel(NamedTuple):
  """The update `scale_by_loss_aware_amsgrad` emits for a QuantizedKernel (same domain and shapes
  as its moments): loss(w) ~ g_hat^T (w - w_hat) + 1/2 (w - w_hat)^T diag(h_hat) (w - w_hat)."""
  g_hat: jax.Array  # (G, n) or (G, I_max) float32; lr-scaled, bias-corrected first moment
  h_hat: jax.Array  # same shape, float32 > 0; diagonal curvature (sqrt(v_hat) + eps), corrected


class SteState(NamedTuple):
  """State of `ste_step`: the full-precision shadow weights of STE (Alg. 6)."""
  # (G, n) float32 per QuantizedKernel (group layout); elsewhere the float param (shape, dtype).
  shadow: optax.Params


def quadratic_model(mu: jax.Array, nu_max: jax.Array, count: jax.Array, lr: jax.Array, b1: float,
                    b2: float, eps: float) -> tuple[jax.Array, jax.Array]:
  """(g_hat, H_hat) of the AMSGrad quadratic model after `count` >= 1 steps."""
  t = count.astype(jnp.float32)
  g_hat = (lr / (1 - jnp.float32(b1) ** t)) * mu
  h_hat = (jnp.sqrt(nu_max) + eps) / jnp.sqrt(1 - jnp.float32(b2) ** t)
  return g_hat, h_hat


def _moments(g, mu, nu, nu_max, b1, b2):
  mu = b1 * mu + (1 - b1) * g
  nu = b2 * nu + (1 - b2) * g * g
  return mu, nu, jnp.maximum(nu_max, nu)


def weighted_fit(w: jax.Array, B: jax.Array, mask: jax.Array, h: jax.Array) -> jax.Array:
  """Eq. (23)/(36): alpha = (B^T H B)^{-1} B^T H w per group, on the live slots.

  Dead slots get an identity row so the system stays invertible and solves to 0; a group whose
  live bases are dependent gives non-finite values. w, h (G, n) float32, B (G, n, I) int8.
  """
  Bf = B.astype(w.dtype)
  m = mask.astype(w.dtype)
  gram = jnp.einsum("gni,gnj->gij", Bf, h[..., None] * Bf) * m[:, :, None] * m[:, None, :]
  gram = gram + jax.vmap(jnp.diag)(1 - m)
  rhs = jnp.einsum("gni,gn->gi", Bf, h * w) * m
  return jnp.linalg.solve(gram, rhs[..., None])[..., 0] * m


def make_positive(alpha: jax.Array, B: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Flip the sign of every negative alpha_i and of its basis column; B alpha is unchanged."""
  sign = jnp.where(alpha < 0, -1, 1).astype(jnp.int8)
  return alpha * sign.astype(alpha.dtype), B * sign[:, None, :]


def _lr(learning_rate: optax.ScalarOrSchedule, count: jax.Array) -> jax.Array:
  lr = learning_rate(count) if callable(learning_rate) else learning_rate
  return jnp.asarray(lr, jnp.float32)


def _zeros(params: PyTree, like) -> PyTree:
  """float32 zeros shaped as `like(q)` per QuantizedKernel, as the param elsewhere.

  zeros_like of a param-derived array, not of a bare shape, so that the state is sharded as the
  params on meshes with Explicit axes.
  """
  return map_quantized(lambda q: jnp.zeros_like(like(q), jnp.float32),
                       lambda p: jnp.zeros_like(p), params)


def _float_step(g, mu, nu, nu_max, count, lr, b1, b2, eps):
  mu, nu, nu_max = _moments(g, mu, nu, nu_max, b1, b2)
  g_hat, h_hat = quadratic_model(mu, nu_max, count, lr, b1, b2, eps)
  return -g_hat / h_hat, mu, nu, nu_max


def _alpha_grad(q: QuantizedKernel, grad: jax.Array) -> jax.Array:
  """Eq. (14): dl/dalpha_g = B_g^T dl/dw_hat_g, 0 on dead slots."""
  g_alpha = jnp.einsum("gni,gn->gi", q.B.astype(jnp.float32), group(grad, q).astype(jnp.float32))
  return jnp.where(q.mask, g_alpha, jnp.zeros_like(g_alpha))


def decode_patterns(index: jax.Array, max_bits: int) -> jax.Array:
  """Sign pattern number `index`: entry i is +1 where bit I-1-i of index is set, else -1.

  Elementwise on the bits (no lookup in a table), so sharded indices give sharded patterns.
  index (...) int -> (..., I) int8 in {-1, +1}.
  """
  bits = [(index >> (max_bits - 1 - i)) & 1 for i in range(max_bits)]
  return (2 * jnp.stack(bits, axis=-1) - 1).astype(jnp.int8)


def sign_patterns(max_bits: int) -> jax.Array:
  """All 2^I sign patterns in lexicographic order (-1 before +1), (2^I, I) int8."""
  return decode_patterns(jnp.arange(2 ** max_bits), max_bits)


def nearest_bases(target: jax.Array, alpha: jax.Array, mask: jax.Array) -> jax.Array:
  """Eq. (19)/(35): per weight the pattern b minimizing |target - b^T alpha|; dead slots get +1.

  The table of all 2^I values b^T alpha of a group (Eq. (20); dead slots contribute 0) is sorted
  once, each weight's place in it found by searchsorted, and the pattern decoded from the bits of
  its index: exact, O(n I + 2^I) memory per group. Purely per group, so groups sharded over a mesh
  stay sharded. target (G, n) float32, alpha/mask (G, I) -> B (G, n, I) int8.
  """
  patterns = sign_patterns(alpha.shape[-1])
  live = jnp.where(mask, alpha, jnp.zeros_like(alpha))
  values = jnp.einsum("ki,gi->gk", patterns.astype(alpha.dtype), live)  # (G, 2^I)
  order = jnp.argsort(values, axis=1)
  table = jnp.take_along_axis(values, order, axis=1)
  # method="sort": the default "scan" is a loop that vmap cannot batch on Explicit mesh axes
  search = jax.vmap(functools.partial(jnp.searchsorted, method="sort"))
  hi = jnp.clip(search(table, target), 0, table.shape[1] - 1)
  lo = jnp.maximum(hi - 1, 0)
  dist = lambda i: jnp.abs(target - jnp.take_along_axis(table, i, axis=1))
  index = jnp.take_along_axis(order, jnp.where(dist(lo) <= dist(hi), lo, hi), axis=1)
  B = decode_patterns(index, alpha.shape[-1])  # (G, n, I), as patterns[index] without a gather
  return jnp.where(mask[:, None, :], B, jnp.ones_like(B))


@jax.jit  # one compiled unit also when the transform runs eagerly
def refit(q: QuantizedKernel, center: jax.Array, g_hat: jax.Array, h_hat: jax.Array
          ) -> tuple[jax.Array, jax.Array]:
  """The B step and speedup alpha around `center` (Eq. (17)-(23); Eq. (35)-(36) for shadows).

  target = center - g_hat / H_hat; B = nearest_bases(target, alpha);
  alpha = (B^T H B)^{-1} B^T H target on live slots (groups whose system is singular keep their
  old alpha); negative alphas are flipped with their basis. Returns (alpha, B).
  """
  target = center - g_hat / h_hat
  B = nearest_bases(target, q.alpha, q.mask)
  alpha = weighted_fit(target, B, q.mask, h_hat)
  ok = jnp.all(jnp.isfinite(alpha), axis=-1, keepdims=True)
  alpha = jnp.where(ok, alpha, q.alpha)
  B = jnp.where(ok[:, :, None], B, q.B)
  return make_positive(alpha, B)


def _delta(q: QuantizedKernel, alpha: jax.Array, B: jax.Array) -> QuantizedKernel:
  """Updates that `optax.apply_updates` turns into q with the new alpha and B, same mask."""
  alpha = jnp.where(q.mask, alpha, jnp.zeros_like(alpha))
  return q.replace(alpha=alpha - q.alpha, B=B - q.B, mask=jnp.zeros_like(q.mask))


def _check_model(model: Any, where: str) -> QuadraticModel:
  if not isinstance(model, QuadraticModel):
    raise TypeError(f"qjax.alq.{where} expects, for each QuantizedKernel, the QuadraticModel that "
                    f"scale_by_loss_aware_amsgrad emits, got {type(model).__name__}; chain it "
                    f"directly after scale_by_loss_aware_amsgrad")
  return model


def _needs_params(params: PyTree, where: str) -> None:
  if params is None:
    raise ValueError(f"qjax.alq.{where} needs params (the quantized tree) in update: "
                     f"tx.update(grads, state, params)")


def scale_by_loss_aware_amsgrad(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9,
                                b2: float = 0.999, eps: float = 1e-8, *,
                                alpha_domain: bool = False
                                ) -> optax.GradientTransformationExtraArgs:
  r"""AMSGrad moments read as a diagonal quadratic model of the loss (the shared piece of ALQ).

  With t the step count, m, v the exponential moving averages of the gradient and its square and
  v_hat = max(v_hat, v) (AMSGrad),

    g_hat = lr / (1 - b1^t) m,   H_hat = (sqrt(v_hat) + eps) / sqrt(1 - b2^t),

  the local model loss(w) ~ g_hat^T (w - w_hat) + 1/2 (w - w_hat)^T diag(H_hat) (w - w_hat)
  behind Qu et al. 2020, Eq. (13), (17) and (22) (its minimiser w_hat - g_hat / H_hat is the
  AMSGrad step).

  For a QuantizedKernel the gradient (w.r.t. the reconstructed kernel) is taken in its group
  layout (G, n) (the w domain), or with `alpha_domain=True` projected to dl/dalpha_g =
  B_g^T dl/dw_hat_g (Eq. (14), dead slots 0; shape (G, I_max)); the update emitted for it is the
  `QuadraticModel` (g_hat, H_hat), which `alpha_step`, `basis_step` or `ste_step` turn into new
  bases and coordinates. Every other leaf gets the AMSGrad step -g_hat / H_hat in its own dtype.

  Args:
    learning_rate: float or optax schedule of the step count; scales g_hat.
    b1, b2: decay rates of the first and second moments.
    eps: added to sqrt(v_hat), keeps H_hat > 0.
    alpha_domain: keep the QuantizedKernels' moments in the alpha domain (Alg. 2, 4) instead of
      the w domain (Alg. 3, 6).

  Returns:
    A GradientTransformationExtraArgs whose state is a `ScaleByLossAwareAmsgradState`;
    `update(grads, state, params)` needs `params`.

  References:
    Qu et al., `Adaptive Loss-aware Quantization for Multi-bit Networks
    <https://arxiv.org/abs/1912.08883>`_, CVPR 2020: the quadratic model of Eq. (13), (17),
    (22); the alpha gradient, Eq. (14).
    Reddi et al., `On the Convergence of Adam and Beyond
    <https://openreview.net/forum?id=ryQu7f-RZ>`_, ICLR 2018 (AMSGrad).
  """

  def init_fn(params):
    like = (lambda q: q.alpha) if alpha_domain else (lambda q: q.B[..., 0])
    zeros = lambda: _zeros(params, like)
    return ScaleByLossAwareAmsgradState(count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros(),
                                        nu_max=zeros())

  def update_fn(grads, state, params=None, **extra_args):
    del extra_args
    _needs_params(params, "scale_by_loss_aware_amsgrad")
    count = optax.safe_increment(state.count)
    lr = _lr(learning_rate, state.count)

    def quantized(q, g, mu, nu, nu_max):
      g = _alpha_grad(q, g) if alpha_domain else group(g, q).astype(jnp.float32)
      mu, nu, nu_max = _moments(g, mu, nu, nu_max, b1, b2)
      model = QuadraticModel(*quadratic_model(mu, nu_max, count, lr, b1, b2, eps))
      return model, mu, nu, nu_max

    def other(p, g, mu, nu, nu_max):
      step, mu, nu, nu_max = _float_step(g, mu, nu, nu_max, count, lr, b1, b2, eps)
      return step.astype(jnp.asarray(p).dtype), mu, nu, nu_max

    out = map_quantized(quantized, other, params, grads, state.mu, state.nu, state.nu_max)
    updates, mu, nu, nu_max = _unzip(params, out, 4)
    return updates, ScaleByLossAwareAmsgradState(count=count, mu=mu, nu=nu, nu_max=nu_max)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def alpha_step() -> optax.GradientTransformationExtraArgs:
  """Alg. 4's coordinate step: alpha <- alpha - g_hat_alpha / H_hat_alpha (Eq. (21)), B fixed.

  Takes the alpha-domain `QuadraticModel`s of `scale_by_loss_aware_amsgrad(alpha_domain=True)`;
  other leaves' updates pass through. Dead slots stay 0. Stateless.

  References:
    Qu et al. 2020, Eq. (21), Alg. 4.
  """

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _needs_params(params, "alpha_step")

    def quantized(q, model):
      g_hat, h_hat = _check_model(model, "alpha_step")
      return _delta(q, q.alpha - g_hat / h_hat, q.B)

    return map_quantized(quantized, lambda p, u: u, params, updates), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def basis_step() -> optax.GradientTransformationExtraArgs:
  """Alg. 3's step: B by exhaustive nearest-value search, then the speedup alpha (Eq. (17)-(23)).

  Takes the w-domain `QuadraticModel`s of `scale_by_loss_aware_amsgrad()` around w_hat = B alpha;
  other leaves' updates pass through. Stateless.

  References:
    Qu et al. 2020, Eq. (17)-(23), Alg. 3.
  """

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _needs_params(params, "basis_step")

    def quantized(q, model):
      g_hat, h_hat = _check_model(model, "basis_step")
      alpha, B = refit(q, q.groups(), g_hat, h_hat)
      return _delta(q, alpha, B)

    return map_quantized(quantized, lambda p, u: u, params, updates), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def ste_step() -> optax.GradientTransformationExtraArgs:
  """Alg. 6's step: shadow w <- w - g_hat / H_hat (Eq. (33)), then B, alpha refitted to w.

  Takes the w-domain `QuadraticModel`s of `scale_by_loss_aware_amsgrad()` (from the gradient of
  the quantized weights, the STE of Eq. (31)); B_j = argmin_b |b^T alpha - w_j| (Eq. (35)),
  alpha = (B^T H_hat B)^{-1} B^T H_hat w (Eq. (36)), alphas made positive. Other leaves' updates
  pass through and are added to their shadow. State: `SteState`, shadows initialized to B alpha
  (the float params elsewhere).

  References:
    Qu et al. 2020, Appendix B.4, Eq. (31)-(37), Alg. 6.
  """

  def init_fn(params):
    return SteState(shadow=map_quantized(lambda q: q.groups(), lambda p: jnp.asarray(p), params))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _needs_params(params, "ste_step")

    def quantized(q, model, w):
      g_hat, h_hat = _check_model(model, "ste_step")
      alpha, B = refit(q, w, g_hat, h_hat)
      return _delta(q, alpha, B), w - g_hat / h_hat

    def other(p, step, w):
      return step, w + step

    out = map_quantized(quantized, other, params, updates, state.shadow)
    updates, shadow = _unzip(params, out, 2)
    return updates, SteState(shadow=shadow)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def coordinate(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
               eps: float = 1e-8) -> optax.GradientTransformationExtraArgs:
  """Optimizing the coordinates alpha with B fixed (Alg. 4): AMSGrad in the alpha domain.

  g_alpha = B_g^T dl/dw_hat_g (Eq. (14)) feeds AMSGrad moments (m, v, v_hat = max v) and
  alpha <- alpha - g_hat_alpha / H_hat_alpha (Eq. (21)), i.e.
  alpha <- alpha - lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v_hat) + eps). Dead slots stay 0.
  `optax.chain(scale_by_loss_aware_amsgrad(..., alpha_domain=True), alpha_step())`.

  Args:
    learning_rate: float or optax schedule of the step count (paper: 1e-5, x0.8 per epoch).
    b1, b2, eps: AMSGrad constants.

  Returns:
    A GradientTransformationExtraArgs; `update(grads, state, params)` needs `params` and grads
    w.r.t. `reconstruct(params)` (see the module docstring). Its state holds a
    `ScaleByLossAwareAmsgradState` (alpha domain), which `prune` reads.

  Example::

    >>> import jax, optax
    >>> from qjax import alq
    >>> q = alq.init({"Dense_0": {"kernel": jax.numpy.ones((4, 2))}},
    ...              {"Dense_0": "channel-wise"}, max_bits=2, sigma=0.0)
    >>> tx = alq.coordinate(1e-3)
    >>> grads = {"Dense_0": {"kernel": jax.numpy.ones((4, 2))}}
    >>> updates, state = tx.update(grads, tx.init(q), q)
    >>> optax.apply_updates(q, updates)["Dense_0"]["kernel"].alpha.shape
    (2, 2)

  References:
    Qu et al., `Adaptive Loss-aware Quantization for Multi-bit Networks
    <https://arxiv.org/abs/1912.08883>`_, CVPR 2020, Eq. (14), (21), Alg. 4.
  """
  return optax.chain(scale_by_loss_aware_amsgrad(learning_rate, b1, b2, eps, alpha_domain=True),
                     alpha_step())


def basis(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8) -> optax.GradientTransformationExtraArgs:
  """Optimizing the binary bases with speedup (Alg. 3, Eq. (17)-(23)).

  AMSGrad moments of dl/dw_hat give the quadratic model (g_hat, H_hat) around w_hat = B alpha.
  With alpha fixed, each weight j picks B_j = argmin_b |w*_j - b^T alpha| over the 2^I_max sign
  patterns, w* = w_hat - g_hat / H_hat (Eq. (17)-(20), exact since H_hat is diagonal); then
  alpha = (B^T H_hat B)^{-1} B^T (H_hat w_hat - g_hat) (Eq. (22)-(23)) and alphas are made
  positive. The bitwidth (mask) does not change.
  `optax.chain(scale_by_loss_aware_amsgrad(...), basis_step())`.

  Args:
    learning_rate: float or optax schedule of the step count (paper: 1e-3, x0.8 per epoch).
    b1, b2, eps: AMSGrad constants.

  Returns:
    A GradientTransformationExtraArgs (see `coordinate`); its moments are in the w domain.

  References:
    Qu et al., `Adaptive Loss-aware Quantization for Multi-bit Networks
    <https://arxiv.org/abs/1912.08883>`_, CVPR 2020, Eq. (17)-(23), Alg. 3.
  """
  return optax.chain(scale_by_loss_aware_amsgrad(learning_rate, b1, b2, eps), basis_step())


def ste(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
        eps: float = 1e-8) -> optax.GradientTransformationExtraArgs:
  """STE with loss-aware (Appendix B.4, Alg. 6, Eq. (31)-(37)).

  Full-precision shadow weights w (initialized to B alpha) take the gradient of the quantized
  weights (STE, Eq. (31)) and the AMSGrad step w <- w - g_hat / H_hat (Eq. (33)); then
  B_j = argmin_b |b^T alpha - w_j| (Eq. (35)) and alpha = (B^T H_hat B)^{-1} B^T H_hat w
  (Eq. (36), with the stepped w), alphas made positive.
  `optax.chain(scale_by_loss_aware_amsgrad(...), ste_step())`.

  Args:
    learning_rate: float or optax schedule of the step count (paper: 1e-4, x0.98 per epoch).
    b1, b2, eps: AMSGrad constants.

  Returns:
    A GradientTransformationExtraArgs (see `coordinate`); its state also holds a `SteState`.

  References:
    Qu et al., `Adaptive Loss-aware Quantization for Multi-bit Networks
    <https://arxiv.org/abs/1912.08883>`_, CVPR 2020, Appendix B.4, Eq. (31)-(37), Alg. 6.
  """
  return optax.chain(scale_by_loss_aware_amsgrad(learning_rate, b1, b2, eps), ste_step())


def _unzip(params: PyTree, out: PyTree, k: int) -> tuple[PyTree, ...]:
  """Split a tree of k-tuples (one per params leaf, QuantizedKernel as a leaf) into k trees."""
  treedef = jax.tree.structure(params, is_leaf=is_quantized)
  tuples = treedef.flatten_up_to(out)
  return tuple(treedef.unflatten([t[i] for t in tuples]) for i in range(k))
