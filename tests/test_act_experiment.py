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
  names = []
  for m in ("rtn", "gptq", "gpfq"):
    for a in ("a32", "a6-token", "a6-tensor"):
      names.append(f"{m}-pc/{a}")
      if m != "rtn" and a != "a32":
        names.append(f"{m}-pc/{a}/fit-a32")
  assert [r["method"] for r in rows] == names
  for r in rows:
    # Every row rounds the weights to 4 bits: the logits move, by less than their own norm.
    assert r["bits"] == 4 and 0 <= r["accuracy"] <= 100 and 0 < r["logit_err"] < 1, r
  by = {r["method"]: r for r in rows}
  assert by["rtn-pc/a6-token"]["logit_err"] > by["rtn-pc/a32"]["logit_err"]
  # Weight-only RTN on the driver is qjax.quantize_rtn on the driver's views (data-free).
  views = qjax.views.kernel_views(variables, model.apply, x)
  r_vars, _ = qjax.quantize_rtn(variables, qjax.grids.GridSpec(4, "channel", symmetric=True),
                                views=views)
  assert rows[0]["accuracy"] == round(evaluate(r_vars), 2)


def test_qronos_act_rows():
  model = models.MLP(features=(32,), num_classes=4)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(200, 4, 4, 1)).astype(np.float32)
  y = np.argmax(x.reshape(200, -1)[:, :4], axis=1).astype(np.int32)
  variables = model.init(jax.random.key(0), x[:1])
  evaluate = lambda v, split="test": train.evaluate(model.apply, v, x, y)  # noqa: E731
  config = ml_collections.ConfigDict({"act": {"weight_bits": (4,), "act_bits": (4,),
                                              "methods": ("qronos",)},
                                      "gpfq": {"calibration_size": 100}})
  ctx = types.SimpleNamespace(model=model, variables=variables, data={"train": (x, y),
                                                                      "test": (x, y)},
                              evaluate=evaluate, float_accuracy=evaluate(variables),
                              config=config, key=jax.random.key(1))
  by = {r["method"]: r for r in act_experiment.rows(ctx)}
  assert list(by) == ["qronos-pc/a32", "qronos-pc/a4-token", "qronos-pc/a4-token/fit-a32",
                      "qronos-pc/a4-tensor", "qronos-pc/a4-tensor/fit-a32"]
  # 4-bit activations cost something over weight-only 4-bit Qronos, on every scheme.
  for name in ("qronos-pc/a4-token", "qronos-pc/a4-tensor"):
    assert by["qronos-pc/a32"]["logit_err"] < by[name]["logit_err"] < 1, name


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


def test_transformer_grid_methods_with_acts():
  from qjax.experiments import ptq  # pylint: disable=g-import-not-at-top
  k1, k2 = jax.random.split(jax.random.key(0))
  # 'kernel' leaves: what quantize_rtn rounds by default (the driver's RTN rounds every weight op)
  params = {"l1": {"kernel": jax.random.normal(k1, (8, 16))},
            "l2": {"kernel": jax.random.normal(k2, (16, 4))}}
  apply_fn = lambda p, x: jax.nn.relu(x @ p["l1"]["kernel"]) @ p["l2"]["kernel"]  # noqa: E731
  x = jax.random.normal(jax.random.key(1), (64, 8))
  grid_methods = ("rtn-grid", "gptq", "gptq-act", "gpfq-act", "qronos")
  config = ml_collections.ConfigDict(dict(methods=grid_methods + ("rtn-channel",),
                                          grids=("channel",), bits=(4,),
                                          acts=("a8-token", "a4-tensor")))
  task = ptq.Task("mlp", params, apply_fn, x, config)
  ref = apply_fn(params, x)

  def evaluate(q, apply=apply_fn):
    return {"err": float(np.linalg.norm(apply(q, x) - ref) / np.linalg.norm(ref))}

  runs = ptq.quantized_rows(task, evaluate)
  for method in grid_methods:
    rows = runs[method]
    assert [r.get("act", "") for r in rows] == ["", "a8-token", "a4-tensor"]
    assert rows[2]["err"] > rows[0]["err"] > 0  # 4-bit static activations cost accuracy
    assert all("_apply" not in r and "_act_scales" not in r for r in rows)
  # rtn-channel (fixed grid, like rtn per bit width) stays weight-only: the same Q as rtn-grid.
  assert [r.get("act", "") for r in runs["rtn-channel"]] == [""]
  assert runs["rtn-channel"][0]["err"] == runs["rtn-grid"][0]["err"]
  # RTN's weights do not depend on the activations: its a8 row is the same Q behind A8.
  q = qjax.quantize_rtn(params, ptq.grid_spec("channel", 4),
                        views=qjax.views.kernel_views(params, apply_fn, x))[0]
  a8 = qjax.with_activation_quant(apply_fn, qjax.ActSpec(8, "token"))
  np.testing.assert_allclose(runs["rtn-grid"][1]["err"], evaluate(q, a8)["err"], rtol=1e-5)
  assert ptq.act_spec("a8-tensor") == qjax.ActSpec(8, "tensor", dynamic=False)
  with pytest.raises(ValueError, match="unknown activation scheme"):
    ptq.act_spec("w8")
  with pytest.raises(ValueError, match="bits must be in 4..8"):
    ptq.act_spec("a2-token")
