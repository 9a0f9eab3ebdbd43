"""The traced program of any JAX function, and its weight ops: the layers a quantizer sees.

`trace(apply_fn, params, batch)` runs `jax.make_jaxpr(apply_fn)(params, batch)` and walks the
program. A *weight op* is a `dot_general` or `conv_general_dilated` one of whose operands is a
parameter leaf, possibly through layout-only ops (convert_element_type, reshape, transpose,
squeeze, expand_dims, size-1 broadcast_in_dim, copy, rev) and through nested programs (jit,
closed_call, custom_jvp/vjp calls, remat/checkpoint). That is what a Dense, DenseGeneral, Einsum,
attention projection, `Embed.attend`, Conv, ConvTranspose or a hand-written `x @ w` all become,
in linen, NNX, equinox or plain JAX alike. Each op is named by its parameter's pytree path
(`qjax.rules.path_name`: 'params/block1/Conv_0/kernel' -> 'block1/Conv_0').

A weight op is a matrix problem as in GPFQ (Zhang, Zhou & Saab, "Post-training quantization for
neural networks with provable guarantees", Eq. 7-8): W (N0, N1) = (the weight's contracting dims,
flattened) x (its free dims, flattened), X (m, N0) = the other operand with every other dim
flattened into rows. A `dot_general` batch dim on the weight (grouped or per-expert weights) and
a conv's `feature_group_count` give G independent problems; they are laid out side by side:
W (N0, G*N1g), X (m, G*N0), problem g = (X[:, g*N0:(g+1)*N0], W[:, g*N1g:(g+1)*N1g])
(`group_slices`). A convolution becomes a matrix product on vectorized image patches (Sec. 2.3 of
the paper), taken from the op's own dimension numbers, padding, dilations and groups
(`conv_rows`); rows of a conv matrix are channel-major (Cin, k1, ..., kn), matching
`jax.lax.conv_general_dilated_patches`.

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
import functools
import math
from typing import Any, Callable, Literal, Mapping, Sequence

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

from qjax import rules

PyTree = Any
PatchStride = Literal["kernel", "layer"]

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


# ---------------------------------------------------------------------------------------------
# Provenance: which parameter leaf (and which layout steps) a program variable comes from.


@dataclasses.dataclass(frozen=True)
class Prov:
  """A variable that is parameter leaf `leaf` after the layout `steps`.

  Attributes:
    leaf: index into `Program.leaves`.
    steps: ('eqn', JaxprEqn) layout ops and ('index', i) scan slices, applied in order.
    replicated: a broadcast in the chain copies entries (fine for a bias, not for a weight).
  """
  leaf: int
  steps: tuple = ()
  replicated: bool = False

  @property
  def slice_key(self) -> tuple[int, ...]:
    """The scan iterations that select this slice of the leaf (() for the whole leaf)."""
    return tuple(s[1] for s in self.steps if s[0] == "index")


def apply_steps(value: jax.Array, steps: Sequence[tuple], *, index_only: bool = False
                ) -> jax.Array:
  """The layout chain applied to a leaf value (`index_only`: skip dtype casts, for iotas)."""
  for step in steps:
    if step[0] == "index":
      value = value[step[1]]
      continue
    eqn = step[1]
    if eqn.primitive.name == "convert_element_type":
      if index_only:
        continue
    value = eqn.primitive.bind(value, **eqn.params)
  return value


def operand_index(leaf_shape: Sequence[int], prov: Prov) -> jax.Array:
  """int32, the operand's shape: the flat leaf index of every entry of the operand."""
  iota = jnp.arange(math.prod(leaf_shape), dtype=jnp.int32).reshape(tuple(leaf_shape))
  return apply_steps(iota, prov.steps, index_only=True)


def write_back(leaf_value: jax.Array, prov: Prov, operand: jax.Array) -> jax.Array:
  """The leaf with the entries that `prov.steps` maps onto the operand replaced by `operand`.

  The chain is a permutation of entries (plus casts and slices), so applying it to an iota of
  flat leaf indices tells where each operand entry lives in the leaf.
  """
  if not prov.steps and operand.shape == leaf_value.shape:  # the leaf is the operand
    return operand if operand.dtype == leaf_value.dtype else operand.astype(leaf_value.dtype)
  leaf_value = jnp.asarray(leaf_value)  # a NumPy leaf has no .at
  where = operand_index(leaf_value.shape, prov)
  flat = leaf_value.reshape(-1).at[where.reshape(-1)].set(
      operand.reshape(-1).astype(leaf_value.dtype))
  return flat.reshape(leaf_value.shape)


def _replicates(eqn) -> bool:
  """A broadcast_in_dim that copies entries (a new dim of size > 1 or a size-1 dim grown)."""
  if eqn.primitive.name != "broadcast_in_dim":
    return False
  in_shape = eqn.invars[0].aval.shape
  return math.prod(eqn.params["shape"]) != math.prod(in_shape)


# ---------------------------------------------------------------------------------------------
# Weight ops as matrices.


@dataclasses.dataclass(frozen=True)
class MatrixLayout:
  """How a weight op's weight operand and data operand become W (N0, G*N1g) and X (m, G*N0).

  Attributes:
    kind: 'dot_general' or 'conv'.
    side: which operand of the eqn is the weight (0 or 1).
    w_perm: permutation of the weight operand to (group dims, contracting dims, free dims).
    w_shapes: sizes of those three dim groups (after the permutation).
    x_perm: permutation of the data operand to (group dims, free dims, contracting dims)
      (dot_general only).
    groups: G, independent problems.
    N0, N1g: rows of one problem, neurons of one problem.
  """
  kind: str
  side: int
  w_perm: tuple[int, ...]
  w_shapes: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
  x_perm: tuple[int, ...]
  groups: int
  N0: int
  N1g: int

  @property
  def N1(self) -> int:
    return self.groups * self.N1g


def _dot_layout(eqn, side: int) -> MatrixLayout:
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  wc, xc = (rc, lc) if side == 1 else (lc, rc)
  wb, xb = (rb, lb) if side == 1 else (lb, rb)
  w_shape = eqn.invars[side].aval.shape
  x_shape = eqn.invars[1 - side].aval.shape
  w_free = tuple(d for d in range(len(w_shape)) if d not in wc and d not in wb)
  x_free = tuple(d for d in range(len(x_shape)) if d not in xc and d not in xb)
  sizes = lambda dims: tuple(w_shape[d] for d in dims)  # noqa: E731
  return MatrixLayout(
      kind="dot_general", side=side, w_perm=tuple(wb) + tuple(wc) + w_free,
      w_shapes=(sizes(wb), sizes(wc), sizes(w_free)),
      x_perm=tuple(xb) + x_free + tuple(xc), groups=math.prod(sizes(wb)),
      N0=math.prod(sizes(wc)), N1g=math.prod(sizes(w_free)))


def _conv_layout(eqn) -> MatrixLayout:
  dn = eqn.params["dimension_numbers"]
  out_d, in_d, *spatial = dn.rhs_spec
  w_shape = eqn.invars[1].aval.shape
  G = int(eqn.params["feature_group_count"])
  kernel = tuple(w_shape[d] for d in spatial)
  return MatrixLayout(
      kind="conv", side=1, w_perm=(in_d,) + tuple(spatial) + (out_d,),
      w_shapes=((), (w_shape[in_d],) + kernel, (w_shape[out_d],)), x_perm=(), groups=G,
      N0=w_shape[in_d] * math.prod(kernel), N1g=w_shape[out_d] // G)


@functools.partial(jax.jit, static_argnames=("layout",))
def weight_to_matrix(w: jax.Array, layout: MatrixLayout) -> jax.Array:
  """The weight operand as W (N0, G*N1g), problem g in columns [g*N1g, (g+1)*N1g)."""
  w = jnp.transpose(w, layout.w_perm)
  if layout.kind == "conv":  # (Cin_g, k1..kn, Cout): Cout is already group-major
    return w.reshape(layout.N0, -1)
  w = w.reshape(layout.groups, layout.N0, layout.N1g)
  if layout.groups == 1:
    return w[0]
  return jnp.transpose(w, (1, 0, 2)).reshape(layout.N0, layout.N1)


def leaf_index(leaf_shape: Sequence[int], prov: Prov, layout: MatrixLayout) -> np.ndarray:
  """(N0, N1) int64: the flat index into the leaf of every entry of the op's matrix W, so
  W == leaf.reshape(-1)[leaf_index(...)] (a scan slice covers part of the leaf)."""
  return np.asarray(weight_to_matrix(operand_index(leaf_shape, prov), layout), dtype=np.int64)


def matrix_to_weight(Q: jax.Array, layout: MatrixLayout) -> jax.Array:
  """Inverse of `weight_to_matrix`: W (N0, G*N1g) back to the weight operand's layout."""
  bshape, cshape, fshape = layout.w_shapes
  if (layout.groups == 1 and len(cshape) == 1 and len(fshape) == 1 and not bshape
      and layout.w_perm == (0, 1)):
    return Q  # a Dense-layout kernel is its own matrix (no reshape: keeps a sharded Q as is)
  return _matrix_to_weight(Q, layout)


@functools.partial(jax.jit, static_argnames=("layout",))
def _matrix_to_weight(Q: jax.Array, layout: MatrixLayout) -> jax.Array:
  bshape, cshape, fshape = layout.w_shapes
  if layout.kind == "conv":
    w = Q.reshape(cshape + fshape)
  else:
    w = jnp.transpose(Q.reshape(layout.N0, layout.groups, layout.N1g), (1, 0, 2))
    w = w.reshape(bshape + cshape + fshape)
  return jnp.transpose(w, np.argsort(layout.w_perm))


def group_slices(N0: int, N1: int, groups: int) -> list[tuple[slice, slice]]:
  """(rows of X, columns of W) of each of the G problems of a layer laid out side by side."""
  if N1 % groups:
    raise ValueError(f"N1={N1} is not divisible by the {groups} groups")
  n1 = N1 // groups
  return [(slice(g * N0, (g + 1) * N0), slice(g * n1, (g + 1) * n1)) for g in range(groups)]


@functools.partial(jax.jit, static_argnames=("layout",))
def dot_rows(x: jax.Array, layout: MatrixLayout) -> jax.Array:
  """The data operand of a dot_general as X (m, G*N0) (rows: every non-contracted dim)."""
  x = jnp.transpose(x, layout.x_perm)
  if layout.groups == 1:
    return x.reshape(-1, layout.N0)
  x = x.reshape(layout.groups, -1, layout.N0)
  return jnp.transpose(x, (1, 0, 2)).reshape(x.shape[1], -1)


def sample_patch_indices(key: jax.Array, n_images: int, n_positions: int,
                         p: float) -> jax.Array:
  """Random positions, ceil(p * T) distinct ones per image (Sec. 3.1, p = 0.25 in the paper).

  Returns:
    (n_images, ceil(p * T)) int32 indices into the T positions, sorted per image.
  """
  if not 0.0 < p <= 1.0:
    raise ValueError(f"patch fraction p must be in (0, 1], got {p}")
  keep = max(1, math.ceil(p * n_positions - 1e-9))
  if keep >= n_positions:
    return jnp.broadcast_to(jnp.arange(n_positions, dtype=jnp.int32), (n_images, n_positions))
  keys = jax.random.split(key, n_images)
  idx = jax.vmap(lambda k: jax.random.permutation(k, n_positions)[:keep])(keys)
  return jnp.sort(idx, axis=1).astype(jnp.int32)


def _nhwc(x: jax.Array, lhs_spec: Sequence[int]) -> jax.Array:
  """The conv input as (N, spatial..., C)."""
  perm = (lhs_spec[0],) + tuple(lhs_spec[2:]) + (lhs_spec[1],)
  return x if perm == tuple(range(x.ndim)) else jnp.transpose(x, perm)


def conv_patches(x: jax.Array, kernel_size: Sequence[int], strides: Sequence[int],
                 padding: Sequence[tuple[int, int]], *, lhs_dilation: Sequence[int],
                 rhs_dilation: Sequence[int]) -> jax.Array:
  """Vectorized patches (N, T, Cin*k1*...*kn) of a channels-last input, features channel-major
  (Cin, k1, ..., kn), T positions in row-major order of the patch grid (Sec. 2.3)."""
  n = len(kernel_size)
  dn = jax.lax.ConvDimensionNumbers(lhs_spec=(0, n + 1) + tuple(range(1, n + 1)),
                                    rhs_spec=(n + 1, n) + tuple(range(n)),
                                    out_spec=(0, n + 1) + tuple(range(1, n + 1)))
  patches = jax.lax.conv_general_dilated_patches(
      x, tuple(kernel_size), tuple(strides), tuple(tuple(p) for p in padding),
      lhs_dilation=tuple(lhs_dilation), rhs_dilation=tuple(rhs_dilation), dimension_numbers=dn,
      precision=jax.lax.Precision.HIGHEST)  # an exact copy, also on TPU
  return patches.reshape(x.shape[0], -1, patches.shape[-1])


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """The patch-relevant parameters of a conv_general_dilated eqn (hashable, for jit)."""
  lhs_spec: tuple[int, ...]
  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]
  lhs_dilation: tuple[int, ...]
  rhs_dilation: tuple[int, ...]

  @classmethod
  def of(cls, eqn) -> ConvSpec:
    p = eqn.params
    dn = p["dimension_numbers"]
    w_shape = eqn.invars[1].aval.shape
    return cls(tuple(dn.lhs_spec), tuple(w_shape[d] for d in dn.rhs_spec[2:]),
               tuple(p["window_strides"]), tuple(tuple(int(v) for v in q) for q in p["padding"]),
               tuple(p["lhs_dilation"]), tuple(p["rhs_dilation"]))


@functools.partial(jax.jit, static_argnames=("spec", "patch_p", "patch_stride"))
def conv_rows(x: jax.Array, key: jax.Array | None, spec: ConvSpec, patch_p: float,
              patch_stride: PatchStride) -> jax.Array:
  """The data matrix X (m, G*N0) of a conv: its input's vectorized patches (Sec. 2.3).

  Patches are taken at stride = the dilated kernel extent (disjoint patches, the paper's choice)
  or at the conv's own strides, with the conv's own padding, and a fraction `patch_p` of each
  image's positions is kept, drawn with `key` (the same key gives the same positions: that is
  how X and X~ stay row-aligned).
  """
  x = _nhwc(x, spec.lhs_spec)
  if patch_stride == "kernel":
    strides = tuple((k - 1) * d + 1 for k, d in zip(spec.kernel_size, spec.rhs_dilation))
  else:
    strides = spec.strides
  patches = conv_patches(x, spec.kernel_size, strides, spec.padding,
                         lhs_dilation=spec.lhs_dilation, rhs_dilation=spec.rhs_dilation)
  n_images, n_positions, features = patches.shape
  if patch_p < 1.0:
    idx = sample_patch_indices(key, n_images, n_positions, patch_p)
    patches = jnp.take_along_axis(patches, idx[:, :, None], axis=1)
  return patches.reshape(-1, features)


# ---------------------------------------------------------------------------------------------
# The program: weight ops, plans for the driver.


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


def strip_value(path: tuple) -> tuple:
  """Drop trailing `.value` attribute keys (boxed params: nn.Partitioned, nnx.Variable)."""
  path = tuple(path)
  while path and getattr(path[-1], "name", None) == "value" and not hasattr(path[-1], "key"):
    path = path[:-1]
  return path


def param_leaves(params: PyTree) -> tuple[list, list[int], list[str], Any, int]:
  """(candidate leaves, their positions in params' flat leaves, names, treedef, n flat).

  A linen variables dict (a mapping with a 'params' mapping) offers its 'params' collection;
  any other pytree offers all its floating-point leaves.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  variables = isinstance(params, Mapping) and isinstance(params.get("params"), Mapping)
  leaves, positions, names = [], [], []
  for i, (path, leaf) in enumerate(flat):
    path = strip_value(path)
    if variables and rules.key_name(path[0]) != "params":
      continue
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      continue
    leaves.append(leaf)
    positions.append(i)
    names.append(rules.path_name(path) or "<params>")
  return leaves, positions, names, treedef, len(flat)


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


def _has_sub_jaxprs(eqn) -> bool:
  return any(True for _ in jcore.subjaxprs(eqn.params)) if hasattr(jcore, "subjaxprs") else False


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
        layout = _conv_layout(eqn)
    else:
      layout = _dot_layout(eqn, side)
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
          if isinstance(y, jcore.Var) and y in op_out and bias_p is not None and op_out[y].bias is None:
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
        n_before = len(self.stops)
        sub_plan = self.walk(sub_jaxpr, sub_consts, sub_prov, unsupported)
        for v_out, v_sub in zip(eqn.outvars, sub_jaxpr.outvars):
          if isinstance(v_sub, jcore.Var) and v_sub in sub_plan.prov:
            prov[v_out] = sub_plan.prov[v_sub]
        if unsupported is None and _has_points(sub_plan):
          plan.points[k] = ("call", sub_plan)
        del n_before
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
