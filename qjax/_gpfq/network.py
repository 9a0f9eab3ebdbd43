"""GPFQ and MSQ on any JAX model: per-layer quantizers plugged into the one-pass driver.

Data flow of `gpfq(params, apply_fn, batch)` (Zhang, Zhou & Saab, "Post-training quantization
for neural networks with provable guarantees", Alg. 1):

  trace apply_fn, list its weight ops (qjax.program)  ->  the driver evaluates the float and the
  quantized network in lockstep (qjax.driver); at weight op i:
    X_i from the float stream, X~_i from the quantized stream (conv: vectorized patches at the
    same sampled positions, Sec. 2.3)
    -> levels from the layer's weights (Eq. 17-19 or the reference rule, qjax.alphabets)
    -> `gpfq_layer` (one problem per conv group / weight batch dim) -> Q continues the stream
  -> optional bias correction of the last layer (Sec. 3.2.3) -> report.

`quantize_msq` runs the same pipeline with plain rounding onto the same alphabets (the MSQ
baseline, Eq. 5). Both are `quantize_layer` functions of `qjax.driver.run`.

With `grid=` (a `qjax.grids.GridSpec`, or {regex: GridSpec} rules) the per-layer alphabet is
replaced by the grid fitted on the layer's matrix (per tensor / channel / group): GPFQ rounds row
t of neuron j onto the grid of (group of t, j), MSQ is nearest rounding onto it (= RTN,
`qjax.quantize_rtn` on the driver's views, `qjax.views`), so both use the levels `qjax.gptq`
and `qjax.quantize_rtn` use.
`quantizer=` picks GPFQ's Q_t (msq, SPFQ's stochastic rounding, L0 / L1 thresholding).
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, Callable, Iterable, Literal, Mapping

import jax
import jax.numpy as jnp

from qjax import alphabets
from qjax import driver
from qjax import grids
from qjax import mesh as mesh_lib
from qjax import rules
from qjax import views as views_lib
from qjax._gpfq import rounders as rounders_lib
from qjax._gpfq.layer import gpfq_layer
from qjax._gpfq.sharded import resolve_mesh
from qjax.alphabets import DEFAULT_C
from qjax.calibration import holdout_size, output_error
from qjax.driver import LayerRecord, Report, UnsupportedLayerWarning, format_report

PyTree = Any
Rule = Literal["paper", "reference", "uniform"]
Bits = int | Mapping[str, int]
GridRules = grids.GridSpec | Mapping[str, grids.GridSpec | None]
# Salt of the stochastic quantizer's keys: layer i rounds with fold_in(fold_in(key, salt), i), a
# stream apart from the patch samples' fold_in(key, i).
_ROUND_SALT = 0x51F0

__all__ = ["DEFAULT_C", "Bits", "LayerRecord", "Report", "Rule", "UnsupportedLayerWarning",
           "alphabet", "format_report", "gpfq", "gpfq_quantizer", "holdout_size",
           "msq_quantizer", "output_error", "pad_levels", "quantize_msq"]

def alphabet(W: jax.Array, bits: int, C: float, rule: Rule) -> tuple[jax.Array, float]:
  """(levels, delta) for a kernel matrix (N0, N1) by the paper's (Eq. 17-19) or the reference
  code's rule; see `qjax.alphabets.levels_for`."""
  step = {"paper": alphabets.paper_step, "reference": alphabets.reference_step,
          "uniform": alphabets.uniform_step}[rule]
  return alphabets.levels_for(W, bits, C, rule), float(step(W, bits, C))


def pad_levels(levels: jax.Array, min_size: int = 17) -> jax.Array:
  """Repeat the top level up to max(min_size, len(levels)): the same nearest-level values, but
  one array shape for b = 1..4, so the jitted GPFQ kernels compile once across bit widths."""
  extra = max(min_size - levels.shape[0], 0)
  return jnp.concatenate([levels, jnp.broadcast_to(levels[-1:], (extra,))])


def _gpfq_groups(W, chunks, info, levels, method, mesh, data_axis, model_axis,
                 act_order=False) -> jax.Array:
  """GPFQ (Eq. 7-8) on each of the layer's independent problems, side by side; `levels` is an
  alphabet shared by all, or a function (problem index, W columns) -> rounder."""
  if mesh is not None and model_axis in mesh.axis_names:  # a bad axis name fails in gpfq_layer
    if (W.shape[1] // info.groups) % mesh.shape[model_axis]:
      model_axis = None
  pairs = list(chunks) if len(chunks) == 1 else None
  exact = getattr(info, "reduce_chunks", None)
  blocks = []
  for g, (rows, cols) in enumerate(info.group_slices()):
    if pairs is not None:  # one batch: arrays (gpfq_layer picks the cheaper form)
      X, X_tilde = pairs[0]
      same = X_tilde is X  # before the first quantized layer: gpfq_layer halves the work
      x = X if info.groups == 1 else X[:, rows]
      x_tilde = x if same else (X_tilde if info.groups == 1 else X_tilde[:, rows])
      data = (x, x_tilde)
    else:  # several batches: stream the chunks (Gram form, memory O(N0^2))
      data = ((((x, xt) if info.groups == 1 else (x[:, rows], xt[:, rows]))
               for x, xt in chunks), None)
    target = levels(g, cols) if callable(levels) else levels
    blocks.append(gpfq_layer(W[:, cols], *data, target, method=method, mesh=mesh,
                             data_axis=data_axis, model_axis=model_axis,
                             act_order=act_order, reduce_chunks=exact))
  return jnp.concatenate(blocks, axis=1) if len(blocks) > 1 else blocks[0]


def _sparsity(Q: jax.Array) -> float:
  return float(jnp.mean(Q == 0))


def _sub_grid(grid: grids.Grid, cols: slice) -> grids.Grid:
  return grids.Grid(grid.scale[:, cols], grid.zero[:, cols], bits=grid.bits,
                    symmetric=grid.symmetric, group_size=grid.group_size,
                    per_tensor=grid.per_tensor)


def _quantizer(kind: str, C: float, rule: Rule, method: str = "auto", mesh: Any = None,
               data_axis: str | None = "data", model_axis: str | None = "model", *,
               grid: Mapping[str, grids.GridSpec] | grids.GridSpec | None = None,
               quantizer: str = "msq", key: jax.Array | None = None, lambda_: Any = None,
               grids_out: views_lib.Targets | None = None, act_order: bool = False) -> Callable:
  """`grid`: a GridSpec for every layer or {layer name: GridSpec} (already resolved); `key`:
  the stochastic quantizer's key (layer i uses fold_in(key, i), problem g of it fold_in(., g))."""
  mesh = resolve_mesh(mesh) if kind == "gpfq" else None

  def rounders(W, info, target):
    """(problem g, W columns) -> the rounder of `target` (a Grid or an alphabet) there."""
    layer_key = None if key is None else jax.random.fold_in(key, info.index)

    def make(g, cols):
      sub = _sub_grid(target, cols) if isinstance(target, grids.Grid) else target
      n1 = len(range(*cols.indices(W.shape[1])))
      k = None if layer_key is None else (layer_key if g == 0 else
                                          jax.random.fold_in(layer_key, g))
      return rounders_lib.rounder(sub, W.shape[0], n1, quantizer=quantizer, key=k,
                                  lambda_=lambda_)
    return make

  def quantize_layer(name: str, W: jax.Array, chunks: driver.Chunks, info: driver.LayerInfo):
    if getattr(info, "reduce_chunks", None) is not None:
      # W whole: its alphabet's statistics and the Gram form's G W sum over its split rows.
      W = mesh_lib.replicated(W)
    if grid is not None:
      spec = grid[name] if isinstance(grid, Mapping) else grid
      fitted = grids.fit(W, spec)
      rtn_Q = fitted.round(W)
      if kind == "msq":
        Q = rtn_Q
      else:
        Q = _gpfq_groups(W, chunks, info, rounders(W, info, fitted), method, mesh, data_axis,
                         model_axis, act_order).astype(W.dtype)
      if grids_out is not None:
        grids_out.add(name, fitted, info.leaf_index())
      return Q, dict(bits=spec.bits, msq_error=info.error(rtn_Q), sparsity=_sparsity(Q))
    if not bool(jnp.any(W != 0)):  # an all-zero kernel is already on every alphabet
      return W, dict(delta=0.0, msq_error=info.error(W), sparsity=_sparsity(W))
    levels, delta = alphabet(W, info.bits, C, rule)
    msq_Q = alphabets.msq(W, levels).astype(W.dtype)
    if kind == "msq":
      Q = msq_Q
    elif quantizer == "msq":  # the paper's GPFQ, unchanged
      Q = _gpfq_groups(W, chunks, info, pad_levels(levels), method, mesh, data_axis,
                       model_axis, act_order).astype(W.dtype)
    else:
      Q = _gpfq_groups(W, chunks, info, rounders(W, info, levels), method, mesh, data_axis,
                       model_axis, act_order).astype(W.dtype)
    if grids_out is not None:
      grids_out[name] = levels
    return Q, dict(delta=delta, msq_error=info.error(msq_Q), sparsity=_sparsity(Q))
  return quantize_layer


def gpfq_quantizer(C: float = 1.0, rule: Rule = "paper", *, method: str = "auto",
                   mesh: Any = None, data_axis: str | None = "data",
                   model_axis: str | None = "model", grid: Any = None, quantizer: str = "msq",
                   key: jax.Array | None = None, lambda_: Any = None) -> Callable:
  """The GPFQ `quantize_layer` for `qjax.driver.run`: alphabet from W (Eq. 17-19), or the grid
  `grid` (a GridSpec, or {layer name: GridSpec}) fitted on W; then `gpfq_layer` with
  `quantizer` per independent problem (layer i's stochastic key fold_in(key, i)); extras:
  delta, the MSQ (= RTN on a grid) error on the same data, the sparsity of Q."""
  return _quantizer("gpfq", C, rule, method, mesh, data_axis, model_axis, grid=grid,
                    quantizer=quantizer, key=key, lambda_=lambda_)


def msq_quantizer(C: float = 1.0, rule: Rule = "paper", *, grid: Any = None) -> Callable:
  """The MSQ `quantize_layer`: plain rounding onto the GPFQ alphabet (Eq. 5), or onto the grid
  (RTN, as `qjax.quantize_rtn`)."""
  return _quantizer("msq", C, rule, grid=grid)


def _check_grid_spec(value: Any, where: str) -> Any:
  if value is not None and not isinstance(value, grids.GridSpec):
    raise TypeError(f"{where} must be a qjax.grids.GridSpec (or None: leave the layer float), "
                    f"got {value!r}")
  return value


def _check_quantizer(quantizer: str, key: Any, lambda_: Any, explicit_key: bool) -> None:
  if quantizer not in rounders_lib.QUANTIZERS:
    raise ValueError(f"quantizer must be one of {rounders_lib.QUANTIZERS}, got {quantizer!r}")
  if quantizer == "stochastic" and not explicit_key:
    raise ValueError("quantizer='stochastic' needs an explicit key (its draws are "
                     "reproducible from it)")
  if quantizer.endswith("threshold"):
    if lambda_ is None or isinstance(lambda_, bool) or not (
        math.isfinite(float(lambda_)) and float(lambda_) >= 0):
      raise ValueError(f"quantizer={quantizer!r} needs lambda_ >= 0 (finite), got {lambda_!r}")
  elif lambda_ is not None:
    raise ValueError(f"lambda_ is only used with the thresholding quantizers, got "
                     f"quantizer={quantizer!r}")


def _grid_plan(prep: driver.Prepared, grid: Any, skip: str | None):
  """Resolve the grid rules on the program's layers: ({name: GridSpec}, skip regex) where layers
  whose rule is None join `skip` (they stay float)."""
  names = [op.name for op in prep.program.stops]
  specs = rules.resolve(grid, names, what="grid", check_value=_check_grid_spec)
  floats = [n for n, v in specs.items() if v is None]
  if floats:
    pattern = "^(?:" + "|".join(re.escape(n) for n in floats) + ")$"
    skip = pattern if skip is None else f"(?:{skip})|{pattern}"
  return {n: v for n, v in specs.items() if v is not None}, skip


def _run(quantizer: str, params: PyTree, apply_fn: Callable, batch: PyTree, *,
         bits: Bits | None,
         C: float | None, rule: Rule, skip: str | None, last_layer_float: bool,
         bias_correction: bool, patch_p: float, patch_stride: str, key: jax.Array | None,
         method: str, C_grid: Iterable[float] | None, holdout_fraction: float,
         holdout_loss: Callable | None, apply_kwargs: Mapping[str, Any] | None,
         progress: bool, mesh: Any = None, data_axis: str | None = "data",
         model_axis: str | None = "model", grid: Any = None, rounding: str = "msq",
         lambda_: Any = None, grids_out: views_lib.Targets | None = None, act: Any = None,
         act_scales: Any = None, act_order: bool = False,
         reduce_chunks: int | None = None) -> tuple[PyTree, Report]:
  start = time.perf_counter()
  # -- eager validation, cheapest first.
  if rule not in DEFAULT_C:
    raise ValueError(f"rule must be one of {sorted(DEFAULT_C)}, got {rule!r}")
  _check_quantizer(rounding, key, lambda_, key is not None)
  if grid is not None:
    rules.check(grid, "grid", _check_grid_spec)
    for name, value in (("bits", bits), ("C", C), ("C_grid", C_grid)):
      if value is not None:
        raise ValueError(f"{name} must be None with grid=: the grid's GridSpec gives the bits "
                         f"and the scales (C and C_grid belong to the paper's alphabets), got "
                         f"{name}={value!r}")
  elif bits is None:
    bits = 4
  if grid is None:
    rules.check(bits, "bits", rules.check_bits)
  if skip is not None:
    rules.check({skip: True}, "skip")
  C_value = DEFAULT_C[rule] if C is None else float(C)
  c_values = None if C_grid is None else tuple(float(c) for c in C_grid)
  for c in (C_value,) + (c_values or ()):
    if not (math.isfinite(c) and c > 0):
      raise ValueError(f"C must be finite and > 0, got {c}")
  if c_values is not None and (not c_values or not 0.0 < holdout_fraction < 1.0):
    raise ValueError(f"C_grid needs >= 1 value and 0 < holdout_fraction < 1, got {c_values} "
                     f"and {holdout_fraction}")
  if method not in ("auto", "scan", "gram"):
    raise ValueError(f"method must be 'auto', 'scan' or 'gram', got {method!r}")
  driver.check_options(patch_p, patch_stride, key)
  mesh_lib.check_reduce_chunks(reduce_chunks)
  if reduce_chunks is not None and resolve_mesh(mesh) is not None:
    raise ValueError("reduce_chunks is for GSPMD placements (params and batch on a mesh, "
                     "mesh=None), not with mesh= (the shard_map path)")
  key = jax.random.key(0) if key is None else key
  round_key = jax.random.fold_in(key, _ROUND_SALT) if rounding == "stochastic" else None
  options = dict(bits=bits, skip=skip, last_layer_float=last_layer_float,
                 bias_correction=bias_correction, patch_p=patch_p, patch_stride=patch_stride,
                 key=key, progress=progress, method=quantizer, act=act, act_scales=act_scales,
                 reduce_chunks=reduce_chunks)
  rules.check(act, "act", driver.activations.check_act)
  make = lambda c, g=None, out=grids_out: _quantizer(  # noqa: E731
      quantizer, c, rule, method, mesh, data_axis, model_axis, grid=g, quantizer=rounding,
      key=round_key, lambda_=lambda_, grids_out=out, act_order=act_order)

  # -- the grid's layers: fitted per layer, no C.
  if grid is not None:
    prep = driver.prepare(params, apply_fn, batch, apply_kwargs)
    specs, options["skip"] = _grid_plan(prep, grid, skip)
    q_params, report = driver.execute(prep, make(C, specs), **options)
    report = dataclasses.replace(report, method=quantizer, rule=None, C=None,
                                 seconds=time.perf_counter() - start)
    return q_params, report
  C = C_value
  grid = c_values

  # -- C: fixed, or grid search on a held-out tail of the batch (Sec. 3.1: "grid search").
  search = ()
  if grid is None:
    prep = driver.prepare(params, apply_fn, batch, apply_kwargs)
    q_params, report = driver.execute(prep, make(C), **options)
    passes = report.forward_passes
  else:
    batches = driver.as_batches(batch)
    if len(batches) != 1:
      raise ValueError("C_grid needs one calibration batch (its tail is held out), got "
                       f"{len(batches)} batches")
    batch = batches[0]
    n = driver.leading_size(batch)
    n_hold = holdout_size(n, holdout_fraction)
    if n - n_hold < 1:
      raise ValueError(f"holdout_fraction={holdout_fraction} leaves no calibration rows of {n}")
    calib = jax.tree_util.tree_map(lambda x: x[:n - n_hold], batch)
    hold = jax.tree_util.tree_map(lambda x: x[n - n_hold:], batch)
    prep = driver.prepare(params, apply_fn, calib, apply_kwargs)
    forward = jax.jit(prep.fn)
    float_out = forward(prep.params, hold)
    passes = 1
    loss_fn = output_error if holdout_loss is None else holdout_loss
    best = None
    scores = []
    for c in grid:
      out = None if grids_out is None else views_lib.Targets()  # the alphabets of this C
      q_params, report = driver.execute(prep, make(c, out=out), **options)
      q_vars = {"params": q_params} if prep.wrapped else q_params
      loss = float(loss_fn(forward(q_vars, hold), float_out))
      passes += report.forward_passes + 1
      scores.append((c, loss))
      if best is None or loss < best[0]:
        best, C = (loss, (q_params, report, out)), c
    q_params, report, out = best[1]
    if grids_out is not None:  # the alphabets of the chosen C
      grids_out.update(out)
      grids_out.views.update(out.views)
    search = tuple(scores)
  report = Report(method=quantizer, rule=rule, C=C, layers=report.layers, C_search=search,
                  bias_shift=report.bias_shift, seconds=time.perf_counter() - start,
                  forward_passes=passes, quantizer_seconds=report.quantizer_seconds,
                  error_seconds=report.error_seconds,
                  other_params=report.other_params, act_scales=report.act_scales)
  return q_params, report


_COMMON_DOC = """
  Args:
    params: the weights, in any pytree: a flax variables dict ({'params': ..., 'batch_stats':
      ...}; only its 'params' collection is quantized), bare linen params with `model.apply`,
      an NNX state from `nnx.split`, an equinox-style module or a plain dict. Returned in the
      same containers.
    apply_fn: any JAX function called as `apply_fn(params, batch, **apply_kwargs)`: linen
      `model.apply`, `lambda state, x: nnx.merge(graphdef, state)(x)`, a plain function, or a
      `jax.jit`-wrapped one. Its weight ops (`dot_general` / `conv_general_dilated` with a
      parameter operand) are the layers, named by the parameter's path ('block1/Conv_0').
    batch: calibration inputs (m examples on the leading axis), an array or pytree of arrays
      (inputs only: no labels); or a list / iterator of equally shaped batches (the Gram form
      then sums over them). With `C_grid` the last `holdout_fraction` of the (single) batch is
      held out: shuffle it first.
    bits: bits per weight (1 = ternary), or {regex: bits} matched with `re.search` against
      layer names in insertion order, plus an optional 'default' entry (`qjax.rules`: a
      pattern that matches no layer is an error). None: 4 (must be None with `grid`).
    C: scale of the step (Eq. 19), default `DEFAULT_C[rule]`.
    rule: 'paper' (augmented midrise, Eq. 17-19), 'reference' (midtread, the authors' code) or
      'uniform' (with C = 1 the per-tensor grid of `qjax.quantize_uniform`, 2^b - 1 levels, e.g.
      for PSGD-trained models).
    skip: regex; layers whose name it `re.search`es stay float.
    last_layer_float: leave the last weight op in float (Sec. 3.2.3).
    bias_correction: subtract the mean output error of the last layer from its bias (the
      parameter added to its output; Sec. 3.2.3).
    patch_p: fraction of each image's conv patches used (Sec. 3.1, p = 0.25).
    patch_stride: 'kernel' (disjoint patches, the paper) or 'layer' (the conv's own strides).
    key: PRNG key for the patch samples; default `jax.random.key(0)`. Layer i uses
      `fold_in(key, i)`, for both networks.
    C_grid: values of C to try; the one with the least `holdout_loss` on the held-out part wins
      (the network is quantized on the rest).
    holdout_fraction: fraction of the batch held out for the C search.
    holdout_loss: (quantized outputs, float outputs) -> scalar; default `output_error`.
    apply_kwargs: keyword arguments for apply_fn, e.g. {'train': False}.
    progress: show a tqdm bar over the layers.
    mesh: (`gpfq` only) a `jax.sharding.Mesh` to run every layer's GPFQ on, neurons split over
      `model_axis`, calibration rows over `data_axis` (same result as one device); None uses
      the mesh of `jax.set_mesh` if one is set. The forward passes run as usual.
    data_axis, model_axis: (`gpfq` only) the mesh axis names; None leaves that dimension whole.
    grid: instead of the paper's per-layer alphabet, a `qjax.grids.GridSpec` (bits, per tensor
      / channel / group, symmetric or not, max or MSE scale) fitted on each layer's matrix, or
      {regex: GridSpec or None} rules (`qjax.rules`; None leaves the layer float). `bits`, `C`
      and `C_grid` must then be None. Per-tensor and per-channel grids are exactly those of
      `qjax.gptq` and of `qjax.quantize_rtn` with `views=qjax.views.kernel_views(...)`: each
      layer's own matrix (a conv's rows channel-major (Cin, kh, kw), a DenseGeneral kernel
      (in, heads, head_dim) as (in, heads*head_dim), ...).
    quantizer: (`gpfq` only) Q_t of Eq. (7)-(8): 'msq' (nearest level, the default),
      'stochastic' (SPFQ's unbiased random rounding; needs an explicit `key`, layer i draws
      with fold_in(fold_in(key, salt), i)), 'hard_threshold' / 'soft_threshold' (L0 / L1
      thresholding by `lambda_` before rounding: sparser Q). The report's 'sparse' column is
      the fraction of zeros in each layer's Q.
    lambda_: (`gpfq` only) the threshold of the thresholding quantizers, in weight units.
    act_order: (`gpfq` only) quantize each layer's inputs in order of decreasing
      diag(X~^T X~) (`gpfq_layer(act_order=True)`); grids keep each input's original group.
    reduce_chunks: (`gpfq` only) None, or C for a deterministic reduction: each layer's Grams
      H, G summed over C fixed row chunks in a fixed order (the Gram form,
      `gpfq_layer(reduce_chunks=C)`), each weight used whole in the forward segments and the
      kernel, so one device and every mesh of `qjax.mesh.shard_params` / `shard_batch`
      placements give the same Q bit for bit (`qjax.driver.run`; C x N0 x N0 float32 at once).
    return_grids: also return a `qjax.views.Targets` {layer name: fitted `qjax.grids.Grid`, or
      the alphabet} that carries each grid's view (the layer's matrix), so
      `qjax.export.pack(q, grids)` packs every layer exactly.
    act, act_scales: activation quantization (`qjax.ActSpec` or {regex: ActSpec or None}
      rules): X~ is each layer's fake-quantized input in the quantized network; static scales
      are calibrated on that stream (`report.act_scales`) unless `act_scales` gives them.

  Returns:
    (quantized params, same tree structure and container types, runnable with the unchanged
    apply_fn; `Report`, with the forward passes run and the time spent in the quantizers),
    plus the grids with return_grids.

  Raises:
    ValueError: NaN/Inf in weights or batch, an empty batch, a batch that does not fit
      apply_fn (e.g. an (inputs, labels) pair), an apply_fn whose output depends on no
      parameter or that has no weight op, bits < 1, a bits/skip pattern matching no layer,
      bad options.
  Warns:
    UnsupportedLayerWarning: for a weight op that cannot be quantized (inside a while loop or
      cond; left float) unless `skip` matches it.
"""


def gpfq(params: PyTree, apply_fn: Callable, batch: PyTree, *, bits: Bits | None = None,
         C: float | None = None, rule: Rule = "paper", skip: str | None = None,
         last_layer_float: bool = False, bias_correction: bool = False, patch_p: float = 0.25,
         patch_stride: Literal["kernel", "layer"] = "kernel", key: jax.Array | None = None,
         method: str = "auto", C_grid: Iterable[float] | None = None,
         holdout_fraction: float = 0.2, holdout_loss: Callable | None = None,
         apply_kwargs: Mapping[str, Any] | None = None, progress: bool = True,
         mesh: Any = None, data_axis: str | None = "data",
         model_axis: str | None = "model", grid: GridRules | None = None,
         quantizer: str = "msq", lambda_: float | None = None,
         return_grids: bool = False, act: Any = None,
         act_scales: Any = None, act_order: bool = False,
         reduce_chunks: int | None = None) -> tuple[PyTree, Report]:
  fitted = views_lib.Targets()
  q_params, report = _run(
      "gpfq", params, apply_fn, batch, bits=bits, C=C, rule=rule, skip=skip,
      last_layer_float=last_layer_float, bias_correction=bias_correction, patch_p=patch_p,
      patch_stride=patch_stride, key=key, method=method, C_grid=C_grid,
      holdout_fraction=holdout_fraction, holdout_loss=holdout_loss, apply_kwargs=apply_kwargs,
      progress=progress, mesh=mesh, data_axis=data_axis, model_axis=model_axis, grid=grid,
      rounding=quantizer, lambda_=lambda_, grids_out=fitted if return_grids else None,
      act=act, act_scales=act_scales, act_order=act_order, reduce_chunks=reduce_chunks)
  return (q_params, report, fitted) if return_grids else (q_params, report)


def quantize_msq(params: PyTree, apply_fn: Callable, batch: PyTree, *,
                 bits: Bits | None = None,
                 C: float | None = None, rule: Rule = "paper", skip: str | None = None,
                 last_layer_float: bool = False, bias_correction: bool = False,
                 patch_p: float = 0.25, patch_stride: Literal["kernel", "layer"] = "kernel",
                 key: jax.Array | None = None, C_grid: Iterable[float] | None = None,
                 holdout_fraction: float = 0.2, holdout_loss: Callable | None = None,
                 apply_kwargs: Mapping[str, Any] | None = None,
                 progress: bool = True, grid: GridRules | None = None,
                 return_grids: bool = False, act: Any = None,
                 act_scales: Any = None) -> tuple[PyTree, Report]:
  fitted = views_lib.Targets()
  q_params, report = _run(
      "msq", params, apply_fn, batch, bits=bits, C=C, rule=rule, skip=skip,
      last_layer_float=last_layer_float, bias_correction=bias_correction, patch_p=patch_p,
      patch_stride=patch_stride, key=key, method="auto", C_grid=C_grid,
      holdout_fraction=holdout_fraction, holdout_loss=holdout_loss, apply_kwargs=apply_kwargs,
      progress=progress, grid=grid, grids_out=fitted if return_grids else None, act=act,
      act_scales=act_scales)
  return (q_params, report, fitted) if return_grids else (q_params, report)


gpfq.__doc__ = """Quantize any JAX model with GPFQ, layer by layer in program order (Alg. 1).

  For layer i, X comes from the float network and X~ from the network with layers < i already
  quantized, both on `batch`, evaluated side by side in one pass (`qjax.driver`); each neuron
  (kernel column) q is chosen greedily by Eq. (7)-(8) so that X~ q tracks X w. Conv layers use
  vectorized patches (Sec. 2.3); the alphabet per layer is the augmented midrise of
  Eq. (17)-(19) ('paper') or the reference code's midtread.
""" + _COMMON_DOC

quantize_msq.__doc__ = """Round every layer onto the same alphabets as `gpfq` (MSQ, Eq. 5), no
  data used for the weights; the batch only feeds the report's errors (and the C search).
""" + _COMMON_DOC
