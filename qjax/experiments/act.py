"""Activation-quantization rows of the main job: W8A8 and W4A8 beside weight-only W8 / W4.

For every weight bit width in `config.act.weight_bits` and every method of `config.act.methods`
(RTN, GPTQ, GPFQ; Qronos too in configs/mnist_lenet5_act.py) on one per-channel symmetric grid
per layer, `qjax.grids.GridSpec(bits, "channel")`, the same
calibration draw and patches as the `gpfq` rows), three rows:

* `<method>/a32`: weights only (float activations);
* `<method>/a8-token`: every weight op's input quantized per token (per row of the layer's input
  matrix: per image pixel for a conv, per example for a Dense), dynamic range, symmetric;
* `<method>/a8-tensor`: one static per-tensor scale per layer, calibrated (min-max, or
  `config.act.static_method`) on the quantized network's inputs in the same pass as the weights;
* the same two at 4-bit activations (`config.act.act_bits`).

With `config.act.refit_rows`, GPTQ and GPFQ also get `<method>/<scheme>/fit-a32` rows: the
weight-only fit deployed behind the same activation quantizers (static scales calibrated on its
network by `qjax.calibrate_activations`), against which the `act=` fit is compared.

Besides the accuracy each row has `logit_err`, ||f~(x) - f(x)|| / ||f(x)|| of the test logits
against the float model (1,000 test digits resolve accuracy only to 0.1 points).

With activations quantized, every method runs `act=`: GPTQ's H and GPFQ's X~ are the
fake-quantized inputs of the partly quantized network, and RTN's weights are rounded without
data while its static scales come from the same pass. Accuracy is of the network behind the same
activation quantizers (`qjax.with_activation_quant`). Options live in `config.act`.
"""
from __future__ import annotations

import time
from typing import Any

import ml_collections
import numpy as np

import qjax
from qjax import rules
from qjax import train as train_lib
from qjax.experiments import config_section, methods, results
from qjax.experiments import gpfq as gpfq_experiment

# The registry's methods these rows run, on the grid ('rtn', 'gpfq': their grid forms).
SUPPORTED = ("rtn", "gptq", "gpfq", "qronos")


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.weight_bits = (8, 4)           # per-channel symmetric weight grids
  c.act_bits = (8, 4)              # activation bits of the quantized-activation rows
  c.methods = ("rtn", "gptq", "gpfq")  # 'qronos' too in configs/mnist_lenet5_act.py
  c.static_method = "max"          # 'max', 'percentile' or 'mse' for the per-tensor rows
  c.percentile = 99.99
  c.refit_rows = True              # also GPTQ / GPFQ fitted weight-only, deployed with the acts
  return c


def validate(cfg: ml_collections.ConfigDict, where: str = "config.act") -> None:
  for b in cfg.weight_bits:
    rules.check_bits(b, f"{where}.weight_bits", low=2, high=8)
  if isinstance(cfg.act_bits, (str, bytes)) or not hasattr(cfg.act_bits, "__iter__"):
    raise TypeError(f"{where}.act_bits must be a sequence of ints, got {cfg.act_bits!r}")
  for b in cfg.act_bits:
    rules.check_bits(b, f"{where}.act_bits", low=4, high=8)
  for m in cfg.methods:
    if m not in SUPPORTED:
      raise ValueError(f"{where}.methods: unknown method {m!r}; choose from {list(SUPPORTED)}")
  schemes(cfg)  # ActSpec checks (static_method, percentile)


def schemes(cfg) -> dict[str, qjax.ActSpec | None]:
  """Row suffix -> activation spec (None: float activations)."""
  out = {"a32": None}
  for b in cfg.act_bits:
    b = int(b)
    out[f"a{b}-token"] = qjax.ActSpec(b, "token")
    out[f"a{b}-tensor"] = qjax.ActSpec(b, "tensor", dynamic=False, method=cfg.static_method,
                                       percentile=float(cfg.percentile))
  return out


def quantize(ctx, method: str, bits: int, act: Any, x, common: dict, cfg_gpfq) -> tuple:
  """(quantized variables, report) of one method of `SUPPORTED` at `bits` with activation spec
  `act`, on the registry's grid form of it (`methods.on_grid`: 'rtn' -> 'rtn-grid', ...). Qronos
  with act-order and its damp searched on the held-out tail, as the qronos-pc rows."""
  spec = qjax.grids.GridSpec(bits, "channel", symmetric=True)
  res = methods.run(methods.on_grid(method), ctx.variables, ctx.model.apply, x, spec,
                    driver=dict(common, act=act), method=cfg_gpfq.method,
                    damp_grid=tuple(cfg_gpfq.damp_grid),
                    damp_holdout_fraction=cfg_gpfq.holdout_fraction)
  return res.params, res.report


def rows(ctx) -> list[dict]:
  """The rows described in the module docstring (method '<method>-pc/<scheme>', bits = weight
  bits, column 'act' = the activation scheme)."""
  cfg = config_section(ctx.config, "act", default_config())
  cfg_gpfq = config_section(ctx.config, "gpfq", gpfq_experiment.default_config())
  x, _ = gpfq_experiment.calibration(ctx, cfg_gpfq)  # the same draw
  common = gpfq_experiment.common_options(ctx, cfg_gpfq)
  x_test, y_test = ctx.data["test"]
  ref = train_lib.predict(ctx.model.apply, ctx.variables, x_test)

  def row(name, bits, q_vars, apply_fn, start, suffix):
    logits = train_lib.predict(apply_fn, q_vars, x_test)
    acc = float(100.0 * np.mean(np.argmax(logits, -1) == y_test))
    # The test logits' error against the float model: finer than 1,000 digits' accuracy.
    err = float(np.linalg.norm(logits - ref) / np.linalg.norm(ref))
    return results.accuracy_row(name, int(bits), acc, ctx.float_accuracy,
                                time.perf_counter() - start, act=suffix, logit_err=round(err, 4))

  out = []
  for bits in cfg.weight_bits:
    for method in cfg.methods:
      weight_only = None
      for suffix, act in schemes(cfg).items():
        start = time.perf_counter()
        q_vars, report = quantize(ctx, method, int(bits), act, x, common, cfg_gpfq)
        if act is None:
          weight_only = q_vars
          out.append(row(f"{method}-pc/{suffix}", bits, q_vars, ctx.model.apply, start, suffix))
          continue
        apply_fn = qjax.with_activation_quant(ctx.model.apply, act, report.act_scales)
        out.append(row(f"{method}-pc/{suffix}", bits, q_vars, apply_fn, start, suffix))
        if cfg.refit_rows and method != "rtn" and weight_only is not None:
          # The weight-only fit behind the same activation quantizers (static scales from its
          # float-input network): what fitting to X~ with act= gains.
          start = time.perf_counter()
          scales = qjax.calibrate_activations(weight_only, ctx.model.apply, x, act,
                                              apply_kwargs=common["apply_kwargs"])
          apply_fn = qjax.with_activation_quant(ctx.model.apply, act, scales)
          out.append(row(f"{method}-pc/{suffix}/fit-a32", bits, weight_only, apply_fn, start,
                         suffix))
  return out
