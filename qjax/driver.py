"""The one-pass driver: any JAX function, float and quantized streams in lockstep, a stop per layer.

`run(params, apply_fn, batch, quantize_layer, ...)` traces `apply_fn(params, batch)` once
(`qjax.program`), then evaluates the program twice side by side: the *float stream* with the
original params and the *quantized stream* with the params quantized so far. At each weight op
(a "stop", in program order) X is the float stream's data operand and X~ the quantized stream's,
the layer's quantizer is called, and the quantized stream continues with its Q. This is the
sequential scheme of GPFQ (Zhang, Zhou & Saab, "Post-training quantization for neural networks
with provable guarantees", Alg. 1) and of GPTQ / OPTQ (Frantar et al., Sec. 3, "sequential"
inputs): two forward passes in all, whatever the depth. The work between two stops runs as one
jitted program segment (compiled once, reused by both streams, every calibration batch and
every later call with the same program; segments that are the same computation, e.g. the
identical blocks of a deep model, share one compiled function). Between stops nothing waits on
the host: the report's error diagnostics stay on the device until the end of the pass.

The quantizer interface (GPFQ, MSQ and GPTQ are all such functions)
---------------------------------------------------------------------

    quantize_layer(name: str, W: Array (N0, N1), chunks: Chunks, info: LayerInfo)
        -> Q  or  (Q, extras: dict)

* `name`: the layer's name, the parameter's pytree path (`qjax.rules.path_name`, e.g.
  'block1/Conv_0', 'encoder/layers_0/attention/query', 'w1'); a scan-stacked layer's slice i is
  'name[i]'.
* `W`: the float weight as a matrix (N0 inputs, N1 neurons), neurons as columns (Flax layout):
  the weight's contracting dims flattened x its free dims flattened; for a conv
  (Cin/G * k1 * ... * kn, Cout) with rows channel-major (Cin, k1, ..., kn). With G independent
  problems (`info.groups`: conv feature groups, dot_general batch dims of the weight, e.g. per
  expert) they sit side by side: W (N0, G*N1g), problem g owns columns [g*N1g, (g+1)*N1g) and
  data columns [g*N0, (g+1)*N0) (`info.group_slices()`). Float32 unless the weight is wider.
* `chunks`: a re-iterable, `len(chunks)` = number of calibration batches, of pairs
  (X, X_tilde), each (m_i, G*N0): the layer's input in the float stream and in the quantized
  stream, on the same rows (conv: the same sampled patches, `info.key`). `X_tilde is X` when the
  quantized stream has not diverged from the float one at this layer (nothing before it was
  quantized), so a quantizer may skip the X~ half of its work. Rows are computed on demand;
  iterate once per pass you need (e.g. Grams H = sum X~^T X~ and G = sum X~^T X over chunks:
  memory O(N0^2) whatever the calibration size).
* `info`: `LayerInfo`: index (program order; the patch key is `fold_in(key, index)`), name,
  op ('dot_general' or 'conv'), weight_shape, groups, bits (from the `bits` rules, None when
  the caller gave none), rows (total m), same (X~ is X), key, reduce_chunks (None, or the
  run's C: sum statistics over rows with `qjax.mesh.exact_tmm`), and helpers `group_slices()`
  and `error(Q)` = ||X W - X~ Q||_F / ||X W||_F over all chunks.
* Return Q with W's shape (any float dtype; cast back to the weight's dtype by the driver), or
  (Q, extras) where extras are `LayerRecord` fields to fill in (e.g. {'delta': 0.01,
  'msq_error': 0.2}).

The driver writes Q back into the parameter leaf (through the same layout ops that made the
operand, so a transposed or cast kernel, a DenseGeneral (D, H, Dh) kernel or slice i of a scan
stack all land in place), keeps the caller's containers, and returns a `Report`.

What is not quantized is reported, never dropped: weight ops inside `while`/`cond` bodies
(status 'unsupported', with the reason, and an `UnsupportedLayerWarning`); a weight op whose
weight was already quantized at an earlier op (tied embeddings, a module called twice): status
'shared', it uses Q from the first op; parameters used only in other ways (an embedding gather,
an elementwise scale) stay float and are listed in `Report.other_params` with the primitive that
used them.

Calibration data is one batch (an array or any pytree of arrays, examples on the leading axis)
or a `list` / iterator of equally shaped batches; at each stop the quantizer sees one chunk per
batch. All batches advance together (a stop needs every batch's X), so the memory held between
stops is the live activations of every batch in both streams; the compute is still two forward
passes per batch.
"""
from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from qjax import activations
from qjax import mesh as mesh_lib
from qjax import program as program_lib
from qjax import rules

PyTree = Any
QuantizeLayer = Callable[..., Any]


class UnsupportedLayerWarning(UserWarning):
  """A weight op that cannot be quantized (left in float), e.g. inside a `lax.while_loop`."""


# ---------------------------------------------------------------------------------------------
# Report.


@dataclasses.dataclass(frozen=True)
class LayerRecord:
  """What happened at one weight op.

  Attributes:
    path: the layer's name (parameter path, e.g. 'block1/Conv_0'; 'name[i]' in a scan).
    op: 'dot_general' or 'conv'.
    kernel_shape: shape of the weight operand (the parameter leaf, or its scan slice).
    status: 'quantized', 'float' (skip pattern / last layer), 'unsupported' (with `reason`) or
      'shared' (its weight was quantized at an earlier op).
    bits: bits of the alphabet (None when not quantized).
    delta: step size of the alphabet (quantizer-specific).
    rows: m, rows of the data matrix X over all calibration batches (conv: sampled patches).
    error: ||X W - X~ Q|| / ||X W|| for the Q this run produced.
    msq_error: the same with Q = MSQ(W) (plain rounding onto the same alphabet), same X, X~.
    seconds: wall time for this layer (data, quantization, errors).
    sparsity: fraction of exact zeros in Q (None when the quantizer does not report it).
    reason: why a layer is not quantized, or a note (e.g. the weight's other uses).
  """
  path: str
  op: str
  kernel_shape: tuple[int, ...]
  status: str
  bits: int | None = None
  delta: float | None = None
  rows: int | None = None
  error: float | None = None
  msq_error: float | None = None
  seconds: float = 0.0
  reason: str = ""
  sparsity: float | None = None


@dataclasses.dataclass(frozen=True)
class Report:
  """Per-layer records plus the choices made; `str(report)` is a table (`format_report`).

  Attributes:
    method: e.g. 'gpfq', 'msq', 'gptq'.
    rule: step-size rule of the alphabets (None when not applicable).
    C: the C used (chosen by grid search when a grid was given; None when not applicable).
    layers: one record per weight op, in program order.
    C_search: (C, held-out loss) per grid value; empty without a grid.
    bias_shift: ||b_new - b_old|| of the last layer's bias (None: no bias correction).
    seconds: total wall time.
    forward_passes: program evaluations run (a stream over one calibration batch counts one).
    quantizer_seconds: wall time inside the per-layer quantizers (the rest is forward passes,
      data matrices, the `error` diagnostics and bookkeeping).
    error_seconds: wall time of the driver's `error` diagnostics outside the streams (a conv
      layer's two products on its sampled rows, and the one transfer that fetches every
      layer's at the end); a dot_general layer's come from the two streams' own outputs of the
      op inside the streams' segment calls, so their time counts there.
    other_params: (name, reason) of parameters that are not a weight op's weight or bias.
    act_scales: with a static `act=` spec, the activation scales used, by layer name
      ({name: {'scale', 'zero'}}, calibrated on the quantized stream; for
      `qjax.with_activation_quant(..., scales=)` and `qjax.export.pack(..., act=)`).
    damp: the damping used by `qjax.qronos` (chosen by its damp search when given; None
      elsewhere); C_search then holds (damp, held-out loss).
    segment_bytes: with `memory=True` (`qjax.plan_segments`), (segment, peak bytes per
      device) of each segment of both streams, from XLA's compiled memory analysis on the
      inputs' shardings (arguments + outputs + temporaries - aliased); empty otherwise.
  """
  method: str
  rule: str | None
  C: float | None
  layers: tuple[LayerRecord, ...]
  C_search: tuple[tuple[float, float], ...] = ()
  bias_shift: float | None = None
  seconds: float = 0.0
  forward_passes: int = 0
  quantizer_seconds: float = 0.0
  error_seconds: float = 0.0
  other_params: tuple[tuple[str, str], ...] = ()
  act_scales: Mapping[str, Any] | None = None
  damp: float | None = None
  segment_bytes: tuple[tuple[str, int], ...] = ()

  def __str__(self) -> str:
    return format_report(self)


def format_report(report: Report) -> str:
  """The report as a fixed-width text table, one row per weight op."""
  width = max([24] + [len(r.path) for r in report.layers])
  head = (f"{'layer':<{width}} {'op':<6} {'kernel':<16} {'status':<11} {'bits':>4} "
          f"{'delta':>9} {'rows':>7} {'err':>8} {'msq err':>8} {'sparse':>6} {'sec':>6}")
  title = report.method.upper()
  if report.rule is not None:
    title += f"  rule={report.rule}"
  if report.C is not None:
    title += f"  C={report.C:g}"
  if report.damp is not None:
    title += f"  damp={report.damp:g}"
  lines = [title, head, "-" * len(head)]
  fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
  for r in report.layers:
    op = "conv" if r.op == "conv" else "dot"
    line = (f"{r.path:<{width}} {op:<6} {'x'.join(map(str, r.kernel_shape)):<16} "
            f"{r.status:<11} {fmt(r.bits, 'd'):>4} {fmt(r.delta, '.3g'):>9} "
            f"{fmt(r.rows, 'd'):>7} {fmt(r.error, '.4f'):>8} {fmt(r.msq_error, '.4f'):>8} "
            f"{fmt(r.sparsity, '.3f'):>6} {r.seconds:6.2f}")
    lines.append(line + (f"  ({r.reason})" if r.reason else ""))
  for name, reason in report.other_params:
    lines.append(f"{name:<{width}} stays float: {reason}")
  if report.C_search:
    what = "damp" if report.damp is not None else "C"
    lines.append(f"{what} search (held-out loss): " + ", ".join(
        f"{c:g}: {loss:.4g}" for c, loss in report.C_search))
  if report.bias_shift is not None:
    lines.append(f"bias correction on the last layer: ||shift|| = {report.bias_shift:.4g}")
  lines.append(f"total {report.seconds:.2f} s ({report.quantizer_seconds:.2f} s in quantizers, "
               f"{report.error_seconds:.2f} s in error diagnostics), {report.forward_passes} "
               "forward passes")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The quantizer's view of a layer.


class Chunks:
  """(X, X~) pairs of one layer, one per calibration batch, computed on demand (re-iterable)."""

  def __init__(self, makers: Sequence[Callable[[], tuple[jax.Array, jax.Array]]]):
    self._makers = list(makers)
    self._cache = None

  def __len__(self) -> int:
    return len(self._makers)

  def __iter__(self) -> Iterator[tuple[jax.Array, jax.Array]]:
    if self._cache is not None:
      yield from self._cache
      return
    if len(self._makers) == 1:  # one batch: keep it (quantizer + error read it)
      self._cache = [self._makers[0]()]
      yield from self._cache
      return
    for make in self._makers:
      yield make()


@functools.partial(jax.jit, static_argnames=("groups",))
def _residuals(W, Q, X, X_tilde, groups: int) -> tuple[jax.Array, jax.Array]:
  """(||X W - X~ Q||^2, ||X W||^2) summed over the groups."""
  err = ref = jnp.zeros((), jnp.float32)
  W, Q = W.astype(jnp.float32), Q.astype(jnp.float32)
  X, X_tilde = X.astype(jnp.float32), X_tilde.astype(jnp.float32)
  for rows, cols in program_lib.group_slices(X.shape[1] // groups, W.shape[1], groups):
    y = jnp.matmul(X[:, rows], W[:, cols], precision=jax.lax.Precision.HIGHEST)
    y_q = jnp.matmul(X_tilde[:, rows], Q[:, cols], precision=jax.lax.Precision.HIGHEST)
    err = err + jnp.sum((y - y_q) ** 2)
    ref = ref + jnp.sum(y ** 2)
  return err, ref


@jax.jit
def _output_residuals(y, y_tilde) -> tuple[jax.Array, jax.Array]:
  """(||y - y~||^2, ||y||^2) of a weight op's outputs y = X W, y~ = X~ Q in the two streams:
  the `_residuals` of a dot_general layer (all its rows, groups included) without recomputing
  the two products."""
  y, y_tilde = y.astype(jnp.float32), y_tilde.astype(jnp.float32)
  return jnp.sum((y - y_tilde) ** 2), jnp.sum(y ** 2)


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """What a quantizer may want to know about the layer at a stop (see the module docstring)."""
  index: int
  name: str
  op: str
  weight_shape: tuple[int, ...]
  groups: int
  bits: int | None
  rows: int
  same: bool
  key: jax.Array | None
  W: jax.Array = dataclasses.field(repr=False)
  chunks: Chunks = dataclasses.field(repr=False)
  leaf_shape: tuple[int, ...] = ()
  prov: program_lib.Prov | None = dataclasses.field(default=None, repr=False)
  layout: program_lib.MatrixLayout | None = dataclasses.field(default=None, repr=False)
  reduce_chunks: int | None = None  # the run's deterministic-reduction chunks (`run`)

  def leaf_index(self) -> np.ndarray:
    """(N0, N1) int64: the flat index into the parameter leaf (shape `leaf_shape`) of every
    entry of W, so W == leaf.reshape(-1)[leaf_index()] (a scan slice covers part of the leaf)."""
    return program_lib.leaf_index(self.leaf_shape, self.prov, self.layout)

  def group_slices(self) -> list[tuple[slice, slice]]:
    """(data columns, W columns) of each of the `groups` independent problems."""
    return program_lib.group_slices(self.W.shape[0], self.W.shape[1], self.groups)

  def error(self, Q: jax.Array) -> float:
    """||X W - X~ Q||_F / ||X W||_F over all chunks (0 when X W = 0)."""
    return _relative_error(jax.device_get(self.residuals(Q)))

  def residuals(self, Q: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
    """(||X W - X~ Q||^2, ||X W||^2) per chunk, left on the device (no host sync): the driver
    gathers every layer's at the end of the pass (`_relative_error` of the fetched list)."""
    return [_residuals(self.W, Q, x, xt, self.groups) for x, xt in self.chunks]


def _relative_error(residuals: Sequence[tuple[Any, Any]]) -> float:
  """sqrt(sum err / sum ref) of per-chunk residuals fetched to the host (float64 sums)."""
  err = ref = 0.0
  for e, r in residuals:
    err, ref = err + float(e), ref + float(r)
  return float(np.sqrt(err / ref)) if ref > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# Validation and preparation (eager).


def _keys_str(path) -> str:
  return "/".join(rules.key_name(k) for k in path)


def _nonfinite(leaves: Sequence[Any]) -> list[int]:
  """NaN/Inf count of each float leaf (0 for the others). A jax.Array is reduced on its own
  devices and only the scalar is fetched: a global array split over hosts (multi-host) cannot
  be read whole with np.asarray, but a reduction's replicated scalar is addressable
  everywhere (and nothing is copied to the host). The count runs only when the all-finite
  check fails."""
  ok = []
  for leaf in leaves:
    dtype = getattr(leaf, "dtype", None)  # not `or`: a dtype's len() is 0
    dtype = np.asarray(leaf).dtype if dtype is None else dtype
    if not jnp.issubdtype(dtype, jnp.inexact):  # jnp's: bfloat16 is inexact too
      ok.append(True)
    elif isinstance(leaf, jax.Array):
      ok.append(jnp.isfinite(leaf).all())
    else:
      ok.append(bool(np.isfinite(np.asarray(leaf)).all()))
  ok = jax.device_get(ok)
  return [0 if good else int(jnp.sum(~jnp.isfinite(leaf)) if isinstance(leaf, jax.Array)
                             else (~np.isfinite(np.asarray(leaf))).sum())
          for leaf, good in zip(leaves, ok)]


def check_finite(params: PyTree, batches: Sequence[PyTree]) -> None:
  """ValueError naming the leaf when params or a batch holds NaN/Inf."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for (path, _), bad in zip(flat, _nonfinite([leaf for _, leaf in flat])):
    if bad:
      raise ValueError(f"layer {rules.path_name(program_lib.strip_value(path))!r}: "
                       f"{_keys_str(path)} contains {bad} NaN/Inf "
                       "values; quantize a model with finite weights")
  for i, batch in enumerate(batches):
    flat = jax.tree_util.tree_flatten_with_path(batch)[0]
    for (path, _), bad in zip(flat, _nonfinite([leaf for _, leaf in flat])):
      if bad:
        where = _keys_str(path) or "the batch array"
        which = f" {i}" if len(batches) > 1 else ""
        raise ValueError(f"batch{which} contains {bad} NaN/Inf "
                         f"values (in {where}); calibration data must be finite")


def _is_batch_iterable(batch: Any) -> bool:
  """A list, iterator or generator of batches (tuples, dicts and arrays are one batch)."""
  if isinstance(batch, (tuple, Mapping)) or hasattr(batch, "shape"):
    return False
  return isinstance(batch, list) or isinstance(batch, Iterator) or (
      isinstance(batch, Iterable) and not isinstance(batch, (str, bytes)))


def leading_size(batch: PyTree) -> int:
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree_util.tree_leaves(batch)}
  if not sizes:
    raise ValueError("the calibration batch has no arrays")
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f"batch leaves need one shared leading (example) axis, got sizes {sizes}")
  return sizes.pop()


def as_batches(batch: Any) -> list[PyTree]:
  """The calibration data as a non-empty list of equally shaped pytree batches."""
  items = list(batch) if _is_batch_iterable(batch) else [batch]
  if not items:
    raise ValueError("batch is an empty iterable: pass at least one calibration batch")
  items = [jax.tree_util.tree_map(jnp.asarray, b) for b in items]
  shapes = [jax.tree_util.tree_map(np.shape, b) for b in items]
  for i, b in enumerate(items):
    if leading_size(b) == 0:
      raise ValueError(f"the calibration batch{f' {i}' if len(items) > 1 else ''} is empty (0 "
                       "examples); pass at least one example")
    if shapes[i] != shapes[0]:
      raise ValueError(f"calibration batches must share one shape (the program is traced "
                       f"once); batch 0 has {shapes[0]}, batch {i} has {shapes[i]}")
  return items


def _is_linen_apply(apply_fn: Any) -> bool:
  while isinstance(apply_fn, functools.partial):
    apply_fn = apply_fn.func
  return isinstance(getattr(apply_fn, "__self__", None), nn.Module)


@dataclasses.dataclass
class Prepared:
  """A traced program with its batches, reusable across quantizer runs (e.g. a C grid)."""
  program: program_lib.Program
  params: PyTree
  batches: list
  wrapped: bool  # bare linen params were wrapped as {'params': ...}
  fn: Callable


def prepare(params: PyTree, apply_fn: Callable, batch: Any,
            apply_kwargs: Mapping[str, Any] | None = None) -> Prepared:
  """Validate the inputs and trace `apply_fn(params, batch, **apply_kwargs)` once."""
  if not callable(apply_fn):
    raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}")
  apply_kwargs = dict(apply_kwargs or {})
  wrapped = (_is_linen_apply(apply_fn) and isinstance(params, Mapping)
             and not isinstance(params.get("params"), Mapping))
  if wrapped:  # bare linen params: model.apply wants a variables dict
    params = {"params": params}
  batches = as_batches(batch)
  check_finite(params, batches)
  fn = functools.partial(apply_fn, **apply_kwargs) if apply_kwargs else apply_fn
  try:
    traced = program_lib.make_jaxpr(fn, params, batches[0])
  except (TypeError, ValueError, IndexError, AttributeError, KeyError,
          flax.errors.FlaxError) as e:
    shape = jax.tree_util.tree_map(np.shape, batches[0])
    hint = ""
    if isinstance(batches[0], (tuple, list)) and len(batches[0]) == 2:
      hint = (" The batch is a pair: if it is (inputs, labels), pass the inputs only; "
              "calibration needs no labels.")
    raise ValueError(
        f"the batch (shape {shape}) does not fit apply_fn (or the params / apply_kwargs do "
        f"not): apply_fn(params, batch, **{apply_kwargs}) raised {type(e).__name__}: {e}\n"
        "Pass exactly the input the model takes (e.g. (B, 28, 28, 1) images for LeNet5) and "
        f"keyword arguments via apply_kwargs.{hint}") from e
  program = program_lib.trace(fn, params, batches[0], traced)
  if not program.stops:
    used = _used_leaves(program)
    if not used:
      raise ValueError(
          "apply_fn's output does not depend on any parameter of `params` (no parameter leaf "
          "is used by the traced program): check that apply_fn(params, batch) uses its first "
          "argument, e.g. `lambda p, x: model.apply(p, x)`, not a closure over other weights")
    found = ", ".join(f"{program.leaf_names[i]} ({'/'.join(u)})"
                      for i, u in program.other_uses.items()) or "none"
    raise ValueError(
        "no weight op found: no dot_general or conv_general_dilated takes a parameter as an "
        f"operand. Parameters are used by: {found}")
  return Prepared(program, params, batches, wrapped, fn)


def _used_leaves(program: program_lib.Program) -> set[int]:
  jaxpr = program.closed.jaxpr
  used = {v for e in jaxpr.eqns for v in e.invars if isinstance(v, jcore.Var)}
  used |= {v for v in jaxpr.outvars if isinstance(v, jcore.Var)}
  return {i for i, pos in enumerate(program.leaf_invar) if jaxpr.invars[pos] in used}


# ---------------------------------------------------------------------------------------------
# The plan: what to do at each stop.


@dataclasses.dataclass(frozen=True)
class _Step:
  status: str  # 'quantize', 'float', 'shared', 'unsupported'
  bits: int | None = None
  reason: str = ""


def plan_steps(program: program_lib.Program, bits: Any, skip: str | None,
               last_layer_float: bool) -> list[_Step]:
  """Status and bits of every stop; bits and skip through `qjax.rules`."""
  stops = program.stops
  owner: dict[tuple, int] = {}
  ok = []
  for op in stops:
    if op.status != "ok":
      continue
    k = (op.leaf, op.prov.slice_key)
    if k not in owner:
      owner[k] = op.index
      ok.append(op)
  names = [op.name for op in stops]
  skipped = set()
  if skip is not None:
    hits = rules.resolve({skip: True}, names, what="skip", default=False)
    skipped = {n for n, v in hits.items() if v}
  bits_of = {}
  if bits is not None:
    bits_of = rules.resolve(bits, [op.name for op in ok], what="bits",
                            check_value=rules.check_bits)
  last = ok[-1].index if ok else None
  steps = []
  for op in stops:
    other = program.other_uses.get(op.leaf)
    note = f"the weight is also used by {', '.join(other)}" if other else ""
    if op.status != "ok":
      if op.name not in skipped:
        warnings.warn(f"layer {op.name!r} is left in float: {op.reason}; pass "
                      f"skip={op.name!r} to silence this", UnsupportedLayerWarning,
                      stacklevel=4)
      steps.append(_Step("unsupported", reason=op.reason))
    elif owner[(op.leaf, op.prov.slice_key)] != op.index:
      steps.append(_Step("shared", reason=f"uses the weight of layer "
                         f"{stops[owner[(op.leaf, op.prov.slice_key)]].name!r} (quantized at "
                         "its first use)"))
    elif op.name in skipped or (last_layer_float and op.index == last):
      steps.append(_Step("float", reason=note))
    else:
      steps.append(_Step("quantize", bits_of.get(op.name), reason=note))
  return steps


def _other_params(program: program_lib.Program) -> tuple[tuple[str, str], ...]:
  with_stops = {op.leaf for op in program.stops}
  out = []
  for leaf, uses in program.other_uses.items():
    if leaf in with_stops:
      out.append((program.leaf_names[leaf], f"used by {', '.join(uses)}: sees the quantized "
                  "weight in the returned params (the calibration streams used float there)"))
    elif leaf not in program.biases:
      out.append((program.leaf_names[leaf], f"used by {', '.join(uses)}, not a matrix product"))
  return tuple(out)


# ---------------------------------------------------------------------------------------------
# The lockstep interpreter.


def _read(env: dict, v) -> Any:
  return v.val if isinstance(v, jcore.Literal) else env[v]


def _last_use(program: program_lib.Program, jaxpr) -> dict:
  cached = program.last_use.get(id(jaxpr))
  if cached is None:
    cached = {}
    for k, eqn in enumerate(jaxpr.eqns):
      for v in eqn.invars:
        if isinstance(v, jcore.Var):
          cached[v] = k
    for v in jaxpr.outvars:
      if isinstance(v, jcore.Var):
        cached[v] = len(jaxpr.eqns)
    program.last_use[id(jaxpr)] = (jaxpr, cached)  # keep jaxpr alive: ids stay unique
    return cached
  return cached[1]


def _segment(program: program_lib.Program, jaxpr, start: int, stop: int, errs: tuple = (),
             whole: tuple | None = None):
  """(single fn, pair fn, input vars, output vars) of eqns[start:stop] (cached per program).

  `single(*ins)` runs the segment for one stream; `pair(ins_f, ins_q)` runs it for both streams
  in one dispatch and also returns `_output_residuals` of the two values of each variable in
  `errs` (outputs of weight ops in the segment), so a stop costs one dispatch, not four.
  `whole` = (input positions, a replicated NamedSharding): those inputs (split weights) are
  constrained whole onto every device inside the segment (`run`'s `reduce_chunks`).

  Segments that are the same computation (the blocks of a deep model: same primitives, params,
  shapes and wiring, so the same printed jaxpr) share their jitted functions, hence one compile
  per distinct segment rather than one per layer; the same program compiles to the same
  executable, so sharing changes no value.
  """
  key = (id(jaxpr), start, stop, errs) + (() if whole is None else (whole,))
  hit = program.segments.get(key)
  if hit is not None:
    return hit[1:]
  eqns = jaxpr.eqns[start:stop]
  defined, ins = set(), []
  for eqn in eqns:
    for v in eqn.invars:
      if isinstance(v, jcore.Var) and v not in defined and v not in ins:
        ins.append(v)
    defined.update(v for v in eqn.outvars if not isinstance(v, jcore.DropVar))
  last = _last_use(program, jaxpr)
  outs = [v for eqn in eqns for v in eqn.outvars
          if not isinstance(v, jcore.DropVar) and last.get(v, -1) >= stop]
  n_out = len(outs)
  sub_outs = outs + [v for v in dict.fromkeys(errs) if v not in outs]
  err_pos = tuple(sub_outs.index(v) for v in errs)
  effects = frozenset().union(*(eqn.effects for eqn in eqns))
  info = jcore.DebugInfo("qjax.driver segment", f"eqns {start}:{stop}",
                         tuple(f"in{i}" for i in range(len(ins))),
                         tuple(f"out{i}" for i in range(len(sub_outs))))
  sub = jcore.Jaxpr([], ins, sub_outs, eqns, effects, info)
  shared = program.segments.setdefault("by_text", {})
  try:
    text = None if effects else (str(sub), err_pos) + (() if whole is None else (whole,))
  except Exception:  # noqa: BLE001 -- an unprintable param: no sharing, still correct
    text = None
  fns = shared.get(text) if text is not None else None
  if fns is None:
    fn = jcore.jaxpr_as_fun(jcore.ClosedJaxpr(sub, []))
    if whole is not None:
      fn = functools.partial(_whole_weights, fn, *whole)

    def single(*args):
      return fn(*args)[:n_out]

    def pair(args_f, args_q):
      out_f, out_q = fn(*args_f), fn(*args_q)
      res = [_output_residuals(out_f[i], out_q[i]) for i in err_pos]
      return out_f[:n_out], out_q[:n_out], res

    fns = (jax.jit(single), jax.jit(pair))
    if text is not None:
      shared[text] = fns
  program.segments[key] = (jaxpr, *fns, ins, outs)
  return (*fns, ins, outs)


def _whole_weights(fn: Callable, positions: tuple[int, ...], sharding: NamedSharding, *args):
  """`fn(*args)` with the args at `positions` constrained to `sharding` (replicated): XLA
  all-gathers each split weight before its product, so no product sums partials across the
  model axis (FSDP style: one segment's weights whole at a time, the params split at rest)."""
  return fn(*[jax.lax.with_sharding_constraint(a, sharding) if i in positions else a
              for i, a in enumerate(args)])


def _peak_bytes(fn, *args) -> int:
  """Peak bytes per device XLA plans for the jitted `fn(*args)` (compiled, not run)."""
  m = fn.lower(*args).compile().memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def _ready(eqn, env: dict) -> bool:
  """Every operand of `eqn` has a value in `env`."""
  return all(isinstance(v, jcore.Literal) or v in env for v in eqn.invars)


def _dying(program: program_lib.Program, jaxpr) -> dict:
  """Variables of `jaxpr` grouped by the position of their last use (-1: never used)."""
  key = ("dying", id(jaxpr))
  hit = program.segments.get(key)
  if hit is None:
    by_pos: dict[int, list] = {}
    last = _last_use(program, jaxpr)
    for v in list(jaxpr.constvars) + list(jaxpr.invars):
      if v not in last:
        by_pos.setdefault(-1, []).append(v)
    for v, k in last.items():
      by_pos.setdefault(k, []).append(v)
    hit = program.segments[key] = (jaxpr, by_pos)
  return hit[1]


def _by_leaf(program: program_lib.Program, plan: program_lib.FramePlan) -> dict:
  """leaf -> [(var, steps)] of the variables of `plan` made from that leaf (cached)."""
  key = ("by_leaf", id(plan))
  hit = program.segments.get(key)
  if hit is None:
    out: dict[int, list] = {}
    for var, prov in plan.prov.items():
      out.setdefault(prov.leaf, []).append((var, prov.steps))
    hit = program.segments[key] = (plan, out)
  return hit[1]


@functools.partial(jax.jit, static_argnames=("layout",))
def _dot_rows_pair(x, x_tilde, layout):
  return program_lib.dot_rows(x, layout), program_lib.dot_rows(x_tilde, layout)


@functools.partial(jax.jit, static_argnames=("spec", "patch_p", "patch_stride"))
def _conv_rows_pair(x, x_tilde, key, spec, patch_p, patch_stride):
  return (program_lib.conv_rows(x, key, spec, patch_p, patch_stride),
          program_lib.conv_rows(x_tilde, key, spec, patch_p, patch_stride))


_fold_in_many = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(None, 0)))


class _Lockstep:
  """Evaluates the program for the float and the quantized params, stopping at weight ops.

  Per stop the work outside the quantizer is a few dispatches (the two streams' segments, the
  rows of X and X~ in one call, the residuals of the error diagnostics) and no host sync: the
  diagnostics stay on the device until `finish` fetches them all at once.
  """

  def __init__(self, prep: Prepared, steps: Sequence[_Step], quantize_layer: QuantizeLayer,
               *, key: jax.Array, patch_p: float, patch_stride: str,
               bias_correction: bool, progress: Any, act: Any = None,
               act_scales: Mapping[str, Any] | None = None, memory: bool = False,
               reduce_chunks: int | None = None):
    self.prep, self.program = prep, prep.program
    self.reduce_chunks = reduce_chunks
    self.segment_memory = [] if memory else None  # (label, bytes) per segment run
    # Activation quantization: {stop index: ActSpec}; the quantized stream's input of those
    # stops is fake-quantized (`act_x`: per batch, for the stop being handled).
    self.act = activations.resolve(act, self.program)
    self.act_keys = activations.op_keys(self.program)
    self.act_scales = dict(act_scales or {})
    self.act_x: dict[int, list] = {}
    self.steps, self.quantize_layer = steps, quantize_layer
    self.key, self.patch_p, self.patch_stride = key, patch_p, patch_stride
    n = len(self.program.stops)
    # fold_in(key, i) of every stop in one call (the same bits as n separate calls).
    self.keys = list(_fold_in_many(key, jnp.arange(n, dtype=jnp.uint32))) if any(
        s.status == "quantize" for s in steps) else []
    self.store = list(self.program.leaves)  # current quantized-stream value of each leaf
    self.stack: list[tuple] = []
    self.last_rows: tuple | None = None  # (x, x~, layout, rows) of the last dot stop (1 batch)
    self.records: dict[int, LayerRecord] = {}
    self.pending: dict[int, tuple[list, float]] = {}  # index -> (device residuals, seconds)
    self.quantizer_seconds = 0.0
    self.error_seconds = 0.0
    self.bias_shift = None
    self.progress = progress if progress is not None and not progress.disable else None
    self.bias_stop = None
    if bias_correction:
      last = [op for op, s in zip(self.program.stops, steps) if s.status in ("quantize", "float")]
      if last:
        if last[-1].bias is None:
          warnings.warn(f"bias_correction: the last layer {last[-1].name!r} has no bias (no "
                        "parameter is added to its output); skipped", UserWarning,
                        stacklevel=4)
        else:
          self.bias_stop = last[-1].index

  # -- frames ----------------------------------------------------------------------------------

  def run(self) -> list:
    prog = self.program
    flat_in = []
    for batch in self.prep.batches:
      flat = jax.tree_util.tree_leaves((self.prep.params, batch))
      flat_in.append(flat)
    outs_f, outs_q = self.frame(prog.plan, flat_in, [list(f) for f in flat_in])
    self.finish()
    return outs_q

  def finish(self) -> None:
    """Fetch every layer's error residuals in one transfer and fill in the records."""
    if not self.pending:
      return
    start = time.perf_counter()
    # Scalars of jitted reductions: replicated, so readable on every host of a multi-host run.
    fetched = jax.device_get({i: res for i, (res, _) in self.pending.items()})
    spent = time.perf_counter() - start
    self.error_seconds += spent
    share = spent / len(fetched)
    for i, res in fetched.items():
      rec = self.records[i]
      error = _relative_error(res)
      if not np.isfinite(error):  # ||XW||^2 or the residual overflowed: the layer is not checked
        raise ValueError(f"layer {rec.path!r}: its error ||XW - X~Q|| / ||XW|| is {error}: the "
                         "weights or the layer's inputs are too large for float32; rescale them")
      self.records[i] = dataclasses.replace(rec, error=error, seconds=rec.seconds + share)
    self.pending.clear()

  def frame(self, plan: program_lib.FramePlan, in_f: list, in_q: list) -> tuple[list, list]:
    jaxpr = plan.jaxpr
    envs_f, envs_q = [], []
    for vals_f, vals_q in zip(in_f, in_q):
      consts = dict(zip(jaxpr.constvars, plan.consts))
      envs_f.append({**consts, **dict(zip(jaxpr.invars, vals_f))})
      envs_q.append({**consts, **dict(zip(jaxpr.invars, vals_q))})
    self.stack.append((plan, envs_f, envs_q))
    dying = _dying(self.program, jaxpr)
    self._free(envs_f + envs_q, dying, -1, 0)
    freed = 0  # variables whose last use is before `freed` are gone
    pos = 0
    errs = []  # (op, its output var): layers whose error the next segment computes
    for k in sorted(plan.points) + [len(jaxpr.eqns)]:
      # A stop whose operands exist already (q/k/v projections of one input) needs no segment
      # first: eqns[pos:k] run later in one segment, with fewer dispatches.
      if k > pos and not (k < len(jaxpr.eqns) and plan.points[k][0] == "stop"
                          and plan.points[k][1].index not in self.act
                          and _ready(jaxpr.eqns[k], envs_f[0])):
        self.segment(jaxpr, pos, k, envs_f, envs_q, errs)
        errs = []
        self._free(envs_f + envs_q, dying, freed, k)
        freed = pos = k
      if k == len(jaxpr.eqns):
        break
      kind, what = plan.points[k]
      eqn = jaxpr.eqns[k]
      if kind == "stop" and what.index in self.act:
        # The quantized stream's op reads its fake-quantized input (other readers of the same
        # variable, e.g. a residual add, keep the unquantized one): the op runs here.
        self.act_input(what, envs_q)
        self.stop(what, envs_f, envs_q)
        side = what.layout.side
        for env_f, env_q, xt in zip(envs_f, envs_q, self.act_x.pop(what.index)):
          for env, x in ((env_f, _read(env_f, eqn.invars[1 - side])), (env_q, xt)):
            args = [x, _read(env, eqn.invars[side])][::1 if side == 1 else -1]
            if not isinstance(eqn.outvars[0], jcore.DropVar):
              env[eqn.outvars[0]] = eqn.primitive.bind(*args, **eqn.params)
        pos = k + 1
        self._free(envs_f + envs_q, dying, freed, pos)
        freed = pos
        continue
      if kind == "stop":
        out = eqn.outvars[0]
        own = what.op == "dot_general" and not isinstance(out, jcore.DropVar)
        if self.stop(what, envs_f, envs_q, from_outputs=own):
          # The weight op runs in the next segment, which also returns its error from the two
          # streams' outputs (they are X W and X~ Q).
          errs.append((what, out))
        continue
      if kind == "call":
        sub_in_f = [[_read(env, v) for v in eqn.invars] for env in envs_f]
        sub_in_q = [[_read(env, v) for v in eqn.invars] for env in envs_q]
        out_f, out_q = self.frame(what, sub_in_f, sub_in_q)
      else:
        out_f, out_q = self.scan(eqn, what, envs_f, envs_q)
      for env, outs in list(zip(envs_f, out_f)) + list(zip(envs_q, out_q)):
        for v, val in zip(eqn.outvars, outs):
          if not isinstance(v, jcore.DropVar):
            env[v] = val
      pos = k + 1
      self._free(envs_f + envs_q, dying, freed, pos)
      freed = pos
    outs_f = [[_read(env, v) for v in jaxpr.outvars] for env in envs_f]
    outs_q = [[_read(env, v) for v in jaxpr.outvars] for env in envs_q]
    self.stack.pop()
    return outs_f, outs_q

  @staticmethod
  def _free(envs: list, dying: dict, lo: int, hi: int) -> None:
    """Drop the variables whose last use is in [lo, hi) (they are not read again)."""
    for k in range(lo, hi):
      for v in dying.get(k, ()):
        for env in envs:
          env.pop(v, None)

  def segment(self, jaxpr, start: int, stop: int, envs_f, envs_q, errs=()) -> None:
    """Run eqns[start:stop] in both streams; `errs` = [(op, var)]: also those ops' errors."""
    err_vars = tuple(var for _, var in errs)
    single, pair, ins, outs = _segment(self.program, jaxpr, start, stop, err_vars)
    whole = None if self.reduce_chunks is None else self.whole(ins, envs_f, envs_q)
    if whole is not None:
      single, pair, ins, outs = _segment(self.program, jaxpr, start, stop, err_vars, whole)
    residuals = []
    for b, (env_f, env_q) in enumerate(zip(envs_f, envs_q)):
      args_f = [env_f[v] for v in ins]
      args_q = [env_q[v] for v in ins]
      if self.segment_memory is not None and b == 0:  # both streams, as a real run has them
        self.segment_memory.append((f"{len(self.stack) - 1}:{start}-{stop}",
                                    _peak_bytes(pair, args_f, args_q)))
      if not errs and all(a is b for a, b in zip(args_f, args_q)):
        vals_f = vals_q = single(*args_f)
      else:
        vals_f, vals_q, res = pair(args_f, args_q)
        residuals.append(res)
      for v, a, b in zip(outs, vals_f, vals_q):
        env_f[v], env_q[v] = a, b
    for i, (op, _) in enumerate(errs):
      self.pending[op.index] = ([res[i] for res in residuals], 0.0)

  def whole(self, ins: list, envs_f, envs_q) -> tuple | None:
    """(positions, replicated sharding) of a segment's inputs made from parameters that some
    stream has split over several devices of a mesh; None when there are none."""
    prov = self.stack[-1][0].prov
    positions, mesh = [], None
    for i, v in enumerate(ins):
      if v not in prov:
        continue
      for env in envs_f[:1] + envs_q[:1]:
        s = getattr(env[v], "sharding", None)
        if isinstance(s, NamedSharding) and not s.is_fully_replicated:
          positions.append(i)
          mesh = s.mesh
          break
    if not positions:
      return None
    return tuple(positions), NamedSharding(mesh, P())

  def scan(self, eqn, plans: list, envs_f, envs_q) -> tuple[list, list]:
    p = eqn.params
    nc, ncarry, length = p["num_consts"], p["num_carry"], p["length"]
    order = range(length - 1, -1, -1) if p["reverse"] else range(length)
    n_ys = len(eqn.outvars) - ncarry
    out_f, out_q = [], []
    for env_f, env_q in zip(envs_f, envs_q):
      vf = [_read(env_f, v) for v in eqn.invars]
      vq = [_read(env_q, v) for v in eqn.invars]
      carry_f, carry_q = vf[nc:nc + ncarry], vq[nc:nc + ncarry]
      ys_f, ys_q = [[None] * length for _ in range(n_ys)], [[None] * length for _ in range(n_ys)]
      for i in order:
        xs_f = [x[i] for x in vf[nc + ncarry:]]
        xs_q = [xf if x is y else y[i] for x, y, xf in zip(vf[nc + ncarry:], vq[nc + ncarry:],
                                                           xs_f)]
        (of,), (oq,) = self.frame(plans[i], [vf[:nc] + carry_f + xs_f],
                                  [vq[:nc] + carry_q + xs_q])
        carry_f, carry_q = of[:ncarry], oq[:ncarry]
        for j in range(n_ys):
          ys_f[j][i], ys_q[j][i] = of[ncarry + j], oq[ncarry + j]
      stacked_f = [jnp.stack(y) for y in ys_f]
      stacked_q = [sf if all(a is b for a, b in zip(yf, yq)) else jnp.stack(yq)
                   for sf, yf, yq in zip(stacked_f, ys_f, ys_q)]
      out_f.append(carry_f + stacked_f)
      out_q.append(carry_q + stacked_q)
    return out_f, out_q

  # -- stops -----------------------------------------------------------------------------------

  def act_input(self, op: program_lib.WeightOp, envs_q) -> None:
    """Fake-quantize the quantized stream's input of `op` (every batch) into `act_x`; a static
    spec without a given scale is calibrated here, on this stream's inputs."""
    spec, name = self.act[op.index], self.act_keys[op.index]
    xs = [_read(env, op.eqn.invars[op.x_index]) for env in envs_q]
    sz = None
    if not spec.dynamic:
      sz = self.act_scales.get(name)
      if sz is None:
        sz = self.act_scales[name] = activations.static_scale(spec, xs)
    axes = activations.feature_axes(op.eqn, op.x_index)
    self.act_x[op.index] = [activations.fake_quant(
        x, spec, axes, None if sz is None else sz["scale"], None if sz is None else
        sz.get("zero"), name=name) for x in xs]

  def refresh(self, leaf: int) -> None:
    """Recompute, in every active frame, the quantized stream's variables made from `leaf`."""
    value = self.store[leaf]
    for plan, _, envs_q in self.stack:
      for var, steps in _by_leaf(self.program, plan).get(leaf, ()):
        if not any(var in env for env in envs_q):
          continue
        new = program_lib.apply_steps(value, steps)
        for env in envs_q:
          if var in env:
            env[var] = new

  def rows_fn(self, op: program_lib.WeightOp) -> tuple[Callable, Callable]:
    """(rows of one operand, rows of the pair (x, x~) in one call) of a stop."""
    if op.op == "conv":
      opts = dict(spec=program_lib.ConvSpec.of(op.eqn), patch_p=float(self.patch_p),
                  patch_stride=self.patch_stride)
      return (functools.partial(program_lib.conv_rows, **opts),
              lambda x, xt, key: _conv_rows_pair(x, xt, key, **opts))
    return (lambda x, key: program_lib.dot_rows(x, op.layout),
            lambda x, xt, key: _dot_rows_pair(x, xt, op.layout))

  def stop(self, op: program_lib.WeightOp, envs_f, envs_q, from_outputs: bool = False) -> bool:
    """Quantize (or record) the layer at `op`; True when its error is to be taken from the
    streams' outputs of the op (`from_outputs` and the layer was quantized here)."""
    step = self.steps[op.index]
    start = time.perf_counter()
    eqn, layout = op.eqn, op.layout
    w_var, x_var = eqn.invars[layout.side], eqn.invars[1 - layout.side]
    W_op = _read(envs_f[0], w_var)
    base = dict(path=op.name, op=op.op, kernel_shape=tuple(W_op.shape), reason=step.reason)
    if self.progress is not None:
      self.progress.set_postfix_str(op.name)
      self.progress.update(1)
    Q_op = W_op
    if step.status == "quantize":
      key = self.keys[op.index]
      to_rows, pair_rows = self.rows_fn(op)
      makers = []
      same = True
      for b, (env_f, env_q) in enumerate(zip(envs_f, envs_q)):
        x, xt = _read(env_f, x_var), _read(env_q, x_var)
        if op.index in self.act_x:
          xt = self.act_x[op.index][b]
        same = same and x is xt
        k = key if b == 0 else jax.random.fold_in(key, b)

        def make(x=x, xt=xt, k=k):
          # Layers reading the same operands (q/k/v projections) share a dot op's rows.
          share = op.op == "dot_general" and len(envs_f) == 1
          hit = self.last_rows
          if share and hit and hit[0] is x and hit[1] is xt and hit[2] == layout:
            return hit[3]
          if xt is x:
            X = to_rows(x, k)
            rows = X, X
          else:
            rows = pair_rows(x, xt, k)
          if share:
            self.last_rows = (x, xt, layout, rows)
          return rows
        makers.append(make)
      chunks = Chunks(makers)
      if (layout.kind == "dot_general" and layout.groups == 1 and W_op.ndim == 2
          and layout.w_perm == (0, 1)):
        W = W_op  # a Dense-layout kernel is its own matrix
      else:
        W = program_lib.weight_to_matrix(W_op, layout)
      rows = self.program.rows.get(op.index)
      if rows is None:  # rows of one chunk depend on shapes only
        rows = jax.eval_shape(to_rows, _read(envs_f[0], x_var), key).shape[0]
        self.program.rows[op.index] = rows
      rows *= len(envs_f)
      info = LayerInfo(index=op.index, name=op.name, op=op.op,
                       weight_shape=tuple(W_op.shape), groups=layout.groups, bits=step.bits,
                       rows=rows, same=same, key=key, W=W, chunks=chunks,
                       leaf_shape=tuple(np.shape(self.program.leaves[op.leaf])), prov=op.prov,
                       layout=layout, reduce_chunks=self.reduce_chunks)
      if len(chunks) == 1:  # make the data here: the quantizer's clock starts when it is ready
        jax.block_until_ready(list(chunks))
      t0 = time.perf_counter()
      try:
        result = self.quantize_layer(op.name, W, chunks, info)
      except ValueError as e:  # the quantizer's own checks know no layer names
        if repr(op.name) in str(e):
          raise
        raise ValueError(f"layer {op.name!r}: {e}") from e
      Q, extras = result if isinstance(result, tuple) else (result, {})
      Q = jax.block_until_ready(Q)
      self.quantizer_seconds += time.perf_counter() - t0
      if getattr(Q, "shape", None) != W.shape:
        raise ValueError(f"layer {op.name!r}: quantize_layer returned shape "
                         f"{getattr(Q, 'shape', None)}, expected W's {W.shape}")
      if not bool(jnp.isfinite(Q).all()):  # reduced on the devices: a replicated scalar
        raise ValueError(f"layer {op.name!r}: the quantized weights contain NaN or Inf (max |W| "
                         f"= {float(jnp.max(jnp.abs(W))):.3g}): the weights or the layer's "
                         "inputs are too large for float32; rescale them")
      Q_op = program_lib.matrix_to_weight(Q, layout)
      if Q_op.dtype != W_op.dtype:
        Q_op = Q_op.astype(W_op.dtype)
      self.store[op.leaf] = program_lib.write_back(self.store[op.leaf], op.prov, Q_op)
      self.refresh(op.leaf)
      fields = dict(status="quantized", bits=step.bits, rows=rows, error=None)
      fields.update(extras)
      own = from_outputs and "error" not in extras and self.bias_stop != op.index
      if "error" not in extras and not own:  # runs now, its value is fetched in `finish`
        t0 = time.perf_counter()
        self.pending[op.index] = (info.residuals(Q), 0.0)
        self.error_seconds += time.perf_counter() - t0
      self.records[op.index] = LayerRecord(**base, **fields,
                                           seconds=time.perf_counter() - start)
    else:
      own = False
      self.records[op.index] = LayerRecord(**base, status=step.status)
    if op.index == self.bias_stop:
      self.correct_bias(op, W_op, Q_op, envs_f, envs_q)
    return own

  def correct_bias(self, op, W_op, Q_op, envs_f, envs_q) -> None:
    """Bias correction (Sec. 3.2.3 of the GPFQ paper; Banner et al., Nagel et al.): subtract the
    mean output error E[op(x~; Q) - op(x; W)] over the calibration data from the bias."""
    bias_prov, added_shape = op.bias
    eqn, side = op.eqn, op.layout.side
    b_leaf = self.store[bias_prov.leaf]
    shifts, weights = [], []
    for b, (env_f, env_q) in enumerate(zip(envs_f, envs_q)):
      x, xt = _read(env_f, eqn.invars[1 - side]), _read(env_q, eqn.invars[1 - side])
      if op.index in self.act_x:
        xt = self.act_x[op.index][b]
      args = lambda a, w: (a, w) if side == 1 else (w, a)  # noqa: E731
      y = eqn.primitive.bind(*args(x, W_op), **eqn.params)
      y_q = eqn.primitive.bind(*args(xt, Q_op), **eqn.params)
      diff = y_q - y
      C = diff.shape[-1]
      if (b_leaf.shape == (C,) and tuple(added_shape) == (1,) * (diff.ndim - 1) + (C,)
          and not bias_prov.replicated):
        shift = jnp.mean(diff.reshape(-1, C), axis=0)
      elif not bias_prov.replicated:
        axes = tuple(i for i, s in enumerate(added_shape) if s == 1 and diff.shape[i] != 1)
        shift_out = jnp.mean(diff, axis=axes, keepdims=True).reshape(added_shape)
        shift = program_lib.write_back(jnp.zeros_like(b_leaf), bias_prov, shift_out)
      else:
        warnings.warn(f"bias_correction: the bias of {op.name!r} is broadcast before the add; "
                      "skipped", UserWarning, stacklevel=5)
        return
      shifts.append(shift)
      weights.append(diff.size)
    shift = shifts[0] if len(shifts) == 1 else sum(
        s * (w / sum(weights)) for s, w in zip(shifts, weights))
    self.store[bias_prov.leaf] = (b_leaf - shift).astype(b_leaf.dtype)
    self.bias_shift = float(jnp.linalg.norm(shift))
    self.refresh(bias_prov.leaf)


def params_out(prep: Prepared, store: Sequence[jax.Array]) -> PyTree:
  """The quantized leaves put back into the caller's own containers."""
  program = prep.program
  flat = jax.tree_util.tree_leaves(prep.params)
  for pos, value in zip(program.param_positions, store):
    # A leaf placed on a mesh comes back placed the same way (`qjax.mesh`).
    flat[pos] = mesh_lib.keep_shardings(flat[pos], value)
  out = jax.tree_util.tree_unflatten(program.params_treedef, flat)
  return out["params"] if prep.wrapped else out


def execute(prep: Prepared, quantize_layer: QuantizeLayer, *, bits: Any = None,
            skip: str | None = None, last_layer_float: bool = False,
            bias_correction: bool = False, patch_p: float = 1.0,
            patch_stride: str = "kernel", key: jax.Array | None = None,
            progress: bool = False, method: str = "custom", act: Any = None,
            act_scales: Mapping[str, Any] | None = None,
            memory: bool = False, reduce_chunks: int | None = None) -> tuple[PyTree, Report]:
  """One lockstep run on a prepared program (see `run`)."""
  start = time.perf_counter()
  steps = plan_steps(prep.program, bits, skip, last_layer_float)
  bar = tqdm(total=len(prep.program.stops), desc=method, disable=not progress, leave=False)
  lock = _Lockstep(prep, steps, quantize_layer, key=jax.random.key(0) if key is None else key,
                   patch_p=patch_p, patch_stride=patch_stride,
                   bias_correction=bias_correction, progress=bar, act=act,
                   act_scales=act_scales, memory=memory, reduce_chunks=reduce_chunks)
  lock.run()
  bar.close()
  records = []
  for op, step in zip(prep.program.stops, steps):
    rec = lock.records.get(op.index)
    if rec is None:  # never reached: inside a while/cond body
      rec = LayerRecord(path=op.name, op=op.op, kernel_shape=tuple(op.eqn.invars[
          op.layout.side if op.layout else 1].aval.shape), status=step.status,
          reason=step.reason or op.reason)
    records.append(rec)
  report = Report(method=method, rule=None, C=None, layers=tuple(records),
                  bias_shift=lock.bias_shift, seconds=time.perf_counter() - start,
                  forward_passes=2 * len(prep.batches),
                  quantizer_seconds=lock.quantizer_seconds, error_seconds=lock.error_seconds,
                  other_params=_other_params(prep.program),
                  act_scales={k: v for k, v in lock.act_scales.items()} if any(
                      not s.dynamic for s in lock.act.values()) else None,
                  segment_bytes=tuple(lock.segment_memory or ()))
  return params_out(prep, lock.store), report


def plan_segments(params: PyTree, apply_fn: Callable, batch: Any,
                  **options) -> list[tuple[str, int]]:
  """(segment, peak bytes per device) of every segment the driver runs, both streams together,
  from XLA's compiled memory analysis on the inputs' shardings (`qjax.mesh.shard_params` /
  `shard_batch`): check that a model fits before a long run. A dry run: the driver walks the
  program with Q = W at every layer (no quantizer; the forward passes and compiles only). A
  label is 'frame:first-last eqn'; the bytes count the weights and activations the segment
  reads, writes and holds, not the params resident elsewhere (`qjax.mesh.per_device_bytes`).
  `options` go to `run` (skip, apply_kwargs, ...).
  """
  _, report = run(params, apply_fn, batch, lambda name, W, chunks, info: W, memory=True,
                  **options)
  return list(report.segment_bytes)


def check_options(patch_p: float, patch_stride: str, key: Any) -> None:
  if not 0.0 < patch_p <= 1.0:
    raise ValueError(f"patch_p must be in (0, 1], got {patch_p}")
  if patch_stride not in ("kernel", "layer"):
    raise ValueError(f"patch_stride must be 'kernel' or 'layer', got {patch_stride!r}")
  if key is not None and not isinstance(key, jax.Array):
    raise TypeError(f"key must be a jax.random key, got {type(key).__name__}")


def run(params: PyTree, apply_fn: Callable, batch: Any, quantize_layer: QuantizeLayer, *,
        bits: Any = None, skip: str | None = None, last_layer_float: bool = False,
        bias_correction: bool = False, patch_p: float = 1.0, patch_stride: str = "kernel",
        key: jax.Array | None = None, apply_kwargs: Mapping[str, Any] | None = None,
        progress: bool = False, method: str = "custom", act: Any = None,
        act_scales: Mapping[str, Any] | None = None,
        memory: bool = False, reduce_chunks: int | None = None) -> tuple[PyTree, Report]:
  """Quantize every weight op of `apply_fn(params, batch)` in one lockstep pass.

  Args:
    params: any pytree of weights (a linen variables dict: its 'params' collection; bare linen
      params with `model.apply` are accepted too). Returned in the same containers.
    apply_fn: any JAX function `apply_fn(params, batch, **apply_kwargs)`: linen `model.apply`,
      `lambda state, x: nnx.merge(graphdef, state)(x)`, a plain function, a jitted function.
    batch: calibration inputs (examples on the leading axis), an array or pytree; or a list /
      iterator of equally shaped batches.
    quantize_layer: `fn(name, W, chunks, info) -> Q or (Q, extras)` (module docstring).
    bits: None, bits for every layer, or {regex: bits} ('default' key; first `re.search`
      match wins; a pattern that matches no layer is an error), passed as `info.bits`.
    skip: regex; layers whose name it `re.search`es stay float.
    last_layer_float: leave the last weight op in float.
    bias_correction: subtract the last layer's mean output error from its bias.
    patch_p: fraction of each image's conv patches used.
    patch_stride: 'kernel' (disjoint patches) or 'layer' (the conv's own strides).
    key: PRNG key for the patch samples (default `jax.random.key(0)`); layer i uses
      `fold_in(key, i)` in both streams.
    apply_kwargs: keyword arguments for apply_fn.
    progress: a tqdm bar over the stops.
    method: the report's method name.
    act: activation quantization (`qjax.ActSpec`, or {regex: ActSpec or None} rules): the
      quantized stream feeds those weight ops fake-quantized inputs, so X~ (the chunks' second
      half) is the quantized input the deployed W?A? network sees; static specs are calibrated
      on the quantized stream (`Report.act_scales`) unless `act_scales` gives them.
    act_scales: static activation scales by layer name (`qjax.calibrate_activations`).
    memory: also compile each segment's two-stream function once more for XLA's memory
      analysis (`Report.segment_bytes`; `plan_segments`).
    reduce_chunks: None (default), or C: a deterministic reduction, so that one device and
      every (data, model) mesh give the same Q bit for bit. Each data-row sum of a layer's
      statistics (the quantizers' Grams / Hessians, `info.reduce_chunks`) is C fixed chunks'
      partial sums added in a fixed order (`qjax.mesh.exact_tmm`: C must divide every layer's
      rows per batch and be a multiple of the devices the rows are split over; it holds C
      N0 x N0 float32 partials at once), and the segments use each split weight whole on every
      device (all-gathered one segment at a time; the params stay split at rest and in the
      result), so no forward product sums partials across devices.

  Returns:
    (quantized params, `Report`).
  """
  check_options(patch_p, patch_stride, key)
  mesh_lib.check_reduce_chunks(reduce_chunks)
  rules.check(act, "act", activations.check_act)
  prep = prepare(params, apply_fn, batch, apply_kwargs)
  return execute(prep, quantize_layer, bits=bits, skip=skip, last_layer_float=last_layer_float,
                 bias_correction=bias_correction, patch_p=patch_p, patch_stride=patch_stride,
                 key=key, progress=progress, method=method, act=act, act_scales=act_scales,
                 memory=memory, reduce_chunks=reduce_chunks)
