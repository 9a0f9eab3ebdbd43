"""GPFQ for one layer on a `jax.sharding.Mesh`: neurons over one mesh axis, rows over another.

Neurons (columns of W) never interact in the recursion (paper Eq. 7-8), so the N1 columns are
split over `model_axis` with no communication at all. The calibration rows (m) enter only through
inner products, which are sums over rows: each shard of rows computes its partial sums and one
`psum` adds them. This module only adds `jax.shard_map` around the kernels of
`qjax._gpfq.kernels` (both exact forms, the same functions as on one device):

* Gram form ("gram"): rows are split over *every* row axis (data and model jointly), each device
  accumulates its partial H = Xt^T Xt and G = Xt^T X, one psum at the end makes H and G whole and
  replicated, then each model shard runs `gram_form` on its own columns. The 4 m N0^2 accumulation
  (the dominant term) is split over all devices; the 4 N0^2 N1 recursion over `model_axis`.
* data form ("scan"): rows split over `data_axis`, the state U (m, N1) split (data, model). Per
  block of B inputs, the projections Xt_b^T U (B, N1/M) and the B x B block Grams are psum'd over
  `data_axis` (one all-reduce per block); the rest is local. ~6 m N0 N1 / (D M) flops per device.

The rounder's per-neuron leaves (ndim >= 2, neurons on the last axis; see the protocol in
`qjax._gpfq.kernels`) are split over `model_axis` like W's columns; its other leaves are
replicated.

Q is the single-device Q up to floating-point order: the sums over rows and columns are taken in
another order, so an argument of Q within rounding error of a tie between two levels can round the
other way, and that neuron's later steps then follow another path. Small layers match exactly
(tests/test_sharding.py); at m = 2048, N0 = N1 = 1024 a few neurons of 1024 differ, as between
the scan and Gram forms on one device (benchmarks/gpfq_sharded.py).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

from qjax import mesh as mesh_lib
from qjax._gpfq import kernels

AnyMesh = Mesh | AbstractMesh


# ------------------------------------------------------------------------------------------------
# The mesh.


def resolve_mesh(mesh: AnyMesh | None = None) -> AnyMesh | None:
  """`mesh` itself, else the mesh set by `jax.set_mesh`, else None (run on one device).

  The ambient mesh is concrete outside jit (inputs can then be placed on it directly), abstract
  under jit.
  """
  if mesh is not None:
    return mesh
  abstract = jax.sharding.get_abstract_mesh()
  if abstract.empty:
    return None
  try:
    concrete = jax.sharding.get_mesh()
  except ValueError:  # raised under jit, where only the abstract mesh is visible
    return abstract
  return abstract if concrete.empty else concrete


def _axis_size(mesh: AnyMesh, axis: str | None) -> int:
  return 1 if axis is None else mesh.shape[axis]


def check_mesh(mesh: Any, data_axis: str | None, model_axis: str | None, N1: int) -> None:
  """Raises ValueError unless the axes name distinct axes of `mesh` and M divides N1."""
  if not isinstance(mesh, (Mesh, AbstractMesh)):
    raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  for name, axis in (("data_axis", data_axis), ("model_axis", model_axis)):
    if axis is not None and axis not in mesh.axis_names:
      raise ValueError(f"{name}={axis!r} is not an axis of the mesh {tuple(mesh.axis_names)}")
  if data_axis is not None and data_axis == model_axis:
    raise ValueError(f"data_axis and model_axis must differ, both are {data_axis!r}")
  M = _axis_size(mesh, model_axis)
  if N1 % M:
    raise ValueError(f"W has N1={N1} columns (neurons), not divisible by the size {M} of "
                     f"model_axis={model_axis!r}; pad W with zero columns and drop them from Q")


def _is_tracer(a: Any) -> bool:
  return isinstance(a, jax.core.Tracer)


def _pad_rows_to(a: Any, multiple: int) -> Any:
  """Zero rows up to a multiple of the row shards: exact, a zero row adds 0 to every sum."""
  extra = -a.shape[0] % multiple
  if not extra:
    return a
  pad = ((0, extra), (0, 0))
  return np.pad(a, pad) if isinstance(a, np.ndarray) else jnp.pad(a, pad)


def _placer(mesh: AnyMesh, dtype) -> Callable[[Any, P], Any]:
  """Puts each input on the shards its in_spec asks for (cast to `dtype`; None keeps the dtype).

  Eager arrays go straight to their shards (host data is never gathered on one device first).
  Traced values are resharded inside the jit: explicitly on Explicit mesh axes (their sharding is
  part of the type and must match the in_spec), by shard_map itself on Auto axes.
  """
  explicit = jax.sharding.AxisType.Explicit in mesh.axis_types

  def place(a: Any, spec: P) -> Any:
    if _is_tracer(a) or not isinstance(mesh, Mesh):
      a = jnp.asarray(a, dtype)
      return jax.reshard(a, NamedSharding(mesh, spec)) if explicit else a
    if dtype is not None:
      a = a.astype(dtype, copy=False) if isinstance(a, np.ndarray) else jnp.asarray(a).astype(dtype)
    if isinstance(a, jax.Array):  # already on devices: reshard there (no host copy)
      return mesh_lib.reshard(a, NamedSharding(mesh, spec))
    return jax.device_put(a, NamedSharding(mesh, spec))

  return place


def rounder_specs(rounder: Any, model_axis: str | None) -> Any:
  """The rounder's PartitionSpecs: per-neuron leaves split like W's columns, the rest replicated."""
  return jax.tree.map(
      lambda a: P(*(None,) * (a.ndim - 1), model_axis) if kernels.per_neuron(a) else P(),
      rounder)


# ------------------------------------------------------------------------------------------------
# The two forms under shard_map.


@functools.lru_cache(maxsize=None)
def _gram_fns(mesh: AnyMesh, row_axes: tuple[str, ...], same: bool):
  """(grams, total): one chunk's per-row-shard [H, G] ([H] if X is X_tilde), and their psum."""
  rows = P(row_axes or None)

  def grams(x, xt):  # -> (1, k, N0, N0), [H] or [H, G]: this row shard's contribution
    if same:
      return kernels.tmm(x, x)[None, None]
    return jnp.stack([kernels.tmm(xt, xt), kernels.tmm(xt, x)])[None]

  def total(S):  # the only communication of the Gram form: one all-reduce of k N0^2 floats
    return jax.lax.psum(S[0], row_axes) if row_axes else S[0]

  grams = jax.jit(jax.shard_map(grams, mesh=mesh, in_specs=(P(row_axes or None, None),) * 2,
                                out_specs=rows))
  total = jax.jit(jax.shard_map(total, mesh=mesh, in_specs=rows, out_specs=P()))
  return grams, total


@functools.lru_cache(maxsize=None)
def _recursion_fn(mesh: AnyMesh, data_axis: str | None, model_axis: str | None, method: str,
                  block_size: int, same: bool, rounder_def: Any, rounder_leaf_specs: tuple):
  """The jitted shard_map of one form's recursion: W columns over `model_axis`, Q likewise."""
  cols = P(None, model_axis)
  rounder_spec = jax.tree.unflatten(rounder_def, rounder_leaf_specs)
  if method == "gram":
    body = functools.partial(kernels.gram_form, block_size=block_size)
    in_specs = (cols, P(), P(), rounder_spec)
  else:
    psum = (lambda t: jax.lax.psum(t, data_axis)) if data_axis else (lambda t: t)
    body = functools.partial(kernels.data_form_body, block_size=block_size, same=same, psum=psum)
    rows = P(data_axis, None)
    in_specs = (cols, rows, rows, rounder_spec)
  # check_vma=False: the scan carries (U, Q) start as zeros, replicated, and become per-shard
  # values; their replication is known here (Q is identical across data shards) but not typed.
  return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=cols,
                               check_vma=False))


def gpfq_layer_sharded(W: Any, X: Any, X_tilde: Any, levels: Any, *, mesh: AnyMesh | None = None,
                       method: str = "auto", data_axis: str | None = "data",
                       model_axis: str | None = "model", block_size: int | None = None,
                       dtype: Any = jnp.float32) -> jax.Array:
  """The sharded path of `qjax.gpfq_layer`: neurons and calibration rows split over a mesh.

  `qjax.gpfq_layer(..., mesh=mesh)` checks its inputs and calls this; called directly, only the
  mesh arguments are checked (bad shapes or NaNs fail inside JAX, not with a named ValueError).

  What is sharded (D = size of `data_axis`, M = size of `model_axis`):

  * W (N0, N1), Q and the rounder's per-neuron leaves: columns (neurons) over `model_axis`,
    P(None, model_axis).
  * method "gram": X, X_tilde rows over both axes, P((data_axis, model_axis), None); H and G
    (N0, N0) are psum'd once and replicated. Per device: 4 m N0^2 / (D M) + 4 N0^2 N1 / M flops,
    memory 2 N0^2 + the local rows.
  * method "scan": X, X_tilde rows over `data_axis`, P(data_axis, None); U (m, N1) over
    (data_axis, model_axis). Per block of B inputs one psum over `data_axis` of (B, N1/M + 2B)
    floats. Per device ~6 m N0 N1 / (D M) flops, memory (m/D) (2 N0 + N1/M).

  Axes may be None (that dimension is not split); other mesh axes replicate. The method "auto"
  picks exactly as `gpfq_layer` does (global flop counts), so both give the same Q.

  Args:
    W: float kernel (N0, N1); N1 must be divisible by the size of `model_axis`.
    X: float-network layer input (m, N0), any m (zero rows pad it to a multiple of the row
      shards, which is exact); or an iterable of (X_chunk, X_tilde_chunk) pairs (Gram form).
    X_tilde: quantized-network layer input (m, N0); None means X_tilde = X.
    levels: a 1-D alphabet (sorted here) or a rounder (protocol in `qjax._gpfq.kernels`).
    mesh: the device mesh; None uses the mesh set by `jax.set_mesh`, and if there is none, runs
      the one-device kernels.
    method: "auto", "scan" or "gram" (see `gpfq_layer`).
    data_axis: mesh axis name splitting the calibration rows.
    model_axis: mesh axis name splitting the neurons.
    block_size: inputs per block (None: 128, as `gpfq_layer`).
    dtype: compute dtype.

  Returns:
    Q (N0, N1) with W's dtype, sharded NamedSharding(mesh, P(None, model_axis)) (replicated over
    the other axes); on one device when there is no mesh.

  Raises:
    ValueError: for a mesh that is not a Mesh, an axis name not in it, equal axes, N1 not
      divisible by the size of `model_axis`, or an unknown method.
  """
  if method not in ("auto", "scan", "gram"):
    raise ValueError(f"method must be 'auto', 'scan' or 'gram', got {method!r}")
  rounder = kernels.as_rounder(levels, dtype)
  B = int(block_size or kernels.DEFAULT_BLOCK_SIZE)
  is_array = hasattr(X, "shape")
  same = is_array and (X_tilde is None or X_tilde is X)
  if method == "auto":
    method = kernels.auto_method(X.shape[0], *W.shape, B, same) if is_array else "gram"
  if not is_array and method == "scan":  # the data form needs all rows at once
    pairs = list(X)
    X = jnp.concatenate([jnp.asarray(x, dtype) for x, _ in pairs])
    X_tilde = jnp.concatenate([jnp.asarray(xt, dtype) for _, xt in pairs])
  out_dtype = jax.dtypes.canonicalize_dtype(W.dtype)
  mesh = resolve_mesh(mesh)
  if mesh is None:
    return kernels.run(W, X, X_tilde, rounder, method, B, same, dtype).astype(out_dtype)
  check_mesh(mesh, data_axis, model_axis, W.shape[1])

  D, M = _axis_size(mesh, data_axis), _axis_size(mesh, model_axis)
  place = _placer(mesh, dtype)
  place_as_is = _placer(mesh, None)
  cols = P(None, model_axis)
  leaves, rounder_def = jax.tree.flatten(rounder)
  leaf_specs = tuple(jax.tree.leaves(rounder_specs(rounder, model_axis)))
  recursion = _recursion_fn(mesh, data_axis, model_axis, method, B, same, rounder_def,
                            leaf_specs)
  W32 = place(W, cols)
  rounder = jax.tree.unflatten(rounder_def, [place_as_is(a, s) for a, s in zip(leaves,
                                                                                 leaf_specs)])
  if method == "scan":
    (x, xt), = kernels.pairs(X, X_tilde)
    rows = P(data_axis, None)
    x = place(_pad_rows_to(x, D), rows)
    xt = x if same else place(_pad_rows_to(xt, D), rows)
    Q = recursion(W32, x, xt, rounder)
  else:
    row_axes = tuple(a for a in (data_axis, model_axis) if a is not None)
    grams, total = _gram_fns(mesh, row_axes, same)
    n = D * M
    rows = P(row_axes or None, None)
    S = None  # (D M, k, N0, N0): partial sums stay on their row shard until the one psum
    for x, xt in kernels.pairs(X, X_tilde):
      previous = S
      x = place(_pad_rows_to(x, n), rows)
      s = grams(x, x if same else place(_pad_rows_to(xt, n), rows))
      S = s if S is None else S + s
      # As on one device: wait for the previous chunk, or a fast producer queues every chunk.
      if previous is not None and not _is_tracer(previous):
        previous.block_until_ready()
    HG = total(S)
    H, G = HG[0], HG[-1]
    Q = recursion(W32, H, G, rounder)
  return Q.astype(out_dtype)
