"""ALQ optimizer steps as optax transformations (Sec. 3.3, Appendix B.2 and B.4).

All three read AMSGrad as a diagonal quadratic model of the loss around the current weights, as
the authors' code does (beta1 0.9, beta2 0.999, eps 1e-8; PyTorch's form of the bias correction):

  g_hat = lr / (1 - beta1^t) m,   H_hat = (sqrt(v_hat) + eps) / sqrt(1 - beta2^t),   v_hat = max v
  loss(w) ~ g_hat^T (w - w_hat) + 1/2 (w - w_hat)^T diag(H_hat) (w - w_hat)

so that the plain AMSGrad step is w <- w - g_hat / H_hat.

* `coordinate` (Alg. 4, Eq. 14, 21): B fixed; AMSGrad in the alpha domain on
  dl/dalpha_g = B_g^T dl/dw_hat_g (dead slots masked).
* `basis` (Alg. 3, Eq. 17-23): AMSGrad moments in the w domain; with alpha fixed each weight's
  row of B is the sign pattern whose value b^T alpha is nearest to the target
  w* = w_hat - g_hat / H_hat (exact search over the 2^I_max patterns' values; dead slots
  contribute 0),
  then alpha = (B^T H_hat B)^{-1} B^T (H_hat w_hat - g_hat) (Eq. 23) and negative alphas are made
  positive by flipping their basis column.
* `ste` (Alg. 6, Eq. 31-37): keeps full-precision shadow weights w (in the state), steps
  w <- w - g_hat / H_hat (Eq. 33) with the gradient of w_hat (STE, Eq. 31), then refits B
  (Eq. 35) and alpha (Eq. 36) to the new w.

Parameters other than QuantizedKernels (biases, float layers) take a plain AMSGrad step.

Gradients: `update(grads, state, params)` takes the gradients w.r.t. the *reconstructed* tree,
i.e. `jax.grad(loss)(qjax.alq.reconstruct(params))`: a kernel-shaped dl/dw_hat where `params` has
a QuantizedKernel. That is the natural autodiff of the network and what Alg. 3 and 6 need;
Alg. 4's alpha gradient is formed inside (Eq. 14).

Updates: the returned tree has the structure of `params`; for a QuantizedKernel it is a
QuantizedKernel of deltas -- alpha: new - old (float32), B: new - old (int8, in {-2, 0, 2}, exact),
mask: all False -- so `optax.apply_updates(params, updates)` gives the new quantized layers (for
bool leaves `p + u` is a logical or, and the transforms never revive a slot). Masks change only in
`qjax.alq.prune`. Chaining these transforms after others is fine; chaining others after them
(e.g. scaling the updates) is not meaningful, since B must stay binary.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from qjax.alq.kernel import QuantizedKernel, group, is_quantized, map_quantized

PyTree = Any


class CoordinateState(NamedTuple):
  """State of `coordinate`: AMSGrad moments in the alpha domain."""
  count: jax.Array  # () int32, steps taken
  mu: PyTree  # first moment; (G, I_max) float32 per QuantizedKernel, param-shaped elsewhere
  nu: PyTree  # second moment; same shapes as mu
  nu_max: PyTree  # running max of nu (AMSGrad); same shapes as mu


class BasisState(NamedTuple):
  """State of `basis`: AMSGrad moments in the w domain."""
  count: jax.Array  # () int32, steps taken
  mu: PyTree  # first moment; (G, n) float32 per QuantizedKernel (group layout), param-shaped else
  nu: PyTree  # second moment; same shapes as mu
  nu_max: PyTree  # running max of nu (AMSGrad); same shapes as mu


class SteState(NamedTuple):
  """State of `ste`: AMSGrad moments and full-precision shadow weights in the w domain."""
  count: jax.Array  # () int32, steps taken
  mu: PyTree  # first moment; (G, n) float32 per QuantizedKernel (group layout), param-shaped else
  nu: PyTree  # second moment; same shapes as mu
  nu_max: PyTree  # running max of nu (AMSGrad); same shapes as mu
  shadow: PyTree  # (G, n) float32 shadow weights per QuantizedKernel; the float param elsewhere


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

  The table of all 2^I values b^T alpha of a group (Eq. 20; dead slots contribute 0) is sorted
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
  """The B step and speedup alpha around `center` (Eq. 17-23, or Eq. 35-36 with shadow weights).

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


def coordinate(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
               eps: float = 1e-8) -> optax.GradientTransformationExtraArgs:
  """Optimizing the coordinates alpha with B fixed (Alg. 4): AMSGrad in the alpha domain.

  g_alpha = B_g^T dl/dw_hat_g (Eq. 14) feeds AMSGrad moments (m, v, v_hat = max v) and
  alpha <- alpha - g_hat_alpha / H_hat_alpha (Eq. 21), i.e.
  alpha <- alpha - lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v_hat) + eps). Dead slots stay 0.

  Args:
    learning_rate: float or optax schedule of the step count (paper: 1e-5, x0.8 per epoch).
    b1, b2, eps: AMSGrad constants.

  Returns:
    A GradientTransformationExtraArgs; `update(grads, state, params)` needs `params` and grads
    w.r.t. `reconstruct(params)` (see the module docstring).
  """

  def init_fn(params):
    zeros = lambda: _zeros(params, lambda q: q.alpha)
    return CoordinateState(count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros(), nu_max=zeros())

  def update_fn(grads, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("qjax.alq.coordinate needs params (the quantized tree) in update")
    count = optax.safe_increment(state.count)
    lr = _lr(learning_rate, state.count)

    def quantized(q, g, mu, nu, nu_max):
      mu, nu, nu_max = _moments(_alpha_grad(q, g), mu, nu, nu_max, b1, b2)
      g_hat, h_hat = quadratic_model(mu, nu_max, count, lr, b1, b2, eps)
      return _delta(q, q.alpha - g_hat / h_hat, q.B), mu, nu, nu_max

    def other(p, g, mu, nu, nu_max):
      return _float_step(g, mu, nu, nu_max, count, lr, b1, b2, eps)

    out = map_quantized(quantized, other, params, grads, state.mu, state.nu, state.nu_max)
    updates, mu, nu, nu_max = _unzip(params, out, 4)
    return updates, CoordinateState(count=count, mu=mu, nu=nu, nu_max=nu_max)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def basis(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8) -> optax.GradientTransformationExtraArgs:
  """Optimizing the binary bases with speedup (Alg. 3, Eq. 17-23).

  AMSGrad moments of dl/dw_hat give the quadratic model (g_hat, H_hat) around w_hat = B alpha.
  With alpha fixed, each weight j picks B_j = argmin_b |w*_j - b^T alpha| over the 2^I_max sign
  patterns, w* = w_hat - g_hat / H_hat (Eq. 17-20, exact since H_hat is diagonal); then
  alpha = (B^T H_hat B)^{-1} B^T (H_hat w_hat - g_hat) (Eq. 22-23) and alphas are made positive.
  The bitwidth (mask) does not change.

  Args:
    learning_rate: float or optax schedule of the step count (paper: 1e-3, x0.8 per epoch).
    b1, b2, eps: AMSGrad constants.

  Returns:
    A GradientTransformationExtraArgs (see `coordinate`).
  """

  def init_fn(params):
    zeros = lambda: _zeros(params, lambda q: q.B[..., 0])
    return BasisState(count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros(), nu_max=zeros())

  def update_fn(grads, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("qjax.alq.basis needs params (the quantized tree) in update")
    count = optax.safe_increment(state.count)
    lr = _lr(learning_rate, state.count)

    def quantized(q, g, mu, nu, nu_max):
      mu, nu, nu_max = _moments(group(g, q).astype(jnp.float32), mu, nu, nu_max, b1, b2)
      g_hat, h_hat = quadratic_model(mu, nu_max, count, lr, b1, b2, eps)
      alpha, B = refit(q, q.groups(), g_hat, h_hat)
      return _delta(q, alpha, B), mu, nu, nu_max

    def other(p, g, mu, nu, nu_max):
      return _float_step(g, mu, nu, nu_max, count, lr, b1, b2, eps)

    out = map_quantized(quantized, other, params, grads, state.mu, state.nu, state.nu_max)
    updates, mu, nu, nu_max = _unzip(params, out, 4)
    return updates, BasisState(count=count, mu=mu, nu=nu, nu_max=nu_max)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def ste(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
        eps: float = 1e-8) -> optax.GradientTransformationExtraArgs:
  """STE with loss-aware (Appendix B.4, Alg. 6, Eq. 31-37).

  The state keeps full-precision shadow weights w (initialized to B alpha). The gradient of the
  quantized weights is used for w (STE, Eq. 31); AMSGrad steps w <- w - g_hat / H_hat (Eq. 33);
  then B_j = argmin_b |b^T alpha - w_j| (Eq. 35) and alpha = (B^T H_hat B)^{-1} B^T H_hat w
  (Eq. 36, with the stepped w), alphas made positive.

  Args:
    learning_rate: float or optax schedule of the step count (paper: 1e-4, x0.98 per epoch).
    b1, b2, eps: AMSGrad constants.

  Returns:
    A GradientTransformationExtraArgs (see `coordinate`).
  """

  def init_fn(params):
    zeros = lambda: _zeros(params, lambda q: q.B[..., 0])
    shadow = map_quantized(lambda q: q.groups(), lambda p: jnp.asarray(p), params)
    return SteState(count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros(), nu_max=zeros(),
                    shadow=shadow)

  def update_fn(grads, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("qjax.alq.ste needs params (the quantized tree) in update")
    count = optax.safe_increment(state.count)
    lr = _lr(learning_rate, state.count)

    def quantized(q, g, mu, nu, nu_max, w):
      mu, nu, nu_max = _moments(group(g, q).astype(jnp.float32), mu, nu, nu_max, b1, b2)
      g_hat, h_hat = quadratic_model(mu, nu_max, count, lr, b1, b2, eps)
      alpha, B = refit(q, w, g_hat, h_hat)
      return _delta(q, alpha, B), mu, nu, nu_max, w - g_hat / h_hat

    def other(p, g, mu, nu, nu_max, w):
      step, mu, nu, nu_max = _float_step(g, mu, nu, nu_max, count, lr, b1, b2, eps)
      return step, mu, nu, nu_max, w + step

    out = map_quantized(quantized, other, params, grads, state.mu, state.nu, state.nu_max,
                        state.shadow)
    updates, mu, nu, nu_max, shadow = _unzip(params, out, 5)
    return updates, SteState(count=count, mu=mu, nu=nu, nu_max=nu_max, shadow=shadow)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _unzip(params: PyTree, out: PyTree, k: int) -> tuple[PyTree, ...]:
  """Split a tree of k-tuples (one per params leaf, QuantizedKernel as a leaf) into k trees."""
  treedef = jax.tree.structure(params, is_leaf=is_quantized)
  tuples = treedef.flatten_up_to(out)
  return tuple(treedef.unflatten([t[i] for t in tuples]) for i in range(k))
