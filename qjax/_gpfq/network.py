"""The GPFQ network driver (seed 003, Alg. 1): quantize a linen model one layer at a time.

Data flow of `gpfq(variables, apply_fn, batch)`:

  capture the Dense/Conv calls (qjax.capture)  ->  for each layer i in call order:
    X_i from the float network, X~_i from the network whose layers < i are already quantized,
    both on the same batch (conv: vectorized patches at the same sampled positions, Sec. 2.3)
    -> levels from the layer's weights (Eq. 17-19 or the reference rule, qjax.alphabets)
    -> `gpfq_layer` (one problem per conv group) -> write the kernel back in its Flax layout
  -> optional bias correction of the last layer (Sec. 3.2.3) -> report.

Each arrow is a pure function; only `_quantize_network` loops. `quantize_msq` runs the same
pipeline with plain rounding onto the same alphabets (the MSQ baseline, Eq. 5).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
import warnings
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from qjax import alphabets
from qjax import capture as capture_lib
from qjax._gpfq import sharded
from qjax._gpfq.layer import gpfq_layer

PyTree = Any
Rule = Literal["paper", "reference", "uniform"]
Bits = int | Mapping[str, int]

# C for each step rule (Eq. 19 / reference code). Found by grid search on LeNet5 and embedded
# MNIST (qjax.experiments.gpfq); the paper's ImageNet models used 0.975-1.81 (Table 1).
DEFAULT_C: dict[str, float] = {"paper": 1.0, "reference": 1.0, "uniform": 1.0}


class UnsupportedLayerWarning(UserWarning):
  """A layer with a kernel that GPFQ cannot quantize (left in float), e.g. nn.DenseGeneral."""


@dataclasses.dataclass(frozen=True)
class LayerRecord:
  """What happened to one layer call.

  Attributes:
    path: module path, e.g. 'block1/Conv_0'.
    module_type: 'Dense', 'Conv', or the unsupported class name.
    kernel_shape: Flax layout, (N0, N1) or (kh, kw, Cin/G, Cout).
    status: 'quantized', 'float' (skip pattern / last layer), 'unsupported' or 'shared'
      (a module called again: quantized at its first call).
    bits: bits of the alphabet (None when not quantized).
    delta: step size of the alphabet (Eq. 19 or the reference rule).
    rows: m, rows of the data matrix X (images x sampled patches for a conv).
    error: ||X W - X~ Q|| / ||X W|| for the Q this run produced.
    msq_error: the same with Q = MSQ(W), plain rounding onto the same alphabet, same X, X~.
    seconds: wall time for this layer (data, quantization, errors).
  """
  path: str
  module_type: str
  kernel_shape: tuple[int, ...]
  status: str
  bits: int | None = None
  delta: float | None = None
  rows: int | None = None
  error: float | None = None
  msq_error: float | None = None
  seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class Report:
  """Per-layer records plus the choices made; `str(report)` is a table (`format_report`).

  Attributes:
    method: 'gpfq' or 'msq'.
    rule: step-size rule of the alphabets.
    C: the C used (chosen by grid search when `C_grid` was given).
    layers: one record per layer call, in call order.
    C_search: (C, held-out loss) per grid value; empty without a grid.
    bias_shift: ||b_new - b_old|| of the last layer's bias (None: no bias correction).
    seconds: total wall time.
  """
  method: str
  rule: str
  C: float
  layers: tuple[LayerRecord, ...]
  C_search: tuple[tuple[float, float], ...] = ()
  bias_shift: float | None = None
  seconds: float = 0.0

  def __str__(self) -> str:
    return format_report(self)


def format_report(report: Report) -> str:
  """The report as a fixed-width text table, one row per layer."""
  head = (f"{'layer':<24} {'type':<8} {'kernel':<16} {'status':<11} {'bits':>4} {'delta':>9} "
          f"{'rows':>7} {'err':>8} {'msq err':>8} {'sec':>6}")
  lines = [f"{report.method.upper()}  rule={report.rule}  C={report.C:g}", head, "-" * len(head)]
  fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
  for r in report.layers:
    lines.append(
        f"{r.path:<24} {r.module_type:<8} {'x'.join(map(str, r.kernel_shape)):<16} "
        f"{r.status:<11} {fmt(r.bits, 'd'):>4} {fmt(r.delta, '.3g'):>9} {fmt(r.rows, 'd'):>7} "
        f"{fmt(r.error, '.4f'):>8} {fmt(r.msq_error, '.4f'):>8} {r.seconds:6.2f}")
  if report.C_search:
    lines.append("C search (held-out loss): " + ", ".join(
        f"{c:g}: {loss:.4g}" for c, loss in report.C_search))
  if report.bias_shift is not None:
    lines.append(f"bias correction on the last layer: ||shift|| = {report.bias_shift:.4g}")
  lines.append(f"total {report.seconds:.2f} s")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Validation helpers (eager, outside jit).


def _is_jitted(fn: Any) -> bool:
  """True for `jax.jit`-wrapped functions (possibly inside functools.partial)."""
  while isinstance(fn, functools.partial):
    fn = fn.func
  return type(fn).__name__ in ("PjitFunction", "CompiledFunction") or (
      hasattr(fn, "lower") and hasattr(fn, "trace") and hasattr(fn, "eval_shape"))


def _split_variables(tree: PyTree) -> tuple[PyTree, bool]:
  """A dict with a top-level 'params' mapping is a variables dict; anything else is bare params.

  Returns (variables, was_bare).
  """
  if isinstance(tree, Mapping) and isinstance(tree.get("params"), Mapping):
    return tree, False
  if isinstance(tree, Mapping):
    return {"params": tree}, True
  raise TypeError(f"expected a flax params or variables dict, got {type(tree).__name__}")


def _keys(path: tuple) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _check_finite(variables: PyTree, batch: PyTree) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    arr = np.asarray(leaf)
    if np.issubdtype(arr.dtype, np.inexact) and not np.isfinite(arr).all():
      keys = _keys(path)
      raise ValueError(f"layer {'/'.join(keys[1:-1])!r}: {'/'.join(keys)} contains "
                       f"{int((~np.isfinite(arr)).sum())} NaN/Inf values")
  for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
    arr = np.asarray(leaf)
    if np.issubdtype(arr.dtype, np.inexact) and not np.isfinite(arr).all():
      where = "/".join(_keys(path)) or "the batch array"
      raise ValueError(f"batch contains {int((~np.isfinite(arr)).sum())} NaN/Inf values "
                       f"(in {where}); GPFQ needs finite calibration data")


def _check_bits(value: Any, where: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{where} must be an int, got {value!r}")
  if not 1 <= int(value) <= 16:
    raise ValueError(f"{where} must be in 1..16 (1 = ternary), got {value}")
  return int(value)


def _compile(pattern: str, what: str) -> re.Pattern:
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f"{what}: invalid regular expression {pattern!r}: {e}") from e


def _bits_for(path: str, bits: Bits) -> int:
  """Bits of a layer: an int, or the first {regex: bits} entry whose regex `re.search`es the
  module path, else bits['default']."""
  if not isinstance(bits, Mapping):
    return int(bits)
  for pattern, b in bits.items():
    if pattern != "default" and re.search(pattern, path):
      return int(b)
  if "default" in bits:
    return int(bits["default"])
  raise ValueError(f"layer {path!r} matches no pattern of bits={dict(bits)} and there is no "
                   "'default' entry")


def holdout_size(n: int, fraction: float) -> int:
  """Examples held out at the end of an n-example batch for the C search (at least 1)."""
  return max(1, round(fraction * n))


def _leading_size(batch: PyTree) -> int:
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree_util.tree_leaves(batch)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f"batch leaves need one shared leading (example) axis, got sizes {sizes}")
  return sizes.pop()


def _trace_layers(apply_fn: Callable, variables: PyTree, batch: PyTree,
                  apply_kwargs: Mapping[str, Any]) -> list[capture_lib.LayerCall]:
  """The layer calls of the model (shapes only, nothing computed), validating the batch."""
  box = []

  def run(v, b):
    out, calls = capture_lib.capture(apply_fn, v, b, **apply_kwargs)
    box.append(calls)
    return out, [c.inputs for c in calls]

  try:
    _, shapes = jax.eval_shape(run, variables, batch)
  except (TypeError, ValueError, IndexError, flax.errors.FlaxError) as e:
    shape = jax.tree_util.tree_map(np.shape, batch)
    raise ValueError(
        f"the batch (shape {shape}) does not fit the model (or the variables / apply_kwargs "
        f"do not): apply_fn(variables, batch, "
        f"**{dict(apply_kwargs)}) raised {type(e).__name__}: {e}\nPass exactly the input the "
        "model's __call__ takes (e.g. (B, 28, 28, 1) images for LeNet5) and keyword arguments "
        "via apply_kwargs.") from e
  # Tracers must not outlive the trace: keep shapes only.
  return [dataclasses.replace(c, inputs=s) for c, s in zip(box[0], shapes)]


# ---------------------------------------------------------------------------------------------
# Pure per-layer steps.


def replace_leaf(tree: PyTree, keys: Sequence[str], value: Any) -> PyTree:
  """A copy of a nested dict / FrozenDict with tree[k0][k1]... = value (containers kept)."""
  if not keys:
    return value
  child = replace_leaf(tree[keys[0]], keys[1:], value)
  if isinstance(tree, flax.core.FrozenDict):
    return tree.copy({keys[0]: child})
  return {**tree, keys[0]: child}


def module_keys(path: str) -> tuple[str, ...]:
  """Keys of a module's subtree in a params dict ('' is the top-level module itself)."""
  return tuple(path.split("/")) if path else ()


def get_leaf(tree: PyTree, keys: Sequence[str]) -> Any:
  for k in keys:
    tree = tree[k]
  return tree


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


def quantize_kernel(kernel: jax.Array, X: jax.Array, X_tilde: jax.Array, levels: jax.Array, *,
                    feature_group_count: int = 1, method: str = "auto", mesh: Any = None,
                    data_axis: str | None = "data",
                    model_axis: str | None = "model") -> jax.Array:
  """GPFQ (Eq. 7-8) for a Dense (N0, N1) or conv HWIO kernel, returned in the same layout.

  A conv kernel is reshaped to the (Cin/G*kh*kw, Cout) matrix matching the channel-major patch
  features of `qjax.capture.conv_patches`; with G = feature_group_count groups, group g's
  outputs only see its own input channels, so each group is an independent GPFQ problem.

  Args:
    kernel: Dense (N0, N1) or conv (k1, ..., kn, Cin/G, Cout).
    X: (m, N0) float-network data (conv: G*Cin/G*k1*...*kn patch features).
    X_tilde: (m, N0) the same rows from the partially quantized network (None or X itself:
      the same data, as for the first layer).
    levels: sorted 1-D alphabet.
    feature_group_count: G.
    method: passed to `gpfq_layer`.
    mesh, data_axis, model_axis: passed to `gpfq_layer` (None: the ambient mesh, if any). A
      layer whose neurons per group do not divide over `model_axis` splits only its rows.
  """
  W = capture_lib.kernel_to_matrix(kernel)
  mesh = sharded.resolve_mesh(mesh)
  if mesh is not None and model_axis in mesh.axis_names:  # a bad axis name fails in gpfq_layer
    if (W.shape[1] // feature_group_count) % mesh.shape[model_axis]:
      model_axis = None
  same = X_tilde is None or X_tilde is X  # lets gpfq_layer skip the X~ half of the work
  blocks = []
  for rows, cols in capture_lib.group_slices(W.shape[0], W.shape[1], feature_group_count):
    x = X if feature_group_count == 1 else X[:, rows]
    x_tilde = x if same else (X_tilde if feature_group_count == 1 else X_tilde[:, rows])
    blocks.append(gpfq_layer(W[:, cols], x, x_tilde, levels, method=method, mesh=mesh,
                             data_axis=data_axis, model_axis=model_axis))
  Q = jnp.concatenate(blocks, axis=1) if len(blocks) > 1 else blocks[0]
  return capture_lib.matrix_to_kernel(Q.astype(kernel.dtype), kernel.shape)


@functools.partial(jax.jit, static_argnames=("groups",))
def _residuals(kernel: jax.Array, Q: jax.Array, X: jax.Array, X_tilde: jax.Array,
               groups: int) -> tuple[jax.Array, jax.Array]:
  """(||X W - X~ Q||^2, ||X W||^2) summed over the conv groups."""
  W, Qm = capture_lib.kernel_to_matrix(kernel), capture_lib.kernel_to_matrix(Q)
  err = ref = jnp.zeros((), jnp.float32)
  for rows, cols in capture_lib.group_slices(W.shape[0], W.shape[1], groups):
    y = jnp.matmul(X[:, rows], W[:, cols], precision=jax.lax.Precision.HIGHEST)
    y_q = jnp.matmul(X_tilde[:, rows], Qm[:, cols], precision=jax.lax.Precision.HIGHEST)
    err = err + jnp.sum((y - y_q) ** 2)
    ref = ref + jnp.sum(y ** 2)
  return err, ref


def relative_error(kernel, Q, X, X_tilde, groups: int = 1) -> float:
  """||X W - X~ Q|| / ||X W|| for a kernel in Flax layout (0 when X W = 0)."""
  err, ref = _residuals(kernel, Q, X, X_tilde, groups)
  return float(jnp.sqrt(err / ref)) if float(ref) > 0 else 0.0


def output_error(q_out: PyTree, float_out: PyTree) -> jax.Array:
  """Default held-out loss of the C search: ||f_q - f||^2 / ||f||^2 of the final outputs."""
  leaves_q, leaves_f = jax.tree_util.tree_leaves(q_out), jax.tree_util.tree_leaves(float_out)
  err = sum(jnp.sum((a - b) ** 2) for a, b in zip(leaves_q, leaves_f))
  return err / sum(jnp.sum(b ** 2) for b in leaves_f)


def bias_shift(layer: capture_lib.LayerCall, kernel: jax.Array, Q: jax.Array, x: jax.Array,
               x_tilde: jax.Array) -> jax.Array:
  """Mean quantization error of a layer's output, E[layer(x~; Q) - layer(x; W)] (Sec. 3.2.3).

  Subtracting it from the bias removes the average shift the quantization causes (bias
  correction, Banner et al. / Nagel et al., applied to the last layer in the paper). Computed by
  re-applying the layer itself (bias off) on its full inputs, so every conv option is honoured.
  """
  module = layer.module.clone(use_bias=False)
  y = module.apply({"params": {"kernel": kernel}}, x)
  y_q = module.apply({"params": {"kernel": Q}}, x_tilde)
  return jnp.mean((y_q - y).reshape(-1, y.shape[-1]), axis=0)


# ---------------------------------------------------------------------------------------------
# The driver.


@dataclasses.dataclass(frozen=True)
class _Step:
  """One layer call and what to do with it."""
  index: int
  layer: capture_lib.LayerCall
  status: str  # 'quantize', 'float', 'unsupported', 'shared'
  bits: int | None = None


def _plan(layers: Sequence[capture_lib.LayerCall], bits: Bits, skip: re.Pattern | None,
          last_layer_float: bool) -> list[_Step]:
  supported = [i for i, c in enumerate(layers) if c.kind != "unsupported"]
  seen: set[str] = set()
  steps = []
  for i, layer in enumerate(layers):
    skipped = skip is not None and skip.search(layer.path) is not None
    if layer.path in seen:
      if not skipped:
        warnings.warn(f"layer {layer.path!r} is called more than once (shared weights); it is "
                      "quantized from the inputs of its first call only",
                      UnsupportedLayerWarning, stacklevel=4)
      steps.append(_Step(i, layer, "shared"))
    elif layer.kind == "unsupported":
      if not skipped:
        warnings.warn(f"layer {layer.path!r} is left in float: {layer.reason}; pass "
                      f"skip={re.escape(layer.path)!r} to silence this",
                      UnsupportedLayerWarning, stacklevel=4)
      steps.append(_Step(i, layer, "unsupported"))
    elif skipped or (last_layer_float and i == supported[-1]):
      steps.append(_Step(i, layer, "float"))
    else:
      steps.append(_Step(i, layer, "quantize",
                         _check_bits(_bits_for(layer.path, bits), f"bits of {layer.path!r}")))
    seen.add(layer.path)
  return steps


def _layer_data_impl(float_vars, q_vars, batch, key, *, apply_fn: Callable,
                     apply_kwargs: tuple, index: int, patch_p: float, patch_stride: str,
                     rows: bool):
  """(X, X~) of layer call `index`: its inputs in the float and the partly quantized network,
  as data matrices with the same rows (`layer_rows` with the same key), or raw if not `rows`."""
  kw = dict(apply_kwargs)
  _, calls_f = capture_lib.capture(apply_fn, float_vars, batch, **kw)
  _, calls_q = capture_lib.capture(apply_fn, q_vars, batch, **kw)
  layer = calls_f[index]
  x, xt = layer.inputs, calls_q[index].inputs
  if not rows:
    return x, xt
  to_rows = functools.partial(capture_lib.layer_rows, layer, key=key, patch_p=patch_p,
                              patch_stride=patch_stride)
  return to_rows(x), to_rows(xt)


# Module-level jit: repeated calls (a C grid, several bit widths) reuse the compiled function.
_layer_data = jax.jit(_layer_data_impl, static_argnames=(
    "apply_fn", "apply_kwargs", "index", "patch_p", "patch_stride", "rows"))


def _make_data_fn(apply_fn: Callable, apply_kwargs: Mapping[str, Any], step: _Step,
                  patch_p: float, patch_stride: str, rows: bool = True) -> Callable:
  """jit: (float vars, quantized vars, batch, key) -> (X, X~) of one layer, same rows."""
  static = dict(apply_fn=apply_fn, apply_kwargs=tuple(sorted(apply_kwargs.items())),
                index=step.index, patch_p=float(patch_p), patch_stride=patch_stride, rows=rows)
  try:
    hash(tuple(static.values()))
  except TypeError:  # e.g. an unhashable kwarg value: compile for this call only
    return jax.jit(functools.partial(_layer_data_impl, **static))
  return functools.partial(_layer_data, **static)


def _quantize_network(float_vars: PyTree, batch: PyTree, steps: Sequence[_Step],
                      data_fns: Mapping[int, Callable], *, quantizer: str, C: float, rule: Rule,
                      key: jax.Array, method: str, bias_fn: Callable | None,
                      progress: bool, mesh_options: Mapping[str, Any]
                      ) -> tuple[PyTree, list[LayerRecord], float | None]:
  """Alg. 1: quantize the layers in call order, each on the inputs of the partly quantized net."""
  q_vars, records, first = float_vars, [], True
  bar = tqdm(steps, desc=f"{quantizer} C={C:g}", disable=not progress, leave=False)
  for step in bar:
    layer = step.layer
    bar.set_postfix_str(layer.path)
    base = dict(path=layer.path, module_type=layer.module_type, kernel_shape=layer.kernel_shape)
    if step.status != "quantize":
      records.append(LayerRecord(**base, status=step.status))
      continue
    start = time.perf_counter()
    keys = ("params",) + module_keys(layer.path) + ("kernel",)
    kernel = get_leaf(float_vars, keys)
    groups = layer.conv.feature_group_count if layer.conv else 1
    X, X_tilde = data_fns[step.index](float_vars, q_vars, batch,
                                      jax.random.fold_in(key, step.index))
    W = capture_lib.kernel_to_matrix(kernel)
    if not bool(jnp.any(W != 0)):  # an all-zero kernel is already on every alphabet
      Q, msq_Q, delta = kernel, kernel, 0.0
    else:
      levels, delta = alphabet(W, step.bits, C, rule)
      msq_Q = alphabets.msq(kernel, levels).astype(kernel.dtype)
      # Before the first quantized layer both networks agree: X~ is X (gpfq_layer then does
      # half the work).
      Q = msq_Q if quantizer == "msq" else quantize_kernel(
          kernel, X, X if first else X_tilde, pad_levels(levels), feature_group_count=groups,
          method=method, **mesh_options)
      first = False
    q_vars = replace_leaf(q_vars, keys, Q)
    records.append(LayerRecord(
        **base, status="quantized", bits=step.bits, delta=delta, rows=int(X.shape[0]),
        error=relative_error(kernel, Q, X, X_tilde, groups),
        msq_error=relative_error(kernel, msq_Q, X, X_tilde, groups),
        seconds=time.perf_counter() - start))
  shift = None
  if bias_fn is not None:
    q_vars, shift = bias_fn(float_vars, q_vars, batch)
  return q_vars, records, shift


def _make_bias_fn(apply_fn: Callable, apply_kwargs: Mapping[str, Any],
                  step: _Step) -> Callable:
  """(float vars, quantized vars, batch) -> (vars with the last bias corrected, ||shift||)."""
  inputs_fn = _make_data_fn(apply_fn, apply_kwargs, step, 1.0, "layer", rows=False)
  prefix = ("params",) + module_keys(step.layer.path)

  def fn(float_vars, q_vars, batch):
    x, x_tilde = inputs_fn(float_vars, q_vars, batch, None)
    shift = bias_shift(step.layer, get_leaf(float_vars, prefix + ("kernel",)),
                       get_leaf(q_vars, prefix + ("kernel",)), x, x_tilde)
    bias = get_leaf(q_vars, prefix + ("bias",))
    q_vars = replace_leaf(q_vars, prefix + ("bias",), (bias - shift).astype(bias.dtype))
    return q_vars, float(jnp.linalg.norm(shift))
  return fn


def _run(quantizer: str, variables: PyTree, apply_fn: Callable, batch: PyTree, *, bits: Bits,
         C: float | None, rule: Rule, skip: str | None, last_layer_float: bool,
         bias_correction: bool, patch_p: float, patch_stride: str, key: jax.Array | None,
         method: str, C_grid: Iterable[float] | None, holdout_fraction: float,
         holdout_loss: Callable | None, apply_kwargs: Mapping[str, Any] | None,
         progress: bool, mesh: Any = None, data_axis: str | None = "data",
         model_axis: str | None = "model") -> tuple[PyTree, Report]:
  start = time.perf_counter()
  # -- eager validation, cheapest first.
  if not callable(apply_fn):
    raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}")
  if _is_jitted(apply_fn):
    raise ValueError("apply_fn is jax.jit-wrapped: a compiled function runs no Python, so its "
                     "Dense/Conv calls cannot be intercepted; pass the plain `model.apply` "
                     "(qjax jits internally)")
  if rule not in DEFAULT_C:
    raise ValueError(f"rule must be one of {sorted(DEFAULT_C)}, got {rule!r}")
  if isinstance(bits, Mapping):
    for pattern, b in bits.items():
      _check_bits(b, f"bits[{pattern!r}]")
      if pattern != "default":
        _compile(pattern, "bits")
  else:
    _check_bits(bits, "bits")
  skip_re = None if skip is None else _compile(skip, "skip")
  C = DEFAULT_C[rule] if C is None else float(C)
  grid = None if C_grid is None else tuple(float(c) for c in C_grid)
  for c in (C,) + (grid or ()):
    if not (math.isfinite(c) and c > 0):
      raise ValueError(f"C must be finite and > 0, got {c}")
  if grid is not None and (not grid or not 0.0 < holdout_fraction < 1.0):
    raise ValueError(f"C_grid needs >= 1 value and 0 < holdout_fraction < 1, got {grid} and "
                     f"{holdout_fraction}")
  if not 0.0 < patch_p <= 1.0:
    raise ValueError(f"patch_p must be in (0, 1], got {patch_p}")
  if method not in ("auto", "scan", "gram"):
    raise ValueError(f"method must be 'auto', 'scan' or 'gram', got {method!r}")
  if patch_stride not in ("kernel", "layer"):
    raise ValueError(f"patch_stride must be 'kernel' or 'layer', got {patch_stride!r}")
  apply_kwargs = dict(apply_kwargs or {})
  key = jax.random.key(0) if key is None else key
  if not isinstance(key, jax.Array):
    raise TypeError(f"key must be a jax.random key, got {type(key).__name__}")
  variables, was_bare = _split_variables(variables)
  batch = jax.tree_util.tree_map(jnp.asarray, batch)
  n = _leading_size(batch)
  _check_finite(variables, batch)

  # -- find the layers.
  layers = _trace_layers(apply_fn, variables, batch, apply_kwargs)
  if not any(c.kind != "unsupported" for c in layers):
    found = ", ".join(f"{c.path} ({c.module_type})" for c in layers) or "no layer with a kernel"
    raise ValueError(
        f"no nn.Dense or nn.Conv call was found in apply_fn (found: {found}). Either apply_fn "
        "does not run the flax module's methods in Python (e.g. it is jitted or a compiled/"
        "exported function: pass `model.apply`), or the model uses other layer types, which "
        "GPFQ does not support")
  steps = _plan(layers, bits, skip_re, last_layer_float)
  data_fns = {s.index: _make_data_fn(apply_fn, apply_kwargs, s, patch_p, patch_stride)
              for s in steps if s.status == "quantize"}
  bias_fn = None
  if bias_correction:
    last = [s for s in steps if s.status in ("quantize", "float")][-1]
    if last.layer.use_bias:
      bias_fn = _make_bias_fn(apply_fn, apply_kwargs, last)
    else:
      warnings.warn(f"bias_correction: the last layer {last.layer.path!r} has no bias; skipped",
                    UserWarning, stacklevel=3)
  run = functools.partial(_quantize_network, steps=steps, data_fns=data_fns,
                          quantizer=quantizer, rule=rule, key=key, method=method,
                          bias_fn=bias_fn, progress=progress,
                          mesh_options=dict(mesh=mesh, data_axis=data_axis,
                                            model_axis=model_axis))

  # -- C: fixed, or grid search on a held-out tail of the batch (Sec. 3.1: "grid search").
  search = ()
  if grid is None:
    q_vars, records, shift = run(variables, batch, C=C)
  else:
    n_hold = holdout_size(n, holdout_fraction)
    if n - n_hold < 1:
      raise ValueError(f"holdout_fraction={holdout_fraction} leaves no calibration rows of {n}")
    calib = jax.tree_util.tree_map(lambda x: x[:n - n_hold], batch)
    hold = jax.tree_util.tree_map(lambda x: x[n - n_hold:], batch)
    forward = jax.jit(lambda v, b: apply_fn(v, b, **apply_kwargs))
    float_out = forward(variables, hold)
    loss_fn = output_error if holdout_loss is None else holdout_loss
    best = None
    scores = []
    for c in grid:
      result = run(variables, calib, C=c)
      loss = float(loss_fn(forward(result[0], hold), float_out))
      scores.append((c, loss))
      if best is None or loss < best[0]:
        best, C = (loss, result), c
    q_vars, records, shift = best[1]
    search = tuple(scores)

  report = Report(method=quantizer, rule=rule, C=C, layers=tuple(records), C_search=search,
                  bias_shift=shift, seconds=time.perf_counter() - start)
  return (q_vars["params"] if was_bare else q_vars), report


_COMMON_DOC = """
  Args:
    variables: a flax variables dict ({'params': ..., 'batch_stats': ...}) or a bare params
      dict. A mapping with a top-level 'params' mapping is taken as variables; anything else as
      bare params (the result then is bare params too). Non-kernel collections are kept.
    apply_fn: the plain (not jitted) `model.apply`; called as
      `apply_fn(variables, batch, **apply_kwargs)`.
    batch: calibration inputs (m examples on the leading axis), an array or pytree of arrays.
      With `C_grid` the last `holdout_fraction` of it is held out: shuffle it first.
    bits: bits per weight (1 = ternary), or {regex: bits} matched with `re.search` against
      module paths in insertion order, plus an optional 'default' entry.
    C: scale of the step (Eq. 19), default `DEFAULT_C[rule]`.
    rule: 'paper' (augmented midrise, Eq. 17-19), 'reference' (midtread, the authors' code) or
      'uniform' (with C = 1 the per-tensor grid of `qjax.quantize_uniform`, 2^b - 1 levels, e.g.
      for PSGD-trained models).
    skip: regex; layers whose module path it `re.search`es stay float.
    last_layer_float: leave the last Dense/Conv in float (Sec. 3.2.3).
    bias_correction: subtract the mean output error of the last layer from its bias (Sec. 3.2.3).
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

  Returns:
    (quantized variables, same tree structure and container types, runnable with the unchanged
    apply_fn; `Report`).

  Raises:
    ValueError: NaN/Inf in weights or batch, bits < 1, a batch that does not fit the model, no
      Dense/Conv layer found (e.g. a jitted apply_fn), bad options.
  Warns:
    UnsupportedLayerWarning: for a kernel-owning layer that is not nn.Dense/nn.Conv (left float)
      unless `skip` matches it.
"""


def gpfq(variables: PyTree, apply_fn: Callable, batch: PyTree, *, bits: Bits = 4,
         C: float | None = None, rule: Rule = "paper", skip: str | None = None,
         last_layer_float: bool = False, bias_correction: bool = False, patch_p: float = 0.25,
         patch_stride: Literal["kernel", "layer"] = "kernel", key: jax.Array | None = None,
         method: str = "auto", C_grid: Iterable[float] | None = None,
         holdout_fraction: float = 0.2, holdout_loss: Callable | None = None,
         apply_kwargs: Mapping[str, Any] | None = None, progress: bool = True,
         mesh: Any = None, data_axis: str | None = "data",
         model_axis: str | None = "model") -> tuple[PyTree, Report]:
  return _run("gpfq", variables, apply_fn, batch, bits=bits, C=C, rule=rule, skip=skip,
              last_layer_float=last_layer_float, bias_correction=bias_correction,
              patch_p=patch_p, patch_stride=patch_stride, key=key, method=method,
              C_grid=C_grid, holdout_fraction=holdout_fraction, holdout_loss=holdout_loss,
              apply_kwargs=apply_kwargs, progress=progress, mesh=mesh, data_axis=data_axis,
              model_axis=model_axis)


def quantize_msq(variables: PyTree, apply_fn: Callable, batch: PyTree, *, bits: Bits = 4,
                 C: float | None = None, rule: Rule = "paper", skip: str | None = None,
                 last_layer_float: bool = False, bias_correction: bool = False,
                 patch_p: float = 0.25, patch_stride: Literal["kernel", "layer"] = "kernel",
                 key: jax.Array | None = None, C_grid: Iterable[float] | None = None,
                 holdout_fraction: float = 0.2, holdout_loss: Callable | None = None,
                 apply_kwargs: Mapping[str, Any] | None = None,
                 progress: bool = True) -> tuple[PyTree, Report]:
  return _run("msq", variables, apply_fn, batch, bits=bits, C=C, rule=rule, skip=skip,
              last_layer_float=last_layer_float, bias_correction=bias_correction,
              patch_p=patch_p, patch_stride=patch_stride, key=key, method="auto",
              C_grid=C_grid, holdout_fraction=holdout_fraction, holdout_loss=holdout_loss,
              apply_kwargs=apply_kwargs, progress=progress)


gpfq.__doc__ = """Quantize a linen model with GPFQ, layer by layer in call order (seed 003, Alg. 1).

  For layer i, X comes from the float network and X~ from the network with layers < i already
  quantized, both on `batch`; each neuron (kernel column) q is chosen greedily by Eq. (7)-(8) so
  that X~ q tracks X w. Conv layers use vectorized patches (Sec. 2.3); the alphabet per layer is
  the augmented midrise of Eq. (17)-(19) ('paper') or the reference code's midtread.
""" + _COMMON_DOC

quantize_msq.__doc__ = """Round every layer onto the same alphabets as `gpfq` (MSQ, Eq. 5), no
  data used for the weights; the batch only feeds the report's errors (and the C search).
""" + _COMMON_DOC
