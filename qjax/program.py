"""The traced program of any JAX function, and its weight ops: the layers a quantizer sees.

`trace(apply_fn, params, batch)` runs `jax.make_jaxpr(apply_fn)(params, batch)` and walks the
program. A *weight op* is a `dot_general` or `conv_general_dilated` one of whose operands is a
parameter leaf, possibly through layout-only ops (convert_element_type, reshape, transpose,
squeeze, expand_dims, size-1 broadcast_in_dim, copy, rev) and through nested programs (jit,
closed_call, custom_jvp/vjp calls, remat/checkpoint). That is what a Dense, DenseGeneral, Einsum,
attention projection, `Embed.attend`, Conv, ConvTranspose or a hand-written `x @ w` all become,
in linen, NNX, equinox or plain JAX alike. Each op is named by its parameter's pytree path
(`qjax.rules.path_name`: 'params/block1/Conv_0/kernel' -> 'block1/Conv_0').

Each weight op is a matrix problem W, X (`qjax.layouts`), a conv's X made of its input's patches
(`qjax.patches`); the layout chain from the leaf to the weight operand (`qjax.provenance`) says
which leaf entries W holds and how a quantized W goes back into the leaf. The names of those
modules that the driver and the methods use are re-exported here.

A `lax.scan` over stacked weights (linen `nn.scan`, NNX / plain scans) is one layer per
iteration: the stops of its body are listed once per iteration, slice i of the stacked weight
named `name[i]`. Weight ops inside `while` / `cond` bodies are listed as 'unsupported' with the
reason (they run in float). A parameter used in any other way (an embedding gather, an
elementwise scale) is listed in `Program.other_uses` with the primitive that used it; a
parameter added to a weight op's output is that op's bias (`WeightOp.bias`).

The result is a tree of `FramePlan`s (one per program body the driver walks into) whose
`points` mark where the driver must stop (`qjax.driver`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.extend.core as jcore

# Re-exported (noqa): the driver and the methods reach these as `qjax.program.X`.
from qjax.layouts import (MatrixLayout, conv_layout, dot_layout, dot_rows,  # noqa: F401
                          group_slices, leaf_index, matrix_to_weight, weight_to_matrix)
from qjax.patches import ConvSpec, conv_rows  # noqa: F401
from qjax.provenance import (Prov, apply_steps, param_leaves, strip_value,  # noqa: F401
                             write_back)

PyTree = Any

# Ops that only move, relabel or cast a weight's entries: a chain of them from a parameter leaf
# to an operand keeps a one-to-one map between the two (broadcast_in_dim only while it adds
# size-1 dims).
LAYOUT_PRIMS = frozenset({"convert_element_type", "reshape", "transpose", "squeeze",
                          "expand_dims", "broadcast_in_dim", "copy", "copy_p", "rev"})
# Nested programs with the caller's operands as their inputs: walked into.
CALL_PRIMS = frozenset({"pjit", "jit", "closed_call", "core_call", "custom_jvp_call",
                        "custom_vjp_call", "custom_vjp_call_jaxpr", "checkpoint", "remat",
                        "remat2"})
WEIGHT_PRIMS = frozenset({"dot_general", "conv_general_dilated"})


def _replicates(eqn) -> bool:
  """A broadcast_in_dim that copies entries (a new dim of size > 1 or a size-1 dim grown)."""
  if eqn.primitive.name != "broadcast_in_dim":
    return False
  in_shape = eqn.invars[0].aval.shape
  return math.prod(eqn.params["shape"]) != math.prod(in_shape)


@dataclasses.dataclass
class WeightOp:
  """One stop of the driver: a weight op, in execution order.

  Attributes:
    index: position among all weight ops (program order, scan iterations unrolled); the patch
      key of this layer is `fold_in(key, index)`.
    name: the parameter's path name, `[i]` per enclosing scan iteration.
    leaf: index into `Program.leaves`.
    prov: how the weight operand is made from the leaf.
    eqn: the dot_general / conv_general_dilated eqn.
    layout: how it becomes a matrix problem (None when unsupported).
    status: 'ok' or 'unsupported'.
    reason: why unsupported.
    bias: provenance of the parameter added to the op's output, and the added operand's shape.
  """
  index: int
  name: str
  leaf: int
  prov: Prov
  eqn: Any
  layout: MatrixLayout | None
  status: str = "ok"
  reason: str = ""
  bias: tuple[Prov, tuple[int, ...]] | None = None

  @property
  def op(self) -> str:
    return "conv" if self.eqn.primitive.name == "conv_general_dilated" else "dot_general"

  @property
  def x_index(self) -> int:
    return 1 - self.layout.side if self.layout else 0


@dataclasses.dataclass
class FramePlan:
  """What the driver does inside one body: where it stops (`points`), and which variables are
  made from parameter leaves by layout steps (`prov`, to refresh them when a leaf is
  quantized).

  `points` maps an eqn position to ('stop', WeightOp), ('call', FramePlan) or
  ('scan', [FramePlan per iteration]).
  """
  jaxpr: Any
  consts: list
  prov: dict
  points: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Program:
  """The traced `apply_fn(params, batch)`.

  Attributes:
    closed: the ClosedJaxpr.
    treedef: of (params, batch).
    leaves: flat parameter leaves (the candidates of `params`).
    leaf_invar: jaxpr input position of each leaf.
    leaf_names: `rules.path_name` of each leaf.
    params_treedef, params_flat_paths: to rebuild the caller's containers.
    param_positions: position of each candidate leaf in the params' own flat leaves.
    n_params_flat: number of leaves of params.
    stops: the weight ops in execution order.
    other_uses: leaf -> primitives that used it in a non-matmul way.
    biases: leaves that are a weight op's bias.
    plan: the top FramePlan.
    out_shape: shapes of the outputs.
  """
  closed: Any
  leaves: list
  leaf_invar: list[int]
  leaf_names: list[str]
  params_treedef: Any
  param_positions: list[int]
  n_params_flat: int
  batch_treedef: Any
  stops: list[WeightOp]
  other_uses: dict[int, list[str]]
  biases: set[int]
  plan: FramePlan
  out_tree: Any = None
  segments: dict = dataclasses.field(default_factory=dict)
  last_use: dict = dataclasses.field(default_factory=dict)
  rows: dict = dataclasses.field(default_factory=dict)


def _sub_jaxpr(eqn) -> tuple[Any, list] | None:
  """(Jaxpr, consts) of a call-like eqn whose inputs are the eqn's operands."""
  if eqn.primitive.name not in CALL_PRIMS:
    return None
  for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    sub = eqn.params.get(name)
    if isinstance(sub, jcore.ClosedJaxpr):
      sub, consts = sub.jaxpr, list(sub.consts)
    elif isinstance(sub, jcore.Jaxpr):
      consts = []
    else:
      continue
    if len(sub.invars) == len(eqn.invars) and len(sub.outvars) == len(eqn.outvars):
      return sub, consts
  return None


class _Walker:
  """Walks the program once, listing weight ops (with scan iterations unrolled)."""

  def __init__(self, leaf_names: list[str]):
    self.leaf_names = leaf_names
    self.stops: list[WeightOp] = []
    self.other_uses: dict[int, list[str]] = {}
    self.biases: set[int] = set()

  def use(self, prov: Prov, what: str) -> None:
    uses = self.other_uses.setdefault(prov.leaf, [])
    if what not in uses:
      uses.append(what)

  def name(self, prov: Prov) -> str:
    return self.leaf_names[prov.leaf] + "".join(f"[{i}]" for i in prov.slice_key)

  def stop(self, eqn, ins: list, unsupported: str | None) -> WeightOp | None:
    sides = [i for i, p in enumerate(ins[:2]) if p is not None]
    side = sides[-1] if sides else None
    prov = ins[side]
    reason = unsupported or ""
    layout = None
    if len(sides) == 2:
      reason = reason or "both operands are parameters"
    elif prov.replicated:
      reason = reason or "the weight is broadcast (its entries are copied) before the product"
    elif eqn.primitive.name == "conv_general_dilated":
      if side != 1:
        reason = reason or "the parameter is the conv's input, not its kernel"
      elif eqn.params["batch_group_count"] != 1:
        reason = reason or "conv with batch_group_count > 1"
      else:
        layout = conv_layout(eqn)
    else:
      layout = dot_layout(eqn, side)
      if layout.N0 == 0 or layout.N1g == 0:
        reason, layout = reason or "empty weight", None
    op = WeightOp(index=len(self.stops), name=self.name(prov), leaf=prov.leaf, prov=prov,
                  eqn=eqn, layout=None if reason else layout,
                  status="unsupported" if reason else "ok", reason=reason)
    self.stops.append(op)
    return op

  def walk(self, jaxpr, consts: list, prov_in: dict, unsupported: str | None = None
           ) -> FramePlan:
    """Provenance and stops of one body; `unsupported`: the reason every stop inside is."""
    prov = dict(prov_in)
    plan = FramePlan(jaxpr=jaxpr, consts=consts, prov=prov)
    op_out: dict[Any, WeightOp] = {}  # output var of a weight op -> the op (to find its bias)
    for k, eqn in enumerate(jaxpr.eqns):
      ins = [prov.get(v) if isinstance(v, jcore.Var) else None for v in eqn.invars]
      name = eqn.primitive.name
      if not any(p is not None for p in ins):
        continue
      if name in LAYOUT_PRIMS and ins[0] is not None:
        p = ins[0]
        prov[eqn.outvars[0]] = Prov(p.leaf, p.steps + (("eqn", eqn),),
                                    p.replicated or _replicates(eqn))
        continue
      if name in WEIGHT_PRIMS:
        op = self.stop(eqn, ins, unsupported)
        if op is not None:
          op_out[eqn.outvars[0]] = op
          if op.status == "ok" and unsupported is None:
            plan.points[k] = ("stop", op)
        continue
      if name == "add":
        a, b = eqn.invars
        for y, bias_p in ((a, ins[1]), (b, ins[0])):
          if (isinstance(y, jcore.Var) and y in op_out and bias_p is not None
              and op_out[y].bias is None):
            op_out[y].bias = (bias_p, tuple(eqn.invars[1 if y is a else 0].aval.shape))
            self.biases.add(bias_p.leaf)
            break
        else:
          for p in ins:
            if p is not None:
              self.use(p, "add")
        continue
      sub = _sub_jaxpr(eqn)
      if sub is not None:
        sub_jaxpr, sub_consts = sub
        sub_prov = {v: p for v, p in zip(sub_jaxpr.invars, ins) if p is not None}
        sub_plan = self.walk(sub_jaxpr, sub_consts, sub_prov, unsupported)
        for v_out, v_sub in zip(eqn.outvars, sub_jaxpr.outvars):
          if isinstance(v_sub, jcore.Var) and v_sub in sub_plan.prov:
            prov[v_out] = sub_plan.prov[v_sub]
        if unsupported is None and _has_points(sub_plan):
          plan.points[k] = ("call", sub_plan)
        continue
      if name == "scan":
        self.scan(plan, k, eqn, ins, unsupported)
        continue
      if name in ("while", "cond"):
        self.loop(eqn, ins, unsupported or f"inside a lax.{name} (not unrolled)")
        continue
      for p in ins:
        if p is not None:
          self.use(p, name)
    return plan

  def scan(self, plan: FramePlan, k: int, eqn, ins: list, unsupported: str | None) -> None:
    params = eqn.params
    body, consts = params["jaxpr"].jaxpr, list(params["jaxpr"].consts)
    nc, ncarry, length = params["num_consts"], params["num_carry"], params["length"]
    for p in ins[nc:nc + ncarry]:
      if p is not None:
        self.use(p, "scan carry")
    order = range(length - 1, -1, -1) if params["reverse"] else range(length)
    plans = []
    for i in order:
      sub_prov = {}
      for j, (v, p) in enumerate(zip(body.invars, ins)):
        if p is None or nc <= j < nc + ncarry:
          continue
        sub_prov[v] = p if j < nc else Prov(p.leaf, p.steps + (("index", i),), p.replicated)
      plans.append(self.walk(body, consts, sub_prov, unsupported))
    if unsupported is None and any(_has_points(p) for p in plans):
      plan.points[k] = ("scan", plans if not params["reverse"] else plans[::-1])

  def loop(self, eqn, ins: list, reason: str) -> None:
    p = eqn.params
    if eqn.primitive.name == "while":
      cn, bn = p["cond_nconsts"], p["body_nconsts"]
      body = p["body_jaxpr"]
      body_ins = ins[cn:cn + bn] + ins[cn + bn:]
      self.walk(body.jaxpr, list(body.consts),
                {v: q for v, q in zip(body.jaxpr.invars, body_ins) if q is not None}, reason)
    else:
      for br in p["branches"]:
        self.walk(br.jaxpr, list(br.consts),
                  {v: q for v, q in zip(br.jaxpr.invars, ins[1:]) if q is not None}, reason)


def _has_points(plan: FramePlan) -> bool:
  return bool(plan.points)


def make_jaxpr(apply_fn: Callable, params: PyTree, batch: PyTree) -> tuple[Any, Any]:
  """(ClosedJaxpr, output shapes) of `apply_fn(params, batch)`; raises what tracing raises."""
  return jax.make_jaxpr(apply_fn, return_shape=True)(params, batch)


def trace(apply_fn: Callable, params: PyTree, batch: PyTree, traced: tuple | None = None
          ) -> Program:
  """Trace `apply_fn(params, batch)` and list its weight ops (nothing is computed).

  Args:
    traced: the result of `make_jaxpr` if the caller already has it.
  """
  leaves, positions, names, treedef, n_flat = param_leaves(params)
  closed, out_shape = traced or make_jaxpr(apply_fn, params, batch)
  jaxpr = closed.jaxpr
  walker = _Walker(names)
  prov = {jaxpr.invars[pos]: Prov(i) for i, pos in enumerate(positions)}
  plan = walker.walk(jaxpr, list(closed.consts), prov)
  return Program(
      closed=closed, leaves=leaves, leaf_invar=positions, leaf_names=names,
      params_treedef=treedef, param_positions=positions, n_params_flat=n_flat,
      batch_treedef=jax.tree_util.tree_structure(batch), stops=walker.stops,
      other_uses=walker.other_uses, biases=walker.biases, plan=plan,
      out_tree=jax.tree_util.tree_structure(out_shape))
