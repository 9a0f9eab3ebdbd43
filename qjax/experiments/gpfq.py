"""GPFQ rows of the main job: per bit width, GPFQ vs MSQ on the same alphabet (Zhang et al., Sec. 3).

`rows(ctx)` quantizes the trained float model with `qjax.gpfq` on a calibration set
drawn from the training split and evaluates it; for the same bits and the same alphabets (same
rule, same C) it also evaluates plain rounding (`quantize_msq`), so the table shows what the
greedy path-following adds over memoryless rounding. Options live in `config.gpfq`
(`default_config()`).

With `config.gpfq.grid_bits` (e.g. (4, 3, 2)) it adds, per bit width, three rows on one
per-channel symmetric grid (`qjax.grids.GridSpec(bits, "channel")`, fitted on each layer's
weights, so all three round onto identical levels) and the same calibration draw and patches:
`rtn-pc` (`qjax.quantize_rtn`, no data), `gptq-pc` (`qjax.gptq`, Frantar et al., ICLR 2023) and
`gpfq-pc` (`qjax.gpfq(..., grid=...)`). These rows run after the alphabet rows, which stay as
they were.
"""
from __future__ import annotations

import inspect
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import qjax
from qjax import alphabets
from qjax import calibration as calibration_lib
from qjax import rules
from qjax.experiments import config_section, methods, results

# The per-channel grid rows ('<label>-pc'), then the act-order family (`act_order_rows`).
GRID_METHODS = ("rtn-grid", "gptq", "gpfq-grid")
ACT_ORDER_METHODS = ("gptq-act", "gpfq-act", "qronos")


def default_config() -> ml_collections.ConfigDict:
  """Defaults of `config.gpfq` (tuned on LeNet5 / embedded MNIST)."""
  c = ml_collections.ConfigDict()
  c.bits = (5, 4, 3, 2, 1)        # 1 = ternary augmented midrise {-R, 0, R}
  c.calibration_size = 1500       # training digits fed through both networks (m for Dense)
  c.rule = "paper"                # 'paper' (Eq. 17-19) or 'reference' (authors' code)
  c.C = 1.0                       # used when C_grid is empty
  c.C_grid = (0.8, 1.0)           # per bit width, on a held-out tail of the calibration set
  c.holdout_fraction = 0.2
  c.holdout_loss = "cross_entropy"  # or 'output' (relative error of the logits, no labels)
  c.patch_p = 0.25                # Sec. 3.1
  c.patch_stride = "kernel"       # disjoint patches (Sec. 2.3); or 'layer'
  c.last_layer_float = False
  c.bias_correction = False
  c.method = "auto"               # passed to gpfq_layer
  c.seed = 0                      # calibration draw and patch sampling
  c.msq = True                    # also run MSQ on the same alphabet
  c.grid_bits = (4, 3, 2)         # per-channel symmetric grid rows (rtn/gptq/gpfq-pc); () = none
  c.act_order_rows = True         # and gptq-act-pc, gpfq-act-pc, qronos-pc on the same grids
  c.damp_grid = (0.01, 0.1, 0.3)  # Qronos' damp, chosen on the held-out tail (output error)
  return c


def validate(cfg: ml_collections.ConfigDict, where: str = "config.gpfq") -> None:
  """Eager checks of `config.gpfq`, before any training."""
  if isinstance(cfg.bits, (str, bytes)) or not hasattr(cfg.bits, "__iter__"):
    raise TypeError(f"{where}.bits must be a sequence of ints, got {cfg.bits!r}")
  for b in cfg.bits:
    rules.check_bits(b, f"{where}.bits")
  if isinstance(cfg.grid_bits, (str, bytes)) or not hasattr(cfg.grid_bits, "__iter__"):
    raise TypeError(f"{where}.grid_bits must be a sequence of ints, got {cfg.grid_bits!r}")
  for b in cfg.grid_bits:
    rules.check_bits(b, f"{where}.grid_bits", low=1, high=8)
  damps = tuple(cfg.damp_grid) if hasattr(cfg.damp_grid, "__iter__") else (cfg.damp_grid,)
  if cfg.act_order_rows and (not damps or not all(
      isinstance(d, (int, float)) and 0 < d < float("inf") for d in damps)):
    raise ValueError(f"{where}.damp_grid must be a non-empty sequence of finite values > 0, "
                     f"got {cfg.damp_grid!r}")
  if cfg.rule not in alphabets.DEFAULT_C:
    raise ValueError(f"{where}.rule must be one of {sorted(alphabets.DEFAULT_C)}, got {cfg.rule!r}")
  if cfg.holdout_loss not in ("cross_entropy", "output"):
    raise ValueError(f"{where}.holdout_loss must be 'cross_entropy' or 'output', got "
                     f"{cfg.holdout_loss!r}")
  if not 0 < cfg.patch_p <= 1:
    raise ValueError(f"{where}.patch_p must be in (0, 1], got {cfg.patch_p}")
  if int(cfg.calibration_size) < 1:
    raise ValueError(f"{where}.calibration_size must be >= 1, got {cfg.calibration_size}")


def _apply_kwargs(model) -> dict[str, Any]:
  """train=False for models whose __call__ takes `train` (BatchNorm in inference mode)."""
  params = inspect.signature(type(model).__call__).parameters
  return {"train": False} if "train" in params else {}


def calibration(ctx, cfg) -> tuple[np.ndarray, np.ndarray]:
  """A shuffled draw of the training split (it may be sorted by label)."""
  x, y = ctx.data["train"]
  n = min(int(cfg.calibration_size), x.shape[0])
  idx = np.random.default_rng(int(cfg.seed)).permutation(x.shape[0])[:n]
  return x[idx], y[idx]


def _holdout_loss(cfg, y: np.ndarray):
  """Loss of the C search on the held-out tail of the calibration set (labels known here)."""
  if cfg.holdout_loss == "output":
    return None  # qjax.calibration.output_error
  n_hold = calibration_lib.holdout_size(y.shape[0], cfg.holdout_fraction)
  labels = jnp.asarray(y[y.shape[0] - n_hold:])
  return lambda q_out, _: optax.softmax_cross_entropy_with_integer_labels(q_out, labels).mean()


def _row(method: str, bits: int, acc: float, ctx, seconds: float, report) -> dict:
  extra = {} if report.C is None else {"C": report.C}  # grid rows have no C
  return results.accuracy_row(method, bits, acc, ctx.float_accuracy, seconds, **extra,
                  layers={r.path: (None if r.error is None else round(r.error, 4))
                          for r in report.layers})


def quantize(ctx, variables: dict, bits: int | dict[str, int], **overrides) -> tuple[dict, Any, float]:
  """`qjax.gpfq` of `variables` on the calibration draw, with `config.gpfq` options.

  Args:
    ctx: the main job's context.
    variables: the model variables to quantize (e.g. a PSGD-trained model's).
    bits: bits for every layer, or {module-path regex: bits, 'default': bits}.
    **overrides: `config.gpfq` keys replaced for this call (e.g. rule='uniform', C_grid=()).

  Returns:
    (quantized variables, report, seconds).
  """
  cfg = config_section(ctx.config, "gpfq", default_config())
  cfg.update(overrides)
  x, y = calibration(ctx, cfg)
  start = time.perf_counter()
  res = methods.run("gpfq", variables, ctx.model.apply, x, bits, driver=common_options(ctx, cfg),
                    C=cfg.C, rule=cfg.rule, method=cfg.method, C_grid=tuple(cfg.C_grid) or None,
                    holdout_fraction=cfg.holdout_fraction, holdout_loss=_holdout_loss(cfg, y))
  return res.params, res.report, time.perf_counter() - start


def common_options(ctx, cfg) -> dict[str, Any]:
  """Options shared by the GPFQ and MSQ calls."""
  return dict(last_layer_float=cfg.last_layer_float, bias_correction=cfg.bias_correction,
              patch_p=cfg.patch_p, patch_stride=cfg.patch_stride,
              key=jax.random.key(int(cfg.seed)), apply_kwargs=_apply_kwargs(ctx.model),
              progress=False)


def grid_rows(ctx, cfg, x: np.ndarray) -> list[dict]:
  """rtn-pc, gptq-pc and gpfq-pc rows per `cfg.grid_bits` (and, with `cfg.act_order_rows`,
  gptq-act-pc, gpfq-act-pc and qronos-pc: act-order, Qronos' damp chosen on the calibration
  draw's held-out tail, then refitted on all of it): one per-channel symmetric grid per layer and
  bit width, the calibration draw `x` and the same patch samples for every data method.
  """
  out = []
  common = common_options(ctx, cfg)
  names = GRID_METHODS + (ACT_ORDER_METHODS if cfg.act_order_rows else ())
  for bits in cfg.grid_bits:
    spec = qjax.grids.GridSpec(int(bits), "channel", symmetric=True)
    for name in names:
      start = time.perf_counter()
      res = methods.run(name, ctx.variables, ctx.model.apply, x, spec, driver=common,
                        method=cfg.method, damp_grid=tuple(cfg.damp_grid),
                        damp_holdout_fraction=cfg.holdout_fraction)
      label = f"{methods.METHODS[name].label}-pc"
      acc = ctx.evaluate(res.params)
      if res.report is None:  # RTN: no data, no layer errors
        row = results.accuracy_row(label, int(bits), acc, ctx.float_accuracy,
                                   time.perf_counter() - start)
      else:
        row = _row(label, int(bits), acc, ctx, time.perf_counter() - start, res.report)
      out.append(dict(row, **res.columns))
  return out


def rows(ctx) -> list[dict]:
  """GPFQ and MSQ-on-the-GPFQ-alphabet rows, one pair per `config.gpfq.bits`, then the
  per-channel grid rows (`grid_rows`) per `config.gpfq.grid_bits`.

  Args:
    ctx: the main job's context (model, float variables, data splits, evaluate, float_accuracy,
      config with an optional `gpfq` ConfigDict).

  Returns:
    dicts with method ('gpfq' / 'msq-gpfq-alphabet' / 'rtn-pc' / 'gptq-pc' / 'gpfq-pc'), bits,
    accuracy, drop (points below float), seconds, C, layers ({module path: ||XW - X~Q|| /
    ||XW||}; not for rtn-pc).
  """
  cfg = config_section(ctx.config, "gpfq", default_config())
  x, _ = calibration(ctx, cfg)
  # MSQ's report uses the rows GPFQ was fitted on (and its compiled data functions).
  x_calib = x if not tuple(cfg.C_grid) else x[:x.shape[0] - calibration_lib.holdout_size(
      x.shape[0], cfg.holdout_fraction)]
  out = []
  for bits in cfg.bits:
    q_vars, report, seconds = quantize(ctx, ctx.variables, int(bits))
    out.append(_row("gpfq", int(bits), ctx.evaluate(q_vars), ctx, seconds, report))
    if cfg.msq:
      # Same alphabet: same rule and the C GPFQ chose; plain rounding of every weight.
      start = time.perf_counter()
      res = methods.run("msq", ctx.variables, ctx.model.apply, x_calib, int(bits),
                        driver=common_options(ctx, cfg), C=report.C, rule=cfg.rule)
      out.append(_row("msq-gpfq-alphabet", int(bits), ctx.evaluate(res.params), ctx,
                      time.perf_counter() - start, res.report))
  return out + grid_rows(ctx, cfg, x)
