"""ALQ optax transformations: coordinate (Alg. 4), basis (Alg. 3), ste (Alg. 6)."""
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qjax import alq

B1, B2, EPS = 0.9, 0.999, 1e-8


def _quantized(max_bits=3, sigma=0.0, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  params = {"Conv_0": {"kernel": jax.random.normal(k[0], (3, 3, 2, 4)),
                       "bias": jax.random.normal(k[1], (4,))},
            "Dense_0": {"kernel": jax.random.normal(k[2], (12, 5)),
                        "bias": jax.random.normal(k[3], (5,))}}
  q = alq.init(params, {"Conv_0": "kernel-wise", "Dense_0": "subchannel-wise(2)"},
               max_bits=max_bits, sigma=sigma)
  # a few dead slots, as after pruning
  dq = q["Dense_0"]["kernel"]
  mask = dq.mask.at[0, 1:].set(False).at[3, 2].set(False)
  q["Dense_0"]["kernel"] = dq.replace(mask=mask, alpha=jnp.where(mask, dq.alpha, 0.0))
  return q


def _grads(q, seed):
  rec = alq.reconstruct(q)
  leaves, treedef = jax.tree.flatten(rec)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _np_amsgrad(grads, lr):
  """Reference AMSGrad (PyTorch form) as the quadratic model: list of (g_hat, H_hat) per step."""
  m = v = vmax = 0.0
  out = []
  for t, g in enumerate(grads, start=1):
    m = B1 * m + (1 - B1) * g
    v = B2 * v + (1 - B2) * g * g
    vmax = np.maximum(vmax, v)
    out.append((lr / (1 - B1 ** t) * m, (np.sqrt(vmax) + EPS) / np.sqrt(1 - B2 ** t)))
  return out


def _patterns(bits):
  return np.array(list(itertools.product((-1.0, 1.0), repeat=bits)))


class TransformsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_coordinate_is_amsgrad_on_alpha_gradient(self):
    q = _quantized()
    lr = 1e-2
    tx = alq.coordinate(lr)
    state = tx.init(q)
    update = self.variant(tx.update)
    grads_seq = [_grads(q, s) for s in range(3)]
    g_alpha, g_bias = [], []
    qk = q["Dense_0"]["kernel"]
    B = np.asarray(qk.B, np.float64)
    for grads in grads_seq:
      gw = np.asarray(alq.to_groups(grads["Dense_0"]["kernel"], qk.structure), np.float64)
      g_alpha.append(np.einsum("gni,gn->gi", B, gw) * np.asarray(qk.mask))
      g_bias.append(np.asarray(grads["Dense_0"]["bias"], np.float64))
    alpha = np.asarray(qk.alpha, np.float64)
    bias = np.asarray(q["Dense_0"]["bias"], np.float64)
    for grads, (ga, ha), (gb, hb) in zip(grads_seq, _np_amsgrad(g_alpha, lr),
                                         _np_amsgrad(g_bias, lr)):
      updates, new_state = update(grads, state, q)
      chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
      q = optax.apply_updates(q, updates)
      state = new_state
      alpha = alpha - np.where(np.asarray(qk.mask), ga / ha, 0.0)
      bias = bias - gb / hb
      np.testing.assert_allclose(q["Dense_0"]["kernel"].alpha, alpha, rtol=1e-4, atol=1e-6)
      np.testing.assert_allclose(q["Dense_0"]["bias"], bias, rtol=1e-5, atol=1e-6)
      chex.assert_trees_all_equal(q["Dense_0"]["kernel"].B, qk.B)
      chex.assert_trees_all_equal(q["Dense_0"]["kernel"].mask, qk.mask)

  @chex.variants(with_jit=True, without_jit=True)
  def test_basis_step_exhaustive_search_and_speedup_alpha(self):
    q = _quantized()
    lr = 1e-2
    tx = alq.basis(lr)
    state = tx.init(q)
    grads = _grads(q, 7)
    updates, new_state = self.variant(tx.update)(grads, state, q)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
    new = optax.apply_updates(q, updates)
    for name in ("Conv_0", "Dense_0"):
      old, nq = q[name]["kernel"], new[name]["kernel"]
      assert nq.B.dtype == jnp.int8 and set(np.unique(np.asarray(nq.B))) <= {-1, 1}
      chex.assert_trees_all_equal(nq.mask, old.mask)
      mask = np.asarray(old.mask)
      alpha_old = np.asarray(old.alpha, np.float64) * mask
      what = np.einsum("gni,gi->gn", np.asarray(old.B, np.float64), alpha_old)
      gw = np.asarray(alq.to_groups(grads[name]["kernel"], old.structure), np.float64)
      (g_hat, h_hat), = _np_amsgrad([gw], lr)
      target = what - g_hat / h_hat  # w* of Eq. (17)-(19)
      alpha_new = np.asarray(nq.alpha, np.float64)
      B_new = np.asarray(nq.B, np.float64)
      assert np.all(alpha_new[mask] > 0)  # alphas made positive
      assert np.all(alpha_new[~mask] == 0)
      for g in range(mask.shape[0]):
        live = mask[g]
        table = _patterns(int(live.sum())) @ alpha_old[g, live]  # all 2^I values b^T alpha
        best = np.min(np.abs(target[g][:, None] - table[None, :]), axis=1)
        # the positivity step flipped some columns of the search's B (with their alpha):
        # find the flips under which B_new reaches the brute-force minimum
        found = None
        for flips in itertools.product((-1.0, 1.0), repeat=int(live.sum())):
          Bs = B_new[g][:, live] * np.array(flips)
          if np.allclose(np.abs(target[g] - Bs @ alpha_old[g, live]), best, atol=1e-5):
            found = (Bs, np.array(flips))
            break
        assert found is not None, f"{name} group {g}: B is not the exhaustive-search argmin"
        Bs, flips = found
        # Eq. (23): alpha = (B^T H B)^{-1} B^T (H w_hat - g_hat), independently in numpy
        h = h_hat[g]
        ls = np.linalg.solve(Bs.T @ (h[:, None] * Bs), Bs.T @ (h * what[g] - g_hat[g]))
        np.testing.assert_allclose(alpha_new[g, live], ls * flips, rtol=2e-3, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_ste_steps_shadow_and_refits(self):
    q = _quantized()
    lr = 1e-2
    tx = alq.ste(lr)
    state = tx.init(q)
    grads = _grads(q, 3)
    updates, new_state = self.variant(tx.update)(grads, state, q)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
    new = optax.apply_updates(q, updates)
    old, nq = q["Dense_0"]["kernel"], new["Dense_0"]["kernel"]
    gw = np.asarray(alq.to_groups(grads["Dense_0"]["kernel"], old.structure), np.float64)
    (g_hat, h_hat), = _np_amsgrad([gw], lr)
    shadow = np.asarray(old.groups(), np.float64) - g_hat / h_hat  # Eq. (33)
    np.testing.assert_allclose(optax.tree_utils.tree_get(new_state, "shadow")["Dense_0"]["kernel"],
                               shadow, rtol=1e-5, atol=1e-6)
    mask = np.asarray(old.mask)
    for g in range(mask.shape[0]):
      live = mask[g]
      Bs = np.asarray(nq.B, np.float64)[g][:, live]
      h = h_hat[g]
      ls = np.linalg.solve(Bs.T @ (h[:, None] * Bs), Bs.T @ (h * shadow[g]))  # Eq. (36)
      np.testing.assert_allclose(np.asarray(nq.alpha)[g, live], np.abs(ls), rtol=2e-3, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_dead_slots_stay_dead(self):
    q = _quantized()
    for tx in (alq.basis(1e-2), alq.coordinate(1e-2), alq.ste(1e-2)):
      state = tx.init(q)
      update = self.variant(tx.update)
      cur = q
      for s in range(3):
        updates, state = update(_grads(cur, s), state, cur)
        cur = optax.apply_updates(cur, updates)
      for name in ("Conv_0", "Dense_0"):
        chex.assert_trees_all_equal(cur[name]["kernel"].mask, q[name]["kernel"].mask)
        alpha = np.asarray(cur[name]["kernel"].alpha)
        assert np.all(alpha[~np.asarray(q[name]["kernel"].mask)] == 0)
        assert cur[name]["kernel"].B.dtype == jnp.int8


def test_nearest_bases_matches_brute_force():
  k = jax.random.split(jax.random.key(5), 2)
  alpha = jnp.abs(jax.random.normal(k[0], (7, 4)))
  mask = jnp.ones((7, 4), bool).at[2, 3].set(False)
  a = np.asarray(alpha * mask, np.float64)
  table = np.einsum("ki,gi->gk", _patterns(4), a)
  # far outside the table's range, inside it, and exactly on table values
  target = 3 * jax.random.normal(k[1], (7, 30))
  target = target.at[:, :16].set(jnp.asarray(table, jnp.float32))
  B = np.asarray(alq.nearest_bases(target, alpha, mask), np.float64)
  best = np.min(np.abs(np.asarray(target)[:, :, None] - table[:, None, :]), axis=-1)
  np.testing.assert_allclose(np.abs(np.asarray(target) - np.einsum("gni,gi->gn", B, a)), best,
                             atol=1e-6)
  assert np.all(B[2, :, 3] == 1)  # dead slot canonical


def test_schedule_inject_hyperparams_and_chain():
  q = _quantized()
  grads = _grads(q, 1)
  sched = optax.exponential_decay(1e-2, transition_steps=1, decay_rate=0.5)
  for tx in (alq.basis(sched), optax.inject_hyperparams(alq.coordinate)(learning_rate=1e-2),
             optax.chain(optax.clip_by_global_norm(1.0), alq.ste(1e-2))):
    state = tx.init(q)
    updates, state2 = jax.jit(tx.update)(grads, state, q)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, state2)
    optax.apply_updates(q, updates)


def test_missing_params_is_an_error():
  q = _quantized()
  with pytest.raises(ValueError, match="params"):
    alq.basis(1e-3).update(_grads(q, 0), alq.basis(1e-3).init(q))


def _bf16_tree(q):
  """q with bfloat16 biases: float leaves of another dtype next to the QuantizedKernels."""
  return jax.tree.map(lambda x: x if alq.is_quantized(x) else x.astype(jnp.bfloat16), q,
                      is_leaf=alq.is_quantized)


class OptaxContractTest(chex.TestCase):
  """What optax expects of a transformation: stable state, jit, schedules, wrappers, dtypes."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_state_shapes_and_dtypes_are_stable(self):
    q = _quantized()
    qk = q["Dense_0"]["kernel"]
    for tx, domain in ((alq.coordinate(1e-2), qk.alpha.shape), (alq.basis(1e-2), qk.B.shape[:2]),
                       (alq.ste(1e-2), qk.B.shape[:2])):
      state = tx.init(q)
      update = self.variant(tx.update)
      cur = q
      for s in range(2):
        updates, new_state = update(_grads(cur, s), state, cur)
        chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
        state, cur = new_state, optax.apply_updates(cur, updates)
      m = alq.loss_aware_moments(state)
      assert m.count.dtype == jnp.int32 and int(m.count) == 2
      for leaf in (m.mu, m.nu, m.nu_max):
        assert leaf["Dense_0"]["kernel"].shape == domain
        assert leaf["Dense_0"]["kernel"].dtype == jnp.float32

  @chex.variants(with_jit=True, without_jit=True)
  def test_shared_model_matches_numpy_amsgrad(self):
    q = _quantized()
    lr = 1e-2
    tx = alq.scale_by_loss_aware_amsgrad(lr)
    state = tx.init(q)
    update = self.variant(tx.update)
    grads_seq = [_grads(q, s) for s in range(3)]
    qk = q["Conv_0"]["kernel"]
    gw = [np.asarray(alq.to_groups(g["Conv_0"]["kernel"], qk.structure), np.float64)
          for g in grads_seq]
    for grads, (g_hat, h_hat) in zip(grads_seq, _np_amsgrad(gw, lr)):
      updates, state = update(grads, state, q)
      model = updates["Conv_0"]["kernel"]
      assert isinstance(model, alq.QuadraticModel)
      np.testing.assert_allclose(model.g_hat, g_hat, rtol=1e-4, atol=1e-7)
      np.testing.assert_allclose(model.h_hat, h_hat, rtol=1e-4, atol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  def test_inject_hyperparams_schedule_equals_plain_schedule(self):
    q = _quantized()
    sched = optax.exponential_decay(1e-2, transition_steps=1, decay_rate=0.5)
    for make in (alq.coordinate, alq.ste):  # (basis: test_chain_clip_basis_then_prune)
      plain, injected = make(sched), optax.inject_hyperparams(make)(learning_rate=sched)
      states = [plain.init(q), injected.init(q)]
      updates = [self.variant(plain.update), self.variant(injected.update)]
      cur = q
      for s in range(3):
        grads = _grads(cur, s)
        (u0, s0), (u1, s1) = [f(grads, st, cur) for f, st in zip(updates, states)]
        chex.assert_trees_all_equal_shapes_and_dtypes(s1, states[1])
        chex.assert_trees_all_close(u0, u1, rtol=1e-5, atol=1e-6)  # lr rounded differently
        states = [s0, s1]
        cur = optax.apply_updates(cur, u0)
      # the rate of the last step taken (step 2)
      np.testing.assert_allclose(states[1].hyperparams["learning_rate"], 1e-2 * 0.5 ** 2,
                                 rtol=1e-6)
      # and prune finds the moments under the wrapper
      new_q, _ = alq.prune(cur, states[1], 3, top_k=1.0, learning_rate=1e-2)
      assert alq.num_alphas(cur) - alq.num_alphas(new_q) == 3

  @chex.variants(with_jit=True, without_jit=True)
  def test_chain_clip_basis_then_prune(self):
    """The moments are found inside optax.chain: the same pruning as basis on clipped grads."""
    q = _quantized()
    lr = 1e-2
    chained = optax.chain(optax.clip(0.5), alq.basis(lr))
    plain = alq.basis(lr)
    s_chain, s_plain = chained.init(q), plain.init(q)
    for s in range(2):
      grads = _grads(q, s)
      _, s_chain = self.variant(chained.update)(grads, s_chain, q)
      _, s_plain = self.variant(plain.update)(jax.tree.map(lambda g: jnp.clip(g, -0.5, 0.5),
                                                           grads), s_plain, q)
    prune = self.variant(lambda q, s: alq.prune(q, s, 7, top_k=1.0, learning_rate=lr))
    got, new_state = prune(q, s_chain)
    want, _ = prune(q, s_plain)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, s_chain)
    assert alq.num_alphas(q) - alq.num_alphas(got) == 7
    for name in ("Conv_0", "Dense_0"):
      chex.assert_trees_all_equal(got[name]["kernel"].mask, want[name]["kernel"].mask)

  @chex.variants(with_jit=True, without_jit=True)
  def test_dtypes_preserved(self):
    q = _bf16_tree(_quantized())
    assert q["Dense_0"]["bias"].dtype == jnp.bfloat16
    for tx in (alq.coordinate(1e-2), alq.basis(1e-2), alq.ste(1e-2)):
      state = tx.init(q)
      grads = jax.tree.map(lambda g: g.astype(jnp.bfloat16), _grads(q, 0))
      updates, new_state = self.variant(tx.update)(grads, state, q)
      chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
      new = optax.apply_updates(q, updates)
      for name in ("Conv_0", "Dense_0"):
        assert updates[name]["bias"].dtype == jnp.bfloat16
        assert new[name]["bias"].dtype == jnp.bfloat16
        k = new[name]["kernel"]
        assert (k.alpha.dtype, k.B.dtype, k.mask.dtype) == (jnp.float32, jnp.int8, jnp.bool_)

  def test_steps_reject_other_updates(self):
    q = _quantized()
    tx = alq.basis_step()
    with pytest.raises(TypeError, match="scale_by_loss_aware_amsgrad"):
      tx.update(_grads(q, 0), tx.init(q), q)


def test_prune_needs_the_moments():
  q = _quantized()
  with pytest.raises(ValueError, match="ScaleByLossAwareAmsgradState"):
    alq.prune(q, optax.adam(1e-3).init(q), 1, top_k=1.0, learning_rate=1e-3)
  two = optax.chain(alq.basis(1e-3), alq.coordinate(1e-3)).init(q)
  with pytest.raises(ValueError, match="more than one"):
    alq.prune(q, two, 1, top_k=1.0, learning_rate=1e-3)


def test_prune_domain_ambiguous_when_group_size_is_max_bits():
  params = {"Dense_0": {"kernel": jax.random.normal(jax.random.key(0), (3, 4))}}
  q = alq.init(params, {"Dense_0": "channel-wise"}, max_bits=3, sigma=0.0)  # n = I_max = 3
  tx = alq.basis(1e-2)
  _, state = tx.update(_grads(q, 0), tx.init(q), q)
  with pytest.raises(ValueError, match="'Dense_0'.*alpha_domain"):
    alq.prune(q, state, 1, top_k=1.0, learning_rate=1e-2)
  new_q, _ = alq.prune(q, state, 1, top_k=1.0, learning_rate=1e-2, alpha_domain=False)
  assert alq.num_alphas(q) - alq.num_alphas(new_q) == 1
