"""Tests for qjax.psgd (PSGD scaled gradient) and the PSGD experiment's helpers (the experiment's
rows and config are tested in test_experiments.py)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qjax import psgd
from qjax.experiments import psgd as psgd_experiment


def _params(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return {
      "Conv_0": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), dtype),
                 "bias": jnp.asarray(rng.normal(size=(4,)), dtype)},
      "Dense_0": {"kernel": jnp.asarray(rng.normal(size=(36, 5)), dtype),
                  "bias": jnp.asarray(rng.normal(size=(5,)), dtype)},
  }


def _np_grid(w, bits):
  """Nearest level of the per-tensor symmetric grid, in float32 like the library."""
  w = np.asarray(w, np.float32)
  half = np.float32(max(2 ** (bits - 1) - 1, 1))
  delta = np.abs(w).max() / half
  return np.clip(np.round(w / delta), -half, half) * delta


def _np_scale(w, wbar, normalized, eps, lambda_s):
  d = np.abs(w - wbar)
  return (d + eps) / (d.max() + eps) if normalized else lambda_s * d


@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, None])
def test_scaling_matches_numpy(normalized, bits):
  params, grads = _params(0), _params(1)
  targets = psgd.zero_targets() if bits is None else psgd.uniform_targets(bits)
  tx = psgd.scale_by_position(targets, normalized=normalized, eps=1e-3, lambda_s=7.0)
  updates, _ = tx.update(grads, tx.init(params), params)
  for path, u in jax.tree_util.tree_leaves_with_path(updates):
    w = np.asarray(params[path[0].key][path[1].key])
    g = np.asarray(grads[path[0].key][path[1].key], np.float64)
    wbar = np.zeros_like(w) if bits is None else _np_grid(w, bits)
    w, wbar = w.astype(np.float64), wbar.astype(np.float64)
    np.testing.assert_allclose(u, g * _np_scale(w, wbar, normalized, 1e-3, 7.0), rtol=2e-5,
                               atol=1e-6)


def test_normalized_scale_in_unit_interval_and_positive_on_target():
  rng = np.random.default_rng(2)
  w = rng.normal(size=(64,)).astype(np.float32)
  w[:16] = _np_grid(w, 3)[:16]  # exactly on a level of the 3-bit grid
  params = {"kernel": jnp.asarray(w)}
  eps = 1e-4
  tx = psgd.scale_by_position(psgd.uniform_targets(3), eps=eps)
  s, _ = tx.update({"kernel": jnp.ones(64)}, tx.init(params), params)
  s = np.asarray(s["kernel"])
  assert np.all(s > 0) and np.all(s <= 1)
  d_max = np.abs(w - _np_grid(w, 3)).max()
  np.testing.assert_allclose(s[:16], eps / (d_max + eps), rtol=1e-4)
  assert s.max() == 1.0


def test_per_layer_bits():
  params = _params(3)
  bits = {"Conv_0": 8, "Dense": 2}
  tx = psgd.scale_by_position(psgd.uniform_targets(bits), normalized=False, lambda_s=1.0)
  grads = jax.tree.map(jnp.ones_like, params)
  s, _ = tx.update(grads, tx.init(params), params)
  for layer, b in (("Conv_0", 8), ("Dense_0", 2)):
    w = np.asarray(params[layer]["kernel"])
    np.testing.assert_allclose(s[layer]["kernel"], np.abs(w - _np_grid(w, b)), atol=1e-6)
  # layer names are qjax.rules.path_name: the module path, without the trailing 'kernel'
  names = ["Conv_0", "Conv_0/bias", "Dense_0", "Dense_1", "Dense_10"]
  assert psgd.per_layer_bits(lambda name: 8 if "Conv" in name else 3, names) == {
      "Conv_0": 8, "Conv_0/bias": 8, "Dense_0": 3, "Dense_1": 3, "Dense_10": 3}
  assert psgd.per_layer_bits({"^Dense_1": 4, "default": 2}, names)["Dense_10"] == 4
  assert psgd.per_layer_bits({"^Dense_1$": 4, "default": 2}, names)["Dense_10"] == 2
  with pytest.raises(ValueError, match="'Other_0' matches no pattern"):
    psgd.per_layer_bits({"Conv": 4}, ["Other_0"])
  with pytest.raises(ValueError, match=r"\['Dense_7'\] match no layer"):
    psgd.per_layer_bits({"Conv": 4, "Dense_7": 2, "default": 3}, names)


def test_unused_bits_pattern_is_an_error_at_init():
  params = _params(3)
  for tx in (psgd.psgd(0.1, {"Conv_0": 8, "Dense_9": 2, "default": 4}),
             psgd.scale_by_position(psgd.uniform_targets({"Conv_0": 8, "Dense_9": 2}))):
    with pytest.raises(ValueError, match="Dense_9"):
      tx.init(params)


@pytest.mark.parametrize("bits", [0, 1, 17, -1, {"Conv": 0}, {"Conv": 1}])
def test_bits_out_of_range(bits):
  with pytest.raises(ValueError, match="2..16"):
    psgd.uniform_targets(bits)
  with pytest.raises(ValueError, match="2..16"):
    psgd.psgd(0.1, bits)


def test_bad_bits_type_and_callable_bits_checked_at_init():
  with pytest.raises(TypeError, match="int"):
    psgd.uniform_targets(2.5)
  params = _params(4)
  tx = psgd.psgd(0.1, lambda name: 20)
  with pytest.raises(ValueError, match="'Conv_0'.*2..16"):
    tx.init(params)
  tx = psgd.scale_by_position(psgd.uniform_targets(lambda name: 1))
  with pytest.raises(ValueError, match="'Conv_0/bias'.*2..16"):
    tx.update(params, optax.EmptyState(), params)


@pytest.mark.parametrize("make", [
    lambda: psgd.scale_by_position(psgd.uniform_targets(3)),
    lambda: psgd.psgd(0.1, 3, weight_decay=1e-3),
    lambda: optax.chain(psgd.scale_by_position(psgd.zero_targets()),
                        optax.add_decayed_weights(1e-3), optax.sgd(0.1)),
    lambda: optax.chain(psgd.psgd(0.1, {"Conv": 8, "default": 2}),
                        optax.add_decayed_weights(1e-4)),
])
def test_extra_args_accepted(make):
  """`tx.update(g, s, p, value=loss)` (as optax.chain members like linesearches pass it)."""
  params, grads = _params(13), _params(14)
  tx = make()
  state = tx.init(params)
  for jit in (False, True):
    update = jax.jit(tx.update) if jit else tx.update
    plain, _ = update(grads, state, params)
    with_value, new_state = update(grads, state, params, value=jnp.float32(1.5))
    chex.assert_trees_all_equal(with_value, plain)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)


def test_params_required():
  params = _params(5)
  for tx in (psgd.scale_by_position(psgd.zero_targets()), psgd.psgd(0.1, 4)):
    with pytest.raises(ValueError, match="params"):
      tx.update(params, tx.init(params))


def test_exactly_one_of_bits_and_targets():
  with pytest.raises(ValueError, match="exactly one"):
    psgd.psgd(0.1)
  with pytest.raises(ValueError, match="exactly one"):
    psgd.psgd(0.1, 4, targets=psgd.zero_targets())


def test_psgd_scales_kernels_only_and_decays_after_scaling():
  params, grads = _params(6), _params(7)
  lr, wd = 0.1, 0.01
  tx = psgd.psgd(lr, 2, weight_decay=wd, normalized=False, lambda_s=3.0)
  updates, _ = tx.update(grads, tx.init(params), params)
  for layer in params:
    w, g = (np.asarray(t[layer]["kernel"]) for t in (params, grads))
    s = 3.0 * np.abs(w - _np_grid(w, 2))
    np.testing.assert_allclose(updates[layer]["kernel"], -lr * (s * g + wd * w), rtol=1e-5,
                               atol=1e-7)
    b, gb = (np.asarray(t[layer]["bias"]) for t in (params, grads))
    np.testing.assert_allclose(updates[layer]["bias"], -lr * (gb + wd * b), rtol=1e-5)


class TestStateAndJit(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_state_shape_dtype_fixed_across_steps(self):
    params = _params(8)
    tx = psgd.psgd(optax.cosine_decay_schedule(0.1, 10), 3, weight_decay=1e-4)
    state = tx.init(params)
    update = self.variant(tx.update)
    for i in range(3):
      grads = _params(10 + i)
      updates, new_state = update(grads, state, params)
      chex.assert_trees_all_equal_shapes_and_dtypes(state, new_state)
      chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
      params = optax.apply_updates(params, updates)
      state = new_state
    chex.assert_tree_all_finite(params)

  @chex.variants(with_jit=True, without_jit=True)
  def test_inject_hyperparams_with_schedule(self):
    params = _params(9)
    schedule = optax.linear_schedule(0.1, 0.01, 5)
    injected = optax.inject_hyperparams(psgd.psgd, static_args=("bits", "targets", "mask"))(
        learning_rate=schedule, bits=2, lambda_s=5.0, normalized=False)
    plain = psgd.psgd(schedule, 2, lambda_s=5.0, normalized=False)
    s_inj, s_plain = injected.init(params), plain.init(params)
    update_inj, update_plain = self.variant(injected.update), self.variant(plain.update)
    for i in range(3):
      grads = _params(20 + i)
      u_inj, new_inj = update_inj(grads, s_inj, params)
      u_plain, s_plain = update_plain(grads, s_plain, params)
      chex.assert_trees_all_close(u_inj, u_plain, rtol=1e-5)
      chex.assert_trees_all_equal_shapes_and_dtypes(s_inj, new_inj)
      s_inj = new_inj
    np.testing.assert_allclose(s_inj.hyperparams["learning_rate"], schedule(2), rtol=1e-6)


@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("inject", [False, True])
def test_bf16_params_keep_bf16_updates(normalized, inject):
  params, grads = _params(11, jnp.bfloat16), _params(12, jnp.bfloat16)
  if inject:
    tx = optax.inject_hyperparams(psgd.psgd, static_args="bits")(
        learning_rate=0.1, bits=2, normalized=normalized, weight_decay=1e-3)
  else:
    tx = psgd.psgd(0.1, 2, normalized=normalized, weight_decay=1e-3)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  chex.assert_trees_all_equal_dtypes(updates, params)
  chex.assert_tree_all_finite(updates)


def test_no_increase_on_convex_quadratics_with_step_one_over_l():
  """Rebuttal theorem: 0 < s <= 1 and step 1/L never increase a convex L-smooth f."""
  n, dim, steps = 100, 12, 40
  keys = jax.random.split(jax.random.key(0), n)
  tx = psgd.scale_by_position(psgd.uniform_targets(2), eps=1e-6)

  def run(key):
    k1, k2, k3 = jax.random.split(key, 3)
    m = jax.random.normal(k1, (dim, dim))
    a = m @ m.T / dim + 1e-2 * jnp.eye(dim)
    b = jax.random.normal(k2, (dim,))
    f = lambda x: 0.5 * x @ a @ x - b @ x
    lipschitz = jnp.linalg.eigvalsh(a)[-1]

    def step(x, _):
      u, _ = tx.update({"kernel": jax.grad(f)(x)}, optax.EmptyState(), {"kernel": x})
      x_new = x - u["kernel"] / lipschitz
      return x_new, f(x_new)

    x0 = jax.random.normal(k3, (dim,))
    _, losses = jax.lax.scan(step, x0, None, length=steps)
    return jnp.concatenate([f(x0)[None], losses])

  losses = np.asarray(jax.jit(jax.vmap(run))(keys), np.float64)
  increase = np.diff(losses, axis=1)
  assert np.all(increase <= 1e-5 * (1.0 + np.abs(losses[:, :-1])))
  assert np.all(losses[:, -1] < losses[:, 0])


def _fit_regression(tx, steps=4000):
  """Underdetermined least squares with a ternary solution; full-batch descent from a small init.

  Many weight vectors fit the data exactly; SGD ends near the min-norm one (dense, off-grid),
  PSGD at one whose weights sit on their targets.
  """
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(40, 64)) / np.sqrt(40), jnp.float32)
  w_true = rng.choice([-1.0, 0.0, 1.0], size=(64, 1), p=[0.05, 0.9, 0.05])
  y = x @ jnp.asarray(w_true, jnp.float32)
  params = {"kernel": jnp.asarray(rng.normal(size=(64, 1)) * 0.01, jnp.float32)}
  loss = lambda p: jnp.sum((x @ p["kernel"] - y) ** 2) / jnp.sum(y ** 2)

  def step(carry, _):
    p, state = carry
    updates, state = tx.update(jax.grad(loss)(p), state, p)
    return (optax.apply_updates(p, updates), state), None

  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
  return params, float(loss(params))


def test_regression_psgd_lands_on_grid_and_prunes():
  # A fixed-step 2-bit grid {-1, 0, 1} as a user target: with the per-tensor absmax grid the
  # largest weight is always on its own target, which slows a weight vector that must grow.
  ternary = lambda w, path: jnp.clip(jnp.round(w), -1.0, 1.0)
  sgd_params, sgd_loss = _fit_regression(optax.sgd(0.1))
  q_params, q_loss = _fit_regression(psgd.psgd(0.1, targets=ternary, momentum=0.0))
  z_params, z_loss = _fit_regression(psgd.psgd(0.1, targets=psgd.zero_targets(), momentum=0.0))
  assert max(sgd_loss, q_loss, z_loss) < 1e-3

  def grid_error(p):
    w = p["kernel"]
    return float(jnp.linalg.norm(w - ternary(w, "")) / jnp.linalg.norm(w))

  assert grid_error(q_params) < 0.1 * grid_error(sgd_params)
  near_zero = lambda p: float(jnp.mean(jnp.abs(p["kernel"]) < 1e-2 * jnp.abs(p["kernel"]).max()))
  assert near_zero(z_params) > 0.6 > 0.1 > near_zero(sgd_params)
