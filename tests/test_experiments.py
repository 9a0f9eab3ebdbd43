"""The experiments of the main job (GPFQ, PSGD, ALQ rows) on small contexts, and their config files."""
import os
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from qjax import data as data_lib
from qjax import main, models, train
from qjax.experiments import alq as experiment
from qjax.experiments import classify
from qjax.experiments import gpfq as gpfq_experiment
from qjax.experiments import psgd as psgd_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_alq_rows_on_a_mock_context():
  model = models.MLP(features=(32,), num_classes=4)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(160, 4, 4, 1)).astype(np.float32)
  y = np.argmax(x.reshape(160, -1)[:, :4], axis=1).astype(np.int32)
  variables = model.init(jax.random.key(0), x[:1])
  config = ml_collections.ConfigDict()
  config.alq = experiment.default_config()
  config.alq.update(structures=(("Dense_0", "subchannel-wise(2)"), ("Dense_1", "channel-wise")),
                    max_bits=3, batch_size=32, init_epochs=0, rounds=2, basis_epochs=1,
                    coordinate_epochs=0, final_epochs=1, top_k=0.2)
  evaluate = lambda v, split="test": train.evaluate(model.apply, v, x, y)
  ctx = types.SimpleNamespace(model=model, variables=variables, data={"train": (x, y)},
                              evaluate=evaluate, float_accuracy=evaluate(variables), config=config,
                              key=jax.random.key(1))
  rows = experiment.rows(ctx)
  assert [r["round"] for r in rows] == [0, 1, 2, "final"]
  assert all(r["method"] == "alq" for r in rows)
  bits = [r["bits"] for r in rows]
  assert bits[0] > bits[1] > bits[2] == bits[3]
  for r in rows:
    assert set(r) >= {"bits", "accuracy", "drop", "storage_bytes", "compression", "seconds"}
    assert 0 <= r["accuracy"] <= 100
    np.testing.assert_allclose(r["drop"], ctx.float_accuracy - r["accuracy"], atol=0.011)


def test_alq_config_file():
  config = main.load_config(os.path.join(ROOT, "configs", "mnist_lenet5_alq.py"))
  main.validate_config(config)
  assert config.methods == ("alq",) and config.model == "lenet5"
  assert dict(config.alq.structures) == {"^Conv_0$": "kernel-wise", "^Conv_1$": "kernel-wise",
                                         "^Dense_0$": "subchannel-wise(2)",
                                         "^Dense_1$": "channel-wise"}
  assert set(experiment.default_config()) == set(config.alq)


@pytest.mark.slow
def test_lenet5_below_one_bit_within_one_and_a_half_points(tmp_path):
  """The issue's bar, end to end through the main job (~4 CPU minutes)."""
  config = main.load_config(os.path.join(ROOT, "configs", "mnist_lenet5_alq.py"))
  config.bits = (8,)
  rows = main.run(config, str(tmp_path))
  final = [r for r in rows if r["method"] == "alq"][-1]
  assert final["round"] == "final"
  assert final["bits"] <= 1.0 and final["drop"] <= 1.5


def test_psgd_rows_smoke():
  """One short PSGD epoch per run through the runner's Context (tiny MLP stands in for LeNet5)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(128, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, 10, size=128).astype(np.int32)
  model = models.MLP(features=(32,))
  variables = {"params": model.init(jax.random.key(0), x[:1])["params"]}
  config = ml_collections.ConfigDict({"seed": 0, "batch_size": 32, "augment_shift": 0,
                                      "psgd": psgd_experiment.default_config()})
  config.psgd.update(bits=(2,), prune_sparsities=(0.5,), prune_scopes=("layer",))
  for recipe in ("bits2", "prune"):
    config.psgd.recipes[recipe].epochs = 1
  ctx = classify.Context(config=config, model=model, variables=variables,
                         data={"train": (x, y), "test": (x, y)}, float_accuracy=10.0,
                         key=jax.random.key(1), workdir="")
  trained = {}
  out = psgd_experiment.rows(ctx, trained)
  assert [(r["method"], r["bits"]) for r in out] == [
      ("sgd+rtn", 2), ("psgd+rtn", 2), ("psgd+gpfq", 2), ("sgd+prune", 32), ("psgd+prune", 32)]
  assert set(trained) == {2, None}
  for r in out:
    assert {"accuracy", "drop", "seconds"} <= set(r)
  assert out[-1]["sparsity"] == pytest.approx(0.5, abs=0.01)
  with pytest.raises(ValueError, match="recipes.bits5"):
    psgd_experiment.train_psgd(ctx, 5)


def test_psgd_edge_layers_keep_edge_bits_below_4_bits():
  params = {"Conv_0": {"kernel": jnp.ones(3)}, "Dense_0": {"kernel": jnp.ones(3)},
            "Dense_1": {"kernel": jnp.ones(3)}}
  assert psgd_experiment.layer_bits(params, 2, 8) == {"^Conv_0$": 8, "^Dense_1$": 8,
                                                      "default": 2}
  assert psgd_experiment.layer_bits(params, 4, 8) == {"default": 4}


def test_psgd_config_file_is_valid():
  config = main.load_config(os.path.join(ROOT, "configs", "mnist_lenet5_psgd.py"))
  main.validate_config(config)
  assert config.methods == ("psgd",)
  for bits in config.psgd.bits:
    assert f"bits{bits}" in config.psgd.recipes


@pytest.mark.slow
def test_gpfq_rows_on_briefly_trained_lenet():
  import optax  # pylint: disable=g-import-not-at-top
  splits = data_lib.load_mnist_embedded()
  model = models.LeNet5()
  state = train.create_train_state(model, jax.random.key(0), splits["train"][0],
                                   optax.adam(1e-3))
  state, _ = train.fit(state, *splits["train"], epochs=2, progress=False)
  variables = train.state_variables(state)
  evaluate = lambda v, split="test": train.evaluate(model.apply, v, *splits[split])
  config = ml_collections.ConfigDict({"gpfq": {"bits": (4, 1), "calibration_size": 1000}})
  ctx = types.SimpleNamespace(model=model, variables=variables, data=splits, evaluate=evaluate,
                              float_accuracy=evaluate(variables), config=config,
                              key=jax.random.key(0))
  rows = gpfq_experiment.rows(ctx)
  by = {(r["method"], r["bits"]): r for r in rows}
  assert by[("gpfq", 4)]["drop"] < 1.0
  assert by[("gpfq", 1)]["accuracy"] >= by[("msq-gpfq-alphabet", 1)]["accuracy"] - 1.0
  assert set(by[("gpfq", 4)]["layers"]) == {"Conv_0", "Conv_1", "Dense_0", "Dense_1"}


def test_gpfq_grid_bits_config():
  """config.gpfq.grid_bits: the per-channel grid rows of the main job, validated eagerly."""
  cfg = gpfq_experiment.default_config()
  assert tuple(cfg.grid_bits) == (4, 3, 2)
  gpfq_experiment.validate(cfg)
  cfg.grid_bits = ()
  gpfq_experiment.validate(cfg)  # () disables the rows
  cfg.grid_bits = (9,)
  with pytest.raises(ValueError, match=r"config.gpfq.grid_bits must be in 1..8"):
    gpfq_experiment.validate(cfg)
  with pytest.raises(TypeError, match=r"config.gpfq.grid_bits must be a sequence"):
    gpfq_experiment.validate(ml_collections.ConfigDict({**cfg.to_dict(), "grid_bits": 4}))


def test_gpfq_act_order_rows_config():
  """config.gpfq.act_order_rows / damp_grid: gptq-act-pc, gpfq-act-pc and qronos-pc rows."""
  cfg = gpfq_experiment.default_config()
  assert cfg.act_order_rows and tuple(cfg.damp_grid) == (0.01, 0.1, 0.3)
  for bad in ((), (0.1, 0.0), (float("nan"),)):
    cfg.damp_grid = bad
    with pytest.raises(ValueError, match=r"config.gpfq.damp_grid must be a non-empty"):
      gpfq_experiment.validate(cfg)
  cfg.act_order_rows = False
  gpfq_experiment.validate(cfg)  # no Qronos rows: damp_grid unused
