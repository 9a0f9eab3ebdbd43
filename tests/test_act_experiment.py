"""The W8A8 / W4A8 rows of the main job (qjax.experiments.act) on a small context."""
import os
import types

import jax
import ml_collections
import numpy as np
import pytest

import qjax
from qjax import main, models, train
from qjax.experiments import act as act_experiment
from qjax.experiments import classify

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_act_rows_on_a_mock_context():
  model = models.MLP(features=(32,), num_classes=4)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 4, 4, 1)).astype(np.float32)
  y = np.argmax(x.reshape(200, -1)[:, :4], axis=1).astype(np.int32)
  variables = model.init(jax.random.key(0), x[:1])
  evaluate = lambda v, split="test": train.evaluate(model.apply, v, x, y)  # noqa: E731
  config = ml_collections.ConfigDict({"act": {"weight_bits": (4,), "act_bits": (6,)},
                                      "gpfq": {"calibration_size": 100}})
  ctx = types.SimpleNamespace(model=model, variables=variables, data={"train": (x, y),
                                                                      "test": (x, y)},
                              evaluate=evaluate, float_accuracy=evaluate(variables),
                              config=config, key=jax.random.key(1))
  rows = act_experiment.rows(ctx)
  assert [r["method"] for r in rows] == [f"{m}-pc/{a}" for m in ("rtn", "gptq", "gpfq")
                                         for a in ("a32", "a6-token", "a6-tensor")]
  for r in rows:
    assert r["bits"] == 4 and 0 <= r["accuracy"] <= 100 and r["logit_err"] >= 0
  by = {r["method"]: r for r in rows}
  assert by["rtn-pc/a6-token"]["logit_err"] > by["rtn-pc/a32"]["logit_err"]
  # Weight-only RTN on the driver is qjax.quantize_rtn on the driver's views (data-free).
  views = qjax.views.kernel_views(variables, model.apply, x)
  r_vars, _ = qjax.quantize_rtn(variables, qjax.grids.GridSpec(4, "channel", symmetric=True),
                                views=views)
  assert rows[0]["accuracy"] == round(evaluate(r_vars), 2)


def test_act_config_is_validated():
  config = main.load_config(os.path.join(ROOT, "configs", "mnist_lenet5_act.py"))
  assert config.methods == ("act",)
  classify.validate(config)
  cfg = act_experiment.default_config()
  cfg.act_bits = (8, 3)
  with pytest.raises(ValueError, match=r"config.act.act_bits must be in 4..8"):
    act_experiment.validate(cfg)
  cfg = act_experiment.default_config()
  cfg.update(static_method="percentile", percentile=0.0)
  with pytest.raises(ValueError, match=r"percentile must be in \(0, 100\]"):
    act_experiment.validate(cfg)
