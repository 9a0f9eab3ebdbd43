"""qjax.perplexity (GPTQ paper protocol) against a NumPy loop, and the causal_lm task's smoke run."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import perplexity as P


def _toy_lm(vocab=11):
  """logits[t] depend on tokens <= t: a bigram table plus a running mean of earlier embeddings."""
  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.normal(size=(vocab, vocab)), jnp.float32)
  emb = jnp.asarray(rng.normal(size=(vocab, vocab)), jnp.float32)

  def apply_fn(params, x):
    e = params["emb"][x]
    run = jnp.cumsum(e, axis=1) / jnp.arange(1, x.shape[1] + 1, dtype=jnp.float32)[None, :, None]
    return params["table"][x] + run
  return {"table": table, "emb": emb}, apply_fn


def test_perplexity_equals_numpy_loop():
  params, apply_fn = _toy_lm()
  ids = np.random.default_rng(1).integers(0, 11, size=103).astype(np.int32)
  seq_len = 10
  nll, count = 0.0, 0
  for w in range(len(ids) // seq_len):  # non-overlapping windows, short tail dropped
    x = ids[w * seq_len:(w + 1) * seq_len]
    logits = np.asarray(apply_fn(params, jnp.asarray(x[None])))[0].astype(np.float64)
    for t in range(seq_len - 1):
      z = logits[t] - logits[t].max()
      nll -= z[x[t + 1]] - math.log(np.exp(z).sum())
      count += 1
  for bs in (1, 3, 4):  # a padded last batch changes nothing
    got, n = P.mean_nll(apply_fn, params, ids, seq_len, batch_size=bs)
    assert n == count == 10 * 9
    assert got == pytest.approx(nll / count, rel=1e-6)
  assert P.perplexity(apply_fn, params, ids, seq_len, 3) == pytest.approx(math.exp(nll / count),
                                                                          rel=1e-6)
  assert P.mean_nll(apply_fn, params, ids, seq_len, 3, max_windows=2)[1] == 18


def test_windows_and_calibration():
  ids = np.arange(25)
  w = P.windows(ids, 6)
  assert w.shape == (4, 6) and w.dtype == np.int32 and w.ravel().tolist() == list(range(24))
  c = P.calibration_windows(ids, 5, 4, seed=3)
  assert c.shape == (5, 4)
  assert np.all(np.diff(c, axis=1) == 1)  # consecutive tokens
  np.testing.assert_array_equal(c, P.calibration_windows(ids, 5, 4, seed=3))
  with pytest.raises(ValueError, match="seq_len"):
    P.windows(ids, 1)
  with pytest.raises(ValueError, match="fewer than one window"):
    P.windows(ids, 30)
  with pytest.raises(ValueError, match="1-D"):
    P.windows(ids.reshape(5, 5), 2)
