"""The byte-level LM: causality, tied/untied heads, training on the corpus, caching, bits/byte."""
from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from qjax import text
from qjax.models.bytelm import ByteLM

TINY = dict(num_layers=2, dim=32, num_heads=2, mlp_ratio=2, max_len=16)


class ByteLMTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_output_at_t_ignores_inputs_after_t(self):
    model = ByteLM(**TINY)
    x = jax.random.randint(jax.random.key(0), (2, 16), 0, 256, jnp.int32)
    params = model.init(jax.random.key(1), x)["params"]
    fn = self.variant(lambda p, x: model.apply({"params": p}, x))
    base = fn(params, x)
    self.assertEqual(base.shape, (2, 16, 256))
    self.assertEqual(base.dtype, jnp.float32)
    for t in (0, 7, 14):
      changed = x.at[:, t + 1:].set((x[:, t + 1:] + 1) % 256)
      out = fn(params, changed)
      chex.assert_trees_all_close(out[:, :t + 1], base[:, :t + 1], atol=1e-5)
      assert float(jnp.abs(out[:, t + 1:] - base[:, t + 1:]).max()) > 1e-4  # later ones move

  def test_tied_and_untied_heads(self):
    x = jnp.zeros((1, 8), jnp.int32)
    tied = ByteLM(**TINY, tied_embeddings=True).init(jax.random.key(0), x)["params"]
    untied = ByteLM(**TINY, tied_embeddings=False).init(jax.random.key(0), x)["params"]
    assert "head" not in tied and untied["head"]["kernel"].shape == (32, 256)
    n = lambda p: sum(v.size for v in jax.tree_util.tree_leaves(p))  # noqa: E731
    assert n(untied) - n(tied) == 32 * 256 + 256

  def test_bad_inputs(self):
    model = ByteLM(**TINY)
    with pytest.raises(ValueError, match="exceeds max_len 16"):
      model.init(jax.random.key(0), jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match="must be int"):
      model.init(jax.random.key(0), jnp.zeros((17,), jnp.int32))


def _tiny_config(steps: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(TINY, seq_len=16, batch_size=8, steps=steps,
                                        learning_rate=3e-3, warmup_steps=5))


def test_training_reduces_loss_and_caches(tmp_path):
  lm = text.train_bytelm(_tiny_config(30), str(tmp_path))
  assert len(lm.losses) == 30 and all(np.isfinite(lm.losses))
  assert np.mean(lm.losses[-5:]) < np.mean(lm.losses[:5]) - 1.0  # nats per byte
  cached = list(tmp_path.glob("bytelm_*.msgpack"))
  assert len(cached) == 1
  again = text.train_bytelm(_tiny_config(30), str(tmp_path))
  assert again.losses == [] and again.seconds == 0.0
  chex.assert_trees_all_equal(again.params, lm.params)
  # Another recipe, another file.
  other = ml_collections.ConfigDict({**lm.config.to_dict(), "steps": 2})
  assert text.bytelm_config_hash(lm.config) != text.bytelm_config_hash(other)


def test_bits_per_byte_of_the_model_against_numpy():
  model = ByteLM(**TINY)
  params = model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"]
  apply_fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
  data = text.load_corpus().bytes("test")[:16 * 5 + 1]
  x, y = text.eval_windows(data, 16)
  got = text.evaluate_bits_per_byte(apply_fn, params, x, y, batch_size=2)
  logits = np.asarray(apply_fn(params, jnp.asarray(x)), np.float64)
  m = logits.max(-1, keepdims=True)
  logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
  want = -np.mean(np.take_along_axis(logp, y[..., None], -1)) / math.log(2)
  assert got == pytest.approx(want, rel=1e-5)


def test_config_errors():
  with pytest.raises(ValueError, match=r"unknown keys \['layers'\]"):
    text.train_bytelm(ml_collections.ConfigDict({"layers": 2}))
  with pytest.raises(ValueError, match="seq_len"):
    text.train_bytelm(ml_collections.ConfigDict({"seq_len": 64, "max_len": 32}))


# ---------------------------------------------------------------------------------------------
# The experiment (qjax.experiments.bytelm.run) on a tiny model.


def _run_tiny(tmp_path, methods):
  from qjax.experiments import bytelm  # pylint: disable=g-import-not-at-top
  config = bytelm.default_config()
  config.bytelm.update(dict(TINY, seq_len=16, batch_size=8, steps=20, warmup_steps=5))
  config.methods = methods
  config.bits = (8, 2)
  config.calibration_size = 8
  runs, key = bytelm.run(config, str(tmp_path))
  assert set(runs) == {"float", *methods} and len(key) == 12
  assert bytelm.run(config, str(tmp_path))[1] == key  # the key is deterministic
  rows = [r for rs in runs.values() for r in rs]
  by = {(r["method"], r["bits"]): r for r in rows}
  assert set(by) == {("float", 32)} | {(m, b) for m in methods for b in (8, 2)}
  f = by[("float", 32)]
  assert f["bits_per_byte"] < 8.0 and 4.5 < f["unigram_bits_per_byte"] < 5.0  # 8 = uniform
  for m in methods:
    assert abs(by[(m, 8)]["increase"]) < 0.05           # 8 bits: almost float
    assert by[(m, 2)]["increase"] > by[(m, 8)]["increase"]
  return rows


def test_run_bytelm_tiny(tmp_path):
  from qjax.experiments import bytelm  # pylint: disable=g-import-not-at-top
  rows = _run_tiny(tmp_path, ("rtn", "rtn-channel"))
  bytelm.plot(rows, str(tmp_path / "p.png"))
  assert (tmp_path / "p.png").exists()


@pytest.mark.slow
def test_run_bytelm_tiny_gpfq_msq(tmp_path):
  _run_tiny(tmp_path, ("gpfq", "msq"))


def _tiny_task(seed=0):
  """A Task on an untrained tiny byte LM (the layouts do not need training)."""
  from qjax.experiments import bytelm, ptq  # pylint: disable=g-import-not-at-top
  model = ByteLM(**TINY)
  x = jax.random.randint(jax.random.key(seed), (4, 16), 0, 256, jnp.int32)
  params = model.init(jax.random.key(seed + 1), x)["params"]
  return ptq.Task("bytelm", params, lambda p, b: model.apply({"params": p}, b), x,
                           bytelm.default_config())


def _old_matrix_shape(name, w):
  """The reshape the experiment used before the driver's views: attention q/k/v kernels
  (in, heads, head_dim) as (in, heads * head_dim), every other kernel as (rest, out)."""
  if np.ndim(w) == 3 and name.split("/")[-1] in ("query", "key", "value"):
    return w.shape[0], int(np.prod(w.shape[1:]))
  return int(np.prod(w.shape[:-1])), w.shape[-1]


def _kernels(params):
  from qjax import rules  # pylint: disable=g-import-not-at-top
  return {rules.path_name(p): w for p, w in jax.tree_util.tree_leaves_with_path(params)
          if rules.key_name(p[-1]) == "kernel"}


def test_driver_views_of_the_byte_lm_are_plain_reshapes():
  """Every kernel's driver matrix is a reshape of the leaf (the old rule), so RTN on the views
  rounds exactly the matrices the experiment's RTN rounded before: its rows do not change."""
  from qjax import views  # pylint: disable=g-import-not-at-top
  from qjax.experiments import ptq  # pylint: disable=g-import-not-at-top
  task = _tiny_task()
  v = ptq.kernel_views(task)
  kernels = _kernels(task.params)
  assert set(kernels) <= set(v) and "block0/attn/query" in kernels
  for name, w in kernels.items():
    assert v[name] == views.of_index(np.arange(w.size).reshape(_old_matrix_shape(name, w)))
  emb = task.params["embed"]["embedding"]  # the tied output projection: E^T
  np.testing.assert_array_equal(views.matrix(emb, v["embed/embedding"]), emb.T)
  assert ptq.kernel_views(task) is v  # traced once per task


@pytest.mark.parametrize("grid", ["channel", "g4"])
def test_grid_rtn_against_numpy(grid):
  from qjax.experiments import ptq  # pylint: disable=g-import-not-at-top
  task = _tiny_task(1)
  spec = ptq.grid_spec(grid, 3)
  q = ptq.quantize(task, "rtn-grid", spec)[0]
  if grid == "channel":  # the 'rtn-channel' method is the same rounding
    jax.tree.map(np.testing.assert_array_equal,
                 ptq.quantize(task, "rtn-channel", spec)[0], q)
  g = spec.group_size or 10**9

  def ref(m):  # symmetric 3-bit grid per (group of g rows, column): codes -4..3
    out = np.empty_like(m)
    for r in range(0, m.shape[0], g):
      blk = m[r:r + g]
      s = np.abs(blk).max(0) / 3
      out[r:r + g] = np.clip(np.round(blk / s), -4, 3) * s
    return out

  q_kernels = _kernels(q)
  for name, w in _kernels(task.params).items():
    w = np.asarray(w)
    shape = _old_matrix_shape(name, w)
    np.testing.assert_allclose(np.reshape(q_kernels[name], shape), ref(w.reshape(shape)),
                               rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(q["embed"]["embedding"], task.params["embed"]["embedding"])
  np.testing.assert_array_equal(q["block0"]["mlp_in"]["bias"],
                                task.params["block0"]["mlp_in"]["bias"])


def test_grid_spec_names():
  from qjax.experiments import bytelm, ptq  # pylint: disable=g-import-not-at-top
  s = ptq.grid_spec("g64", 3)
  assert (s.bits, s.granularity, s.group_size, s.symmetric) == (3, "group", 64, True)
  s = ptq.grid_spec("channel", 4)
  assert (s.bits, s.granularity, s.group_size, s.symmetric) == (4, "channel", None, True)
  for bad in ("g0", "group", "g-1"):
    with pytest.raises(ValueError, match="unknown grid"):
      ptq.grid_spec(bad, 4)
  config = bytelm.default_config()
  config.grids = ("channel", "g")
  with pytest.raises(ValueError, match="config.grids: unknown grid 'g'"):
    bytelm.validate(config)


@pytest.mark.slow
def test_grid_methods_round_onto_the_same_levels(tmp_path):
  """rtn-grid, gptq, gpfq-grid and the act-order family (gptq-act, gpfq-act, qronos): all on
  identical grids per setting."""
  import qjax  # pylint: disable=g-import-not-at-top
  from qjax import text  # pylint: disable=g-import-not-at-top
  from qjax.experiments import bytelm, ptq  # pylint: disable=g-import-not-at-top
  cfg = text.bytelm_config()
  cfg.update(dict(TINY, seq_len=16, batch_size=8, steps=10, warmup_steps=2))
  lm = text.train_bytelm(cfg, str(tmp_path))
  params = jax.tree_util.tree_map(jnp.asarray, lm.params)
  calib, _ = text.random_windows(text.load_corpus().bytes("calibration"), 16, 8,
                                 np.random.default_rng(0))
  task = ptq.Task("bytelm", params, lm.apply_fn, calib, bytelm.default_config())
  for name in ("channel", "g16"):
    spec = ptq.grid_spec(name, 3)
    rtn = ptq.quantize(task, "rtn-grid", spec)[0]
    _, gptq_grids = qjax.gptq(params, lm.apply_fn, calib, bits=3, granularity=spec.granularity,
                              group_size=spec.group_size, symmetric=True, static_groups=True,
                              skip="embed", progress=False, return_grids=True)[1:]
    _, gpfq_grids = qjax.gpfq(params, lm.apply_fn, calib, grid=spec, skip="embed",
                              progress=False, return_grids=True)[1:]
    assert set(gptq_grids) == set(gpfq_grids) and "embed/embedding" not in gptq_grids
    for layer, g in gptq_grids.items():
      np.testing.assert_array_equal(np.asarray(g.scale), np.asarray(gpfq_grids[layer].scale))
    for method in ("gptq", "gpfq-grid", "gptq-act", "gpfq-act", "qronos"):
      q, _ = ptq.quantize(task, method, spec)
      np.testing.assert_array_equal(q["embed"]["embedding"], params["embed"]["embedding"])
      for layer, g in gptq_grids.items():
        node_w, node_q = params, q
        for part in layer.split("/"):
          node_w, node_q = node_w[part], node_q[part]
        w, qk = node_w["kernel"], node_q["kernel"]
        view = ptq.kernel_views(task)[layer]
        shape = view.shape
        # RTN (quantize_rtn on the driver's matrix) fits the same grid as GPTQ and GPFQ ...
        rtn_grid = qjax.grids.fit(qjax.views.matrix(w, view), spec)
        np.testing.assert_allclose(np.asarray(rtn_grid.scale), np.asarray(g.scale), rtol=1e-6)
        # ... and every weight of Q is one of its 2^b levels: scale * (code - 2^(b-1))
        scale = np.repeat(np.asarray(g.scale), spec.group_size or shape[0], axis=0)[:shape[0]]
        codes = np.asarray(qjax.views.matrix(qk, view)) / scale + 4
        np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
        assert codes.min() > -1e-3 and codes.max() < 7 + 1e-3
        node_r = rtn
        for part in layer.split("/"):
          node_r = node_r[part]
        np.testing.assert_allclose(qjax.views.matrix(node_r["kernel"], view),
                                   rtn_grid.round(qjax.views.matrix(w, view)), atol=1e-6)


def test_bytelm_config_validation():
  from qjax.experiments import bytelm  # pylint: disable=g-import-not-at-top
  config = bytelm.default_config()
  config.methods = ("rtn", "gptq-typo")
  with pytest.raises(ValueError, match="unknown method 'gptq-typo'"):
    bytelm.validate(config)
  config = bytelm.default_config()
  config.bytelm.unknown = 1
  with pytest.raises(ValueError, match=r"config.bytelm: unknown keys \['unknown'\]"):
    bytelm.validate(config)
