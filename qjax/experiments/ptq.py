"""What the transformer tasks share: the task, one method at one setting, every setting's rows,
the run key and the plot (`minilm`, `bytelm`; `causal_lm` uses the task, `quantize` and `plot`).

Methods come from `qjax.experiments.methods` by name (`SUPPORTED`) and run at every
`config.bits`: the grid methods also over every `config.grids` and, with `config.acts`, once
more per activation scheme. Rows are `results.row`s with the task's metrics.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
import warnings
from typing import Any, Callable

import jax
import ml_collections

import qjax
from qjax import rules
from qjax import text
from qjax.experiments import methods
from qjax.experiments import results

PyTree = Any
# The registry's methods these tasks run (not the ImageNet dagger variant).
SUPPORTED = ("rtn", "rtn-channel", "gpfq", "msq", "rtn-grid", "gptq", "gpfq-grid", "gptq-act",
             "gpfq-act", "qronos")
ORDER = ("float", *SUPPORTED)
# rtn-channel is the same rounding as rtn-grid on the 'channel' grid, so it is not run by default.
DEFAULT_METHODS = ("rtn", "gpfq", "msq", "rtn-grid", "gptq", "gpfq-grid")
# The `grid` column of the methods without a GridSpec.
GRID_LABEL = {"tensor": "tensor", "alphabet": "paper"}


@dataclasses.dataclass
class Task:
  """What a method gets: the float params, the apply function and the calibration batch."""
  name: str                       # 'minilm', 'bytelm' or 'causal_lm'
  params: PyTree                  # bare float params
  apply_fn: Callable              # apply_fn(params, batch) -> outputs (not jitted)
  calibration: PyTree             # a pytree of arrays, examples on the leading axis
  config: ml_collections.ConfigDict
  gpfq_C: dict = dataclasses.field(default_factory=dict)  # bits -> C used by GPFQ (for MSQ)
  views: dict | None = None       # the driver's matrix views (`kernel_views`), made once


class Skip(Exception):
  """A method that cannot run on this model yet; the reason is printed, no row is made."""


def kernel_views(task: Task) -> dict:
  """The driver's matrix of every weight op (`qjax.views.kernel_views`, traced once per task):
  RTN rounds the matrices GPTQ and GPFQ quantize (an attention q/k/v kernel (in, heads,
  head_dim) as (in, heads*head_dim), its output kernel as (heads*head_dim, out))."""
  if task.views is None:
    task.views = qjax.views.kernel_views(task.params, task.apply_fn, task.calibration)
  return task.views


def check_report(report: Any, method: str) -> None:
  """Skip a method whose driver left layers float (e.g. attention on the Dense-only driver)."""
  left = [r.path for r in getattr(report, "layers", ()) if r.status == "unsupported"]
  if left:
    raise Skip(f"{method}: {len(left)} layers are not supported by this qjax.gpfq driver and "
               f"would stay float ({', '.join(left[:3])}{', ...' if len(left) > 3 else ''}); "
               "the row needs the program-level driver")


def skip_pattern(task: Task) -> str | None:
  """Layers the data-driven methods leave float, like RTN (which rounds only 'kernel' leaves):
  the byte LM's tied embedding, which the driver sees as the output projection's weight."""
  if task.name == "causal_lm":  # the LLM's embedding and (tied or own) output head
    return "embed_tokens|lm_head"
  return "embed" if task.name == "bytelm" else None


def grid_spec(name: str, bits: int, symmetric: bool = True) -> "qjax.grids.GridSpec":
  """'channel' -> per output channel; 'g<N>' -> groups of N inputs (symmetric unless told)."""
  if name == "channel":
    return qjax.grids.GridSpec(int(bits), "channel", symmetric=symmetric)
  m = re.fullmatch(r"g([1-9][0-9]*)", str(name))
  if m is None:
    raise ValueError(f"config.grids: unknown grid {name!r}; use 'channel' or 'g<group size>'")
  return qjax.grids.GridSpec(int(bits), "group", int(m.group(1)), symmetric=symmetric)


def act_spec(name: str) -> "qjax.ActSpec":
  """'a<bits>-token' -> per-token dynamic, 'a<bits>-tensor' -> per-tensor static (min-max):
  the activation schemes of `config.acts`."""
  m = re.fullmatch(r"a([0-9]+)-(token|tensor)", str(name))
  if m is None:
    raise ValueError(f"config.acts: unknown activation scheme {name!r}; use 'a<bits>-token' "
                     "(per-token dynamic) or 'a<bits>-tensor' (per-tensor static)")
  bits, kind = int(m.group(1)), m.group(2)
  return qjax.ActSpec(bits, kind, dynamic=kind == "token")


def _calibration_rows(task: Task) -> PyTree:
  """The calibration rows GPFQ fitted on (without the C search's held-out tail)."""
  cfg = task.config.gpfq
  if not tuple(cfg.C_grid):
    return task.calibration
  n = jax.tree_util.tree_leaves(task.calibration)[0].shape[0]
  keep = n - max(1, round(cfg.holdout_fraction * n))
  return jax.tree_util.tree_map(lambda x: x[:keep], task.calibration)


def _options(task: Task, name: str, bits: int) -> tuple[PyTree, dict]:
  """(calibration batch, method options) of method `name` on this task."""
  if name == "msq":  # GPFQ's alphabet: its rule and the C it used at these bits, on its rows
    cfg = task.config.gpfq
    return _calibration_rows(task), dict(C=task.gpfq_C.get(int(bits), cfg.C), rule=cfg.rule)
  options = dict(damp_grid=tuple(task.config.get("qronos_damp_grid", None)
                                 or methods.QRONOS_DAMP_GRID))
  if "gpfq" in task.config:
    cfg = task.config.gpfq
    options.update(C=cfg.C, rule=cfg.rule, C_grid=tuple(cfg.C_grid) or None,
                   holdout_fraction=cfg.holdout_fraction)
  if "views" in methods.get(name).options and task.name != "causal_lm":
    options["views"] = kernel_views(task)
  return task.calibration, options


def quantize(task: Task, name: str, levels: Any, act: str = "", **options
             ) -> tuple[PyTree, dict]:
  """Method `name` at one setting, with the activations of its layers quantized by scheme `act`
  (`config.acts`; '' = weights only): (quantized params, extra row columns). With `act`, the
  weights are fitted with `act=` and extra['_apply'] is the network behind the same activation
  quantizers; extra['_targets'] holds GPTQ's fitted grids when `return_grids=True`."""
  skip = skip_pattern(task)
  act_rules = None
  if act:
    a = act_spec(act)
    act_rules = {skip: None, "default": a} if skip else a  # float layers: float inputs
  batch, own = _options(task, name, levels if isinstance(levels, int) else levels.bits)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # unsupported layers are turned into a Skip below
    res = methods.run(name, task.params, task.apply_fn, batch, levels,
                      driver=dict(skip=skip, progress=False, act=act_rules), **own, **options)
  extra = {"act": act} if act else {}
  extra.update(res.columns)
  if res.report is not None:
    check_report(res.report, name)
    extra["layers"] = {r.path: (None if r.error is None else round(r.error, 4))
                       for r in res.report.layers}
  if name == "gpfq":
    task.gpfq_C[int(levels)] = res.report.C
  if act:
    extra["_apply"] = qjax.with_activation_quant(task.apply_fn, act_rules, res.report.act_scales)
  if res.targets is not None:
    extra["_targets"] = res.targets
  return res.params, extra


def _settings(task: Task, name: str):
  """(row label, grid label, bits, quantize()) for every setting of one method run."""
  method = methods.get(name, SUPPORTED)
  if method.levels != "grid":
    for bits in task.config.bits:
      yield method.label, GRID_LABEL[method.levels], int(bits), (
          lambda bits=int(bits): quantize(task, name, bits))
    return
  # A method on fixed grids (rtn-channel) makes weight-only rows per bit width, like rtn.
  acts = ("",) + (() if method.grids else tuple(task.config.get("acts", ())))
  for grid in method.grids or task.config.grids:
    for bits in task.config.bits:
      spec = grid_spec(grid, int(bits))
      for act in acts:
        yield method.label, grid, int(bits), (
            lambda spec=spec, act=act: quantize(task, name, spec, act))


def quantized_rows(task: Task, evaluate: Callable[..., dict]) -> dict[str, list[dict]]:
  """Every configured method at every configured grid and bit width: quantize, time, evaluate
  (`evaluate(q)`, or `evaluate(q, apply)` for activation-quantized rows); {method run: rows}."""
  out = {}
  for name in task.config.methods:
    out[name] = []
    for label, grid, bits, run in _settings(task, name):
      start = time.perf_counter()
      try:
        q, extra = run()
        q = jax.block_until_ready(q)
      except Skip as e:
        print(f"skipped {name} ({grid}) at {bits} bits: {e}")
        continue
      seconds = time.perf_counter() - start
      start = time.perf_counter()
      apply = extra.pop("_apply", None)  # activation-quantized rows: their own forward
      metrics = evaluate(q) if apply is None else evaluate(q, apply)
      row = results.row(label, bits, seconds, grid=grid, **metrics, **extra,
                        eval_seconds=round(time.perf_counter() - start, 2))
      print({k: v for k, v in row.items() if k != "layers"}, flush=True)
      out[name].append(row)
  return out


def run_key(*parts: Any) -> str:
  """A hash of the float model, weights and data recipe: rows saved under another key are not
  merged with this run's."""
  text_ = json.dumps(parts, sort_keys=True, default=str) + text.CORPUS_SHA256
  return hashlib.sha1(text_.encode()).hexdigest()[:12]


def validate(config: ml_collections.ConfigDict) -> None:
  """The checks both tasks share: methods, grids, activation schemes, bits, calibration size."""
  for m in config.methods:
    methods.get(m, SUPPORTED)
  for g in config.grids:
    grid_spec(g, 4)
  for a in config.get("acts", ()):
    act_spec(a)
  for b in config.bits:
    rules.check_bits(b, "config.bits", low=2)
  if int(config.calibration_size) < 1:
    raise ValueError(f"config.calibration_size must be >= 1, got {config.calibration_size}")


def gpfq_config() -> ml_collections.ConfigDict:
  """`config.gpfq`: the paper's per-layer alphabet (Eq. 17-19) and its constant C."""
  c = ml_collections.ConfigDict()
  c.rule = "paper"
  c.C = 1.0                       # used when C_grid is empty
  c.C_grid = ()                   # else chosen per bit width on a held-out tail of the
  c.holdout_fraction = 0.2        # calibration batch (output error), never on the test split
  return c


def plot(rows: list[dict], keys: list[str], path: str, title: str,
         hline: str | None = None) -> None:
  """`keys` vs bits, one panel per key, one line per (method, grid); the float row dashed."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  ref = next((r for r in rows if r["method"] == "float"), None)
  quantized = [r for r in rows if r["method"] != "float"]
  fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
  for ax, key in zip(axes[0], keys):
    for name in dict.fromkeys((r["method"], r.get("grid", "")) for r in quantized):
      pts = sorted((r["bits"], r[key]) for r in quantized
                   if (r["method"], r.get("grid", "")) == name and key in r)
      if pts:
        ax.plot(*zip(*pts), marker="o", label=" ".join(x for x in name if x))
    if ref is not None and key in ref:
      ax.axhline(ref[key], color="k", ls="--", lw=1, label="float")
    if hline and ref is not None and hline in ref:
      ax.axhline(ref[hline], color="grey", ls=":", lw=1, label="unigram")
    ax.set(xlabel="bits per weight", ylabel=key, title=f"{title}: {key}")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
