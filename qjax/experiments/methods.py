"""The experiment methods: the one registry every task quantizes with.

LeNet5 (`classify`: the `gpfq` and `act` rows and the RTN baseline), MiniLM, the byte LM,
ImageNet and the LLM (`causal_lm`) all run `run(name, params, apply_fn, batch, levels, ...)`;
a task that supports only some methods lists their names. A new method is one `METHODS` entry.

`levels` is what one setting of a method gives it (`Method.levels`):

* 'tensor': bits; one symmetric grid per tensor, no data (`qjax.quantize_uniform`);
* 'alphabet': bits (or {regex: bits} rules); GPFQ's per-layer alphabet (options `rule`, `C`);
* 'grid': a `qjax.grids.GridSpec`, fitted on each layer's W, so every grid method rounds onto the
  same levels (RTN, GPTQ with static groups, GPFQ, Qronos).

`driver` holds the keyword arguments every data method's qjax call takes (skip, act, key,
apply_kwargs, patch_p, patch_stride, last_layer_float, bias_correction, progress); `options` the
method's own (`OPTIONS`); each method reads only the options it names, so one set serves all.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import qjax

PyTree = Any

# Qronos' damping (fraction of mean diag(X~^T X~)) when the task gives no `damp_grid`: chosen on
# the held-out tail of the calibration batch (never the test split), then refitted on all of it.
QRONOS_DAMP_GRID = (0.03, 0.1, 0.3)


class Result(NamedTuple):
  """What every method returns."""
  params: PyTree                  # the given params (or variables), quantized
  report: Any                     # the driver's report; None for RTN without data
  columns: dict                   # row columns the report does not carry (C, Qronos' damp)
  targets: Any = None             # fitted grids for `qjax.export.pack` (GPTQ, `return_grids`)


@dataclasses.dataclass(frozen=True)
class Method:
  """One registry entry: its row label, what a setting gives it, and how to run it."""
  label: str                      # the rows' `method` column
  levels: str                     # 'tensor', 'alphabet' or 'grid' (module docstring)
  fn: Callable[..., Result]       # fn(params, apply_fn, batch, levels, driver, **options)
  options: tuple[str, ...] = ()   # the `OPTIONS` it reads
  grids: tuple[str, ...] = ()     # a grid method's fixed grids (else the task's config.grids)


def _by_levels(levels: Any) -> dict:
  """qjax.gpfq's keyword for a setting: grid= for a GridSpec, else bits=."""
  return {"grid": levels} if isinstance(levels, qjax.grids.GridSpec) else {"bits": levels}


def _spec_kwargs(spec: Any) -> dict:
  """A GridSpec as the keyword arguments of qjax.gptq / qjax.qronos."""
  return dict(bits=spec.bits, granularity=spec.granularity, group_size=spec.group_size,
              symmetric=spec.symmetric, scale_method=spec.method)


def _rtn_tensor(params, apply_fn, batch, bits, driver) -> Result:
  del apply_fn, batch, driver  # no data
  return Result(qjax.quantize_uniform(params, bits), None, {})


def _rtn_grid(params, apply_fn, batch, spec, driver, views=None) -> Result:
  """`qjax.quantize_rtn` (on `views`, the matrices GPTQ and GPFQ quantize); with activations
  quantized, RTN on the driver, whose pass calibrates the static scales."""
  if driver.get("act") is None:
    return Result(qjax.quantize_rtn(params, spec, views=views)[0], None, {})
  q, report = qjax.driver.run(params, apply_fn, batch, qjax.rtn.rtn_quantizer(spec),
                              method="rtn", **driver)
  return Result(q, report, {})


def _gpfq(params, apply_fn, batch, levels, driver, *, act_order=False, **options) -> Result:
  q, report = qjax.gpfq(params, apply_fn, batch, **_by_levels(levels), act_order=act_order,
                        **options, **driver)
  return Result(q, report, {} if report.C is None else {"C": report.C})


def _gpfq_lastfloat_bc(params, apply_fn, batch, bits, driver, **options) -> Result:
  """The GPFQ paper's dagger variant (Table 3): the last layer float, bias-corrected."""
  return _gpfq(params, apply_fn, batch, bits,
               {**driver, "last_layer_float": True, "bias_correction": True}, **options)


def _msq(params, apply_fn, batch, bits, driver, *, C=None, **options) -> Result:
  """Plain rounding onto GPFQ's alphabet (pass the C GPFQ chose: the same alphabet)."""
  q, report = qjax.quantize_msq(params, apply_fn, batch, bits=bits, C=C, **options, **driver)
  return Result(q, report, {} if C is None else {"C": C})


def _gptq(params, apply_fn, batch, spec, driver, *, act_order=False,
          return_grids=False) -> Result:
  """GPTQ with static groups: every group's grid is fitted on W before any update, so GPTQ
  rounds onto exactly RTN's levels (the reference's dynamic groups refit on updated W)."""
  out = qjax.gptq(params, apply_fn, batch, **_spec_kwargs(spec), act_order=act_order,
                  static_groups=True, return_grids=return_grids, **driver)
  q, report, targets = out if return_grids else (*out, None)
  return Result(q, report, {}, targets)


def _qronos(params, apply_fn, batch, spec, driver, *, damp_grid=QRONOS_DAMP_GRID,
            damp_holdout_fraction=0.2) -> Result:
  """Qronos with act-order; damp searched over `damp_grid` (one value: no search)."""
  kw = dict(_spec_kwargs(spec), act_order=True, **driver)
  damp_grid = tuple(damp_grid)
  damp = damp_grid[0]
  if len(damp_grid) > 1:
    _, search = qjax.qronos(params, apply_fn, batch, damp_grid=damp_grid,
                            holdout_fraction=damp_holdout_fraction, **kw)
    damp = search.damp
  q, report = qjax.qronos(params, apply_fn, batch, damp=damp, **kw)
  return Result(q, report, {"damp": damp})


def _act_order(fn: Callable) -> Callable:
  return lambda *args, **options: fn(*args, act_order=True, **options)


_GPFQ_OPTIONS = ("C", "rule", "C_grid", "holdout_fraction", "holdout_loss", "method")

# name -> Method. Labels repeat where two entries are one method on other levels.
METHODS: dict[str, Method] = {
    "rtn": Method("rtn", "tensor", _rtn_tensor),
    "rtn-channel": Method("rtn-channel", "grid", _rtn_grid, ("views",), grids=("channel",)),
    "gpfq": Method("gpfq", "alphabet", _gpfq, _GPFQ_OPTIONS),
    "msq": Method("msq", "alphabet", _msq, ("C", "rule")),
    "gpfq_lastfloat_bc": Method("gpfq_lastfloat_bc", "alphabet", _gpfq_lastfloat_bc,
                                _GPFQ_OPTIONS),
    "rtn-grid": Method("rtn", "grid", _rtn_grid, ("views",)),
    "gptq": Method("gptq", "grid", _gptq, ("return_grids",)),
    "gpfq-grid": Method("gpfq", "grid", _gpfq, ("method",)),
    "gptq-act": Method("gptq-act", "grid", _act_order(_gptq), ("return_grids",)),
    "gpfq-act": Method("gpfq-act", "grid", _act_order(_gpfq), ("method",)),
    "qronos": Method("qronos", "grid", _qronos, ("damp_grid", "damp_holdout_fraction")),
}
OPTIONS = tuple(dict.fromkeys(o for m in METHODS.values() for o in m.options))


def get(name: str, supported: tuple[str, ...] | None = None, where: str = "config.methods"
        ) -> Method:
  """The method `name` (of `supported` when given); a ValueError naming the choices else."""
  choices = tuple(METHODS) if supported is None else supported
  if name not in choices:
    raise ValueError(f"{where}: unknown method {name!r}; choose from {list(choices)}")
  return METHODS[name]


def on_grid(name: str) -> str:
  """The registry name of `name` run on a grid: itself for a grid method, else its '-grid'
  entry ('rtn' -> 'rtn-grid', 'gpfq' -> 'gpfq-grid'); grid-only tasks name methods this way."""
  if name in METHODS and METHODS[name].levels == "grid":
    return name
  return f"{name}-grid" if f"{name}-grid" in METHODS else name


def run(name: str, params: PyTree, apply_fn: Callable, batch: Any, levels: Any, *,
        driver: dict | None = None, **options: Any) -> Result:
  """Method `name` on (params, apply_fn, batch) at one setting `levels` (module docstring).

  Args:
    name: a `METHODS` key.
    params, apply_fn, batch: as `qjax.gpfq` (params may be flax variables).
    levels: bits ('tensor', 'alphabet' methods) or a `qjax.grids.GridSpec` ('grid' methods).
    driver: keyword arguments of every data method's qjax call (skip, act, key, ...).
    **options: any of `OPTIONS`; the method reads those it names (`Method.options`).

  Returns:
    a `Result`.
  """
  unknown = sorted(set(options) - set(OPTIONS))
  if unknown:
    raise TypeError(f"unknown method options {unknown}; known: {list(OPTIONS)}")
  method = get(name)
  own = {k: v for k, v in options.items() if k in method.options}
  return method.fn(params, apply_fn, batch, levels, dict(driver or {}), **own)
