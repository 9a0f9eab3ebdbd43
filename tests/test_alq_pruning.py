"""Alg. 2 pruning (Eq. 13), the schedule (Eq. 30), accounting (Eq. 28) and the Alg. 5 driver."""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qjax import alq


@functools.lru_cache(maxsize=None)
def _quantized(seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  params = {"Conv_0": {"kernel": jax.random.normal(k[0], (3, 3, 2, 8))},
            "Dense_0": {"kernel": jax.random.normal(k[1], (16, 6))},
            "Dense_1": {"kernel": jax.random.normal(k[2], (6, 3))}}
  return alq.init(params, {"Conv_0": "kernel-wise", "Dense_0": "subchannel-wise(2)",
                           "Dense_1": "channel-wise"}, max_bits=4, sigma=0.0)


@functools.lru_cache(maxsize=None)
def _stepped_state(seed, kind, lr, steps=2):
  """Moments of `steps` random-gradient updates of alq.<kind>(lr) on _quantized(seed)."""
  q = _quantized(seed)
  tx = getattr(alq, kind)(lr)
  state = tx.init(q)
  update = jax.jit(tx.update)
  for s in range(steps):
    rec = alq.reconstruct(q)
    leaves, treedef = jax.tree.flatten(rec)
    keys = jax.random.split(jax.random.key(100 + s), len(leaves))
    grads = treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    _, state = update(grads, state, q)
  return state


def _metrics(q, state, lr, alpha_domain):
  m = alq.loss_aware_moments(state)
  out = {}
  for name in ("Conv_0", "Dense_0", "Dense_1"):
    out[name] = np.asarray(alq.metric(q[name]["kernel"], m.mu[name]["kernel"],
                                      m.nu_max[name]["kernel"], m.count, lr,
                                      alpha_domain=alpha_domain))
  return out


class PruneTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_removes_globally_lowest_f(self):
    q = _quantized()
    lr = 1e-2
    for kind, alpha_domain in (("coordinate", True), ("basis", False)):
      state = _stepped_state(0, kind, lr)
      f = _metrics(q, state, lr, alpha_domain)
      pooled = np.concatenate([f[n].ravel() for n in f])
      num_remove = 25
      threshold = np.sort(pooled)[num_remove - 1]
      prune = self.variant(lambda q, s, n: alq.prune(q, s, n, top_k=1.0, learning_rate=lr))
      new_q, new_state = prune(q, state, jnp.int32(num_remove))
      chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
      removed = 0
      for name in f:
        old, nk = q[name]["kernel"], new_q[name]["kernel"]
        gone = np.asarray(old.mask) & ~np.asarray(nk.mask)
        removed += gone.sum()
        assert np.all(f[name][gone] <= threshold)
        assert np.all(f[name][np.asarray(nk.mask)] >= threshold)
        assert np.all(np.asarray(nk.alpha)[gone] == 0)
        if alpha_domain:
          nu_max = alq.loss_aware_moments(new_state).nu_max
          assert np.all(np.asarray(nu_max[name]["kernel"])[gone] == 0)
      assert removed == num_remove

  @chex.variants(with_jit=True, without_jit=True)
  def test_per_layer_proposals_then_pooled(self):
    q = _quantized(1)
    lr = 1e-2
    state = _stepped_state(1, "coordinate", lr)
    f = _metrics(q, state, lr, True)
    top_k = 0.1
    proposals = []
    for name in f:
      k = max(1, int(np.ceil(top_k * f[name].size)))
      proposals += [(v, name, i) for v, i in zip(np.sort(f[name].ravel())[:k],
                                                  np.argsort(f[name].ravel())[:k])]
    proposals.sort()
    num_remove = 9
    expected = {(n, i) for _, n, i in proposals[:num_remove]}
    new_q, _ = self.variant(lambda q, s: alq.prune(q, s, num_remove, top_k=top_k,
                                                   learning_rate=lr))(q, state)
    got = set()
    for name in f:
      gone = np.asarray(q[name]["kernel"].mask) & ~np.asarray(new_q[name]["kernel"].mask)
      got |= {(name, i) for i in np.flatnonzero(gone.ravel())}
    assert got == expected
    # more than proposed: only the proposals go, dead slots are never chosen again
    many, _ = alq.prune(new_q, state, 10_000, top_k=top_k, learning_rate=lr)
    assert alq.num_alphas(new_q) - alq.num_alphas(many) <= len(proposals)
    for name in f:
      assert not np.any(np.asarray(many[name]["kernel"].mask) & ~np.asarray(
          new_q[name]["kernel"].mask))

  def test_bad_top_k(self):
    q = _quantized()
    with pytest.raises(ValueError, match="top_k"):
      alq.prune(q, alq.coordinate(1e-3).init(q), 1, top_k=0.0, learning_rate=1e-3)


def test_schedule():
  assert alq.schedule(1000, 0.3, 3) == [700, 490, 343]
  with pytest.raises(ValueError, match="prune_ratio"):
    alq.schedule(1000, 1.0, 2)


def test_report_eq28():
  q = _quantized()
  rep = alq.report(q)
  layer = rep["layers"]["Dense_0"]
  g, n = 12, 8
  assert (layer["groups"], layer["group_size"]) == (g, n)
  live = int(np.sum(np.asarray(q["Dense_0"]["kernel"].mask)))
  bits = live / g
  np.testing.assert_allclose(layer["bits"], bits)
  np.testing.assert_allclose(layer["compression"],
                             g * n * 32 / (bits * g * n + bits * 32 * g * n / n))
  np.testing.assert_allclose(layer["storage_bytes"], (live * n + 32 * live) / 8)
  weights = {k: v["weights"] for k, v in rep["layers"].items()}
  np.testing.assert_allclose(rep["bits"], sum(rep["layers"][k]["bits"] * w
                                              for k, w in weights.items()) / sum(weights.values()))


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(3)(x)


def test_pipeline_follows_schedule_and_bits_fall():
  model = _MLP()
  x = np.asarray(jax.random.normal(jax.random.key(0), (96, 8)))
  y = np.asarray(jnp.argmax(x[:, :3], axis=1)).astype(np.int32)
  params = model.init(jax.random.key(1), x[:1])["params"]

  def loss_fn(p, xb, yb):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, xb),
                                                           yb).mean()

  c = alq.default_config()
  c.structures = (("Dense_0", "subchannel-wise(2)"), ("Dense_1", "channel-wise"))
  c.update(max_bits=4, batch_size=32, init_epochs=1, rounds=3, prune_ratio=0.4, top_k=0.2,
           basis_epochs=1, coordinate_epochs=1, final="ste", final_epochs=1)
  seen = []
  q, history = alq.run(params, loss_fn, (x, y), c, key=jax.random.key(2),
                       evaluate=lambda q: 0.0, on_round=seen.append)
  assert [r["round"] for r in history.rounds] == [0, 1, 2, 3, "final"]
  m0 = history.rounds[0]["alphas"]
  assert [r["alphas"] for r in history.rounds[1:4]] == alq.schedule(m0, 0.4, 3)
  assert history.rounds[4]["alphas"] == history.rounds[3]["alphas"]
  bits = [r["bits"] for r in history.rounds[:4]]
  assert all(b1 > b2 for b1, b2 in zip(bits, bits[1:]))
  assert len(seen) == 5 and len(history.loss) == len(history.phase)
  assert set(history.phase) == {"basis", "coordinate", "prune", "ste"}
  assert np.all(np.isfinite(history.loss))
  assert alq.reconstruct(q)["Dense_0"]["kernel"].shape == (8, 16)
