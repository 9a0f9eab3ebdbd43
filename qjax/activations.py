"""Activation quantization: the inputs of weight ops on a grid (W8A8, W4A8), at inference and in
calibration.

A weight op's data operand X (its input, `qjax.program`) is fake-quantized: X^ = s * (clip(
round(X / s) + z, lo, hi) - z). `ActSpec` says how s (and the zero point z) are chosen:

* symmetric (z = 0): levels -(2^(b-1)-1)..2^(b-1)-1 times s, s = max|x| / (2^(b-1)-1);
  asymmetric: levels 0..2^b-1, s = (max - min) / (2^b - 1), z = round(-min / s), the range
  widened to contain 0 (so zero padding and ReLU zeros stay exact);
* per tensor (one s for the whole operand), per token (one s per row of the op's input matrix:
  every entry position except the contracted feature dims, so a (batch, seq, d) input has
  batch*seq tokens; a conv's tokens are its pixels, the features its input channels) or per
  group (groups of `group_size` consecutive features of a token);
* dynamic (s from the tensor itself at run time, min-max) or static (s calibrated once on
  calibration data, per tensor: min-max, a percentile of |x| (of x at p and 100-p when
  asymmetric), or an MSE search over clipping ratios of the min-max range);
* 'int' levels or float8 'e4m3' (s = max|x| / 448, x / s cast to float8_e4m3fn and back).

`with_activation_quant(apply_fn, act, scales)` rewrites the traced program (the same weight ops
the quantizers see, so every model the driver handles, jitted or not); `qjax.calibrate_activations`
computes the static scales by layer name on the float network's inputs. `qjax.gptq` / `qjax.gpfq`
take `act=` so the quantized stream feeds each layer fake-quantized inputs X^~ (GPTQ's H =
X^~T X^~), with static scales calibrated on that stream in the same pass.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

from qjax import program as program_lib
from qjax import rules

PyTree = Any
GRANULARITIES = ("tensor", "token", "group")
METHODS = ("max", "percentile", "mse")
FORMATS = ("int", "e4m3")
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
MSE_RATIOS = tuple(float(r) for r in np.linspace(0.3, 1.0, 36))  # clipping ratios searched


@dataclasses.dataclass(frozen=True)
class ActSpec:
  """How the input of a weight op is quantized (see the module docstring).

  Attributes:
    bits: 4..8 (8 with fmt='e4m3').
    granularity: 'tensor', 'token' (a row of the op's input matrix) or 'group'.
    group_size: features per group (granularity='group' only).
    symmetric: levels symmetric about 0 (else with a zero point).
    dynamic: range from the tensor at run time (min-max); False: static per-tensor scales from
      `qjax.calibrate_activations` (or from the calibration pass of `qjax.gptq(..., act=)`).
    method: static calibration: 'max' (min-max), 'percentile' or 'mse'.
    percentile: in (0, 100], for method='percentile'.
    fmt: 'int' or 'e4m3' (float8, symmetric).
  """
  bits: int = 8
  granularity: str = "tensor"
  group_size: int | None = None
  symmetric: bool = True
  dynamic: bool = True
  method: str = "max"
  percentile: float = 99.99
  fmt: str = "int"

  def __post_init__(self):
    rules.check_bits(self.bits, "ActSpec.bits", low=4, high=8)
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"ActSpec.granularity must be one of {GRANULARITIES}, got "
                       f"{self.granularity!r}")
    if self.granularity == "group":
      if (isinstance(self.group_size, bool) or not isinstance(self.group_size, (int, np.integer))
          or self.group_size < 1):
        raise ValueError(f"ActSpec.group_size must be a positive int with granularity='group', "
                         f"got {self.group_size!r}")
    elif self.group_size is not None:
      raise ValueError(f"ActSpec.group_size is only used with granularity='group', got "
                       f"group_size={self.group_size!r} with granularity={self.granularity!r}")
    if self.method not in METHODS:
      raise ValueError(f"ActSpec.method must be one of {METHODS}, got {self.method!r}")
    if self.fmt not in FORMATS:
      raise ValueError(f"ActSpec.fmt must be one of {FORMATS}, got {self.fmt!r}")
    p = self.percentile
    if isinstance(p, bool) or not isinstance(p, (int, float, np.number)) or not (
        math.isfinite(p) and 0 < p <= 100):
      raise ValueError(f"ActSpec.percentile must be in (0, 100], got {p!r}")
    if self.dynamic and self.method != "max":
      raise ValueError(f"ActSpec.method={self.method!r} is a static calibration; dynamic ranges "
                       "are min-max (pass dynamic=False)")
    if not self.dynamic and self.granularity != "tensor":
      raise ValueError(f"static activation scales are per tensor (the token count changes with "
                       f"the input); got granularity={self.granularity!r} with dynamic=False")
    if self.fmt == "e4m3" and (self.bits != 8 or not self.symmetric):
      raise ValueError("ActSpec fmt='e4m3' is float8: bits=8 and symmetric=True")

  @property
  def qmax(self) -> float:
    """Largest code magnitude: 2^(b-1)-1 symmetric, 2^b-1 asymmetric, 448 for e4m3."""
    if self.fmt == "e4m3":
      return E4M3_MAX
    return float(2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1)


def check_act(value: Any, where: str = "act") -> ActSpec | None:
  """A rule value: an ActSpec or None (leave the layer's input float)."""
  if value is not None and not isinstance(value, ActSpec):
    raise TypeError(f"{where} must be a qjax.ActSpec or None, got {type(value).__name__}")
  return value


# ---------------------------------------------------------------------------------------------
# Fake quantization of one operand.


def feature_axes(eqn, x_index: int) -> tuple[int, ...]:
  """The axes of the data operand a weight op contracts (a token's features)."""
  if eqn.primitive.name == "conv_general_dilated":
    return (int(eqn.params["dimension_numbers"].lhs_spec[1]),)
  (lc, rc), _ = eqn.params["dimension_numbers"]
  return tuple(int(d) for d in (lc if x_index == 0 else rc))


def _as_tokens(x: jax.Array, axes: Sequence[int]) -> tuple[jax.Array, tuple, tuple]:
  """x as (tokens, features) and what undoes it."""
  rest = tuple(d for d in range(x.ndim) if d not in axes)
  perm = rest + tuple(axes)
  xt = jnp.transpose(x, perm)
  K = math.prod(x.shape[d] for d in axes)
  return xt.reshape(-1, K), perm, xt.shape


def _from_tokens(m: jax.Array, perm: tuple, shape: tuple) -> jax.Array:
  return jnp.transpose(m.reshape(shape), np.argsort(perm))


def range_to_grid(spec: ActSpec, lo: jax.Array, hi: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(scale, zero) of the range [lo, hi] (symmetric: max(|lo|, |hi|)); a zero range gets
  scale 1 (every value is 0 then)."""
  if spec.symmetric:
    amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    s = amax / spec.qmax
    return jnp.where(s > 0, s, 1.0), jnp.zeros_like(s)
  lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
  s = (hi - lo) / spec.qmax
  s = jnp.where(s > 0, s, 1.0)
  return s, jnp.round(-lo / s)


def quantize_with(spec: ActSpec, x: jax.Array, scale: jax.Array, zero: jax.Array) -> jax.Array:
  """x on the grid of (scale, zero), broadcasting, float32."""
  if spec.fmt == "e4m3":
    y = jnp.clip(x / scale, -E4M3_MAX, E4M3_MAX)
    return y.astype(jnp.float8_e4m3fn).astype(jnp.float32) * scale
  if spec.symmetric:
    return jnp.clip(jnp.round(x / scale), -spec.qmax, spec.qmax) * scale
  return (jnp.clip(jnp.round(x / scale) + zero, 0.0, spec.qmax) - zero) * scale


def fake_quant(x: jax.Array, spec: ActSpec, axes: Sequence[int], scale: Any = None,
               zero: Any = None, name: str = "x") -> jax.Array:
  """x fake-quantized per `spec`, with `axes` the contracted (feature) axes; static specs take
  the calibrated per-tensor `scale` / `zero`. Same dtype as x."""
  x32 = jnp.asarray(x).astype(jnp.float32)
  if not spec.dynamic:
    if scale is None:
      raise ValueError(f"layer {name!r}: static activation quantization needs scales (from "
                       "qjax.calibrate_activations, or dynamic=True)")
    zero = jnp.zeros((), jnp.float32) if zero is None else zero
    y = quantize_with(spec, x32, jnp.asarray(scale, jnp.float32), jnp.asarray(zero, jnp.float32))
    return y.astype(x.dtype)
  if spec.granularity == "tensor":
    s, z = range_to_grid(spec, jnp.min(x32), jnp.max(x32))
    return quantize_with(spec, x32, s, z).astype(x.dtype)
  m, perm, shape = _as_tokens(x32, axes)
  if spec.granularity == "group":
    g = spec.group_size
    if m.shape[1] % g:
      raise ValueError(f"layer {name!r}: {m.shape[1]} input features are not divisible by the "
                       f"activation group_size {g}")
    m3 = m.reshape(m.shape[0], -1, g)
  else:
    m3 = m[:, None, :]
  s, z = range_to_grid(spec, jnp.min(m3, axis=2, keepdims=True),
                       jnp.max(m3, axis=2, keepdims=True))
  y = quantize_with(spec, m3, s, z).reshape(m.shape)
  return _from_tokens(y, perm, shape).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Static calibration.


def _mse_range(spec: ActSpec, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The clipped range r * [min, max] (r in MSE_RATIOS) with the least ||x - x^||^2."""
  lo, hi = jnp.min(x), jnp.max(x)

  def err(r):
    s, z = range_to_grid(spec, r * lo, r * hi)
    return jnp.sum((quantize_with(spec, x, s, z) - x) ** 2)

  ratios = jnp.asarray(MSE_RATIOS, jnp.float32)
  errs = jax.lax.map(err, ratios)
  r = ratios[jnp.argmin(errs)]
  return r * lo, r * hi


def static_scale(spec: ActSpec, xs: Sequence[jax.Array]) -> dict[str, jax.Array]:
  """{'scale', 'zero'} float32 scalars of a static per-tensor spec from the inputs `xs` (one
  array per calibration batch)."""
  flat = jnp.concatenate([jnp.asarray(x, jnp.float32).reshape(-1) for x in xs])
  if spec.method == "max":
    lo, hi = jnp.min(flat), jnp.max(flat)
  elif spec.method == "percentile":
    if spec.symmetric:
      hi = jnp.percentile(jnp.abs(flat), spec.percentile)
      lo = -hi
    else:
      lo = jnp.percentile(flat, 100.0 - spec.percentile)
      hi = jnp.percentile(flat, spec.percentile)
  else:
    lo, hi = _mse_range(spec, flat)
  s, z = range_to_grid(spec, lo, hi)
  return {"scale": s.astype(jnp.float32), "zero": z.astype(jnp.float32)}


# ---------------------------------------------------------------------------------------------
# The program with fake-quantized weight-op inputs.


def op_keys(program: program_lib.Program) -> dict[int, str]:
  """Layer name of every stop; a weight used by several ops (tied embeddings, a module called
  twice) names its later uses 'name#1', 'name#2', ... (each op has its own input)."""
  seen: dict[str, int] = {}
  out = {}
  for op in program.stops:
    n = seen.get(op.name, 0)
    out[op.index] = op.name if n == 0 else f"{op.name}#{n}"
    seen[op.name] = n + 1
  return out


def resolve(act: Any, program: program_lib.Program) -> dict[int, ActSpec]:
  """{stop index: ActSpec} of the stops `act` quantizes (rules by layer name, None = float)."""
  if act is None:
    return {}
  keys = op_keys(program)
  ok = [op for op in program.stops if op.status == "ok"]
  if isinstance(act, Mapping):
    specs = rules.resolve(act, [keys[op.index] for op in ok], what="act", check_value=check_act,
                          default=None)
  else:
    check_act(act)
    specs = {keys[op.index]: act for op in ok}
  return {op.index: specs[keys[op.index]] for op in ok if specs.get(keys[op.index]) is not None}


def _bind(eqn, invals: list) -> list:
  params = eqn.primitive.get_bind_params(eqn.params)
  subfuns = ()
  if isinstance(params, tuple):  # older JAX: (subfuns, params)
    subfuns, params = params
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*subfuns, *invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def _read(env: dict, v) -> Any:
  return v.val if isinstance(v, jcore.Literal) else env[v]


Hook = Callable[[program_lib.WeightOp, jax.Array], jax.Array]


def evaluate(plan: program_lib.FramePlan, args: Sequence[Any], hook: Hook) -> list:
  """Evaluate one body of the program; at each stop the data operand goes through
  `hook(op, x)` (nested calls walked into, scans unrolled: their stops differ per iteration)."""
  jaxpr = plan.jaxpr
  env = dict(zip(jaxpr.constvars, plan.consts))
  env.update(zip(jaxpr.invars, args))
  for k, eqn in enumerate(jaxpr.eqns):
    invals = [_read(env, v) for v in eqn.invars]
    point = plan.points.get(k)
    if point is None:
      outs = _bind(eqn, invals)
    elif point[0] == "stop":
      op = point[1]
      invals[op.x_index] = hook(op, invals[op.x_index])
      outs = _bind(eqn, invals)
    elif point[0] == "call":
      outs = evaluate(point[1], invals, hook)
    else:
      outs = _scan(eqn, point[1], invals, hook)
    for v, val in zip(eqn.outvars, outs):
      if not isinstance(v, jcore.DropVar):
        env[v] = val
  return [_read(env, v) for v in jaxpr.outvars]


def _scan(eqn, plans: list, invals: list, hook: Hook) -> list:
  p = eqn.params
  nc, ncarry, length = p["num_consts"], p["num_carry"], p["length"]
  consts, carry, xs = invals[:nc], invals[nc:nc + ncarry], invals[nc + ncarry:]
  order = range(length - 1, -1, -1) if p["reverse"] else range(length)
  ys = [[None] * length for _ in range(len(eqn.outvars) - ncarry)]
  for i in order:
    out = evaluate(plans[i], consts + carry + [x[i] for x in xs], hook)
    carry = out[:ncarry]
    for j, y in enumerate(out[ncarry:]):
      ys[j][i] = y
  return carry + [jnp.stack(y) for y in ys]


def run_with_hook(program: program_lib.Program, params: PyTree, batch: PyTree,
                  hook: Hook) -> PyTree:
  flat = jax.tree_util.tree_leaves((params, batch))
  outs = evaluate(program.plan, flat, hook)
  return jax.tree_util.tree_unflatten(program.out_tree, outs)


def _check_scales(specs: dict[int, ActSpec], keys: dict[int, str], scales: Any) -> None:
  for i, spec in specs.items():
    if spec.dynamic:
      continue
    if scales is None or keys[i] not in scales:
      raise ValueError(f"layer {keys[i]!r}: static activation quantization (dynamic=False) needs "
                       "its scale: pass scales=qjax.calibrate_activations(...) (or the report's "
                       "act_scales), or use dynamic=True")


def with_activation_quant(apply_fn: Callable, act: Any, scales: Mapping[str, Any] | None = None
                          ) -> Callable:
  """`apply_fn` with the inputs of its weight ops fake-quantized.

  Args:
    apply_fn: any JAX function `apply_fn(params, batch, **kwargs)` the quantizers take (linen
      `model.apply`, an NNX merge, a plain or jitted function).
    act: an `ActSpec` for every weight op, or {regex: ActSpec or None} rules on the layer names
      (`qjax.rules`; a layer no pattern matches stays float).
    scales: static scales by layer name ({name: {'scale', 'zero'}}, `qjax.calibrate_activations`),
      needed by every layer with a static spec.

  Returns:
    fn(params, batch, **kwargs) with apply_fn's outputs; the program is traced at each call
    (wrap it in `jax.jit` to trace once per shape).
  """
  if not callable(apply_fn):
    raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}")
  rules.check(act, "act", check_act)

  def fn(params, batch, **kwargs):
    f = (lambda p, b: apply_fn(p, b, **kwargs)) if kwargs else apply_fn
    program = program_lib.trace(f, params, batch)
    specs = resolve(act, program)
    keys = op_keys(program)
    _check_scales(specs, keys, scales)

    def hook(op, x):
      spec = specs.get(op.index)
      if spec is None:
        return x
      sz = None if spec.dynamic else scales[keys[op.index]]
      return fake_quant(x, spec, feature_axes(op.eqn, op.x_index),
                        None if sz is None else sz["scale"],
                        None if sz is None else sz.get("zero"), name=keys[op.index])

    return run_with_hook(program, params, batch, hook)

  return fn
