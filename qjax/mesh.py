"""Models that do not fit one device: params and calibration data placed on a (data, model) mesh.

The driver (`qjax.driver.run`, so `qjax.gpfq`, `qjax.gptq`) needs no mesh argument: its segments
are jitted functions, and jit follows the shardings of its inputs (GSPMD). Place the params with
`shard_params` (FSDP-style: each big kernel split over the `model` axis along its largest
divisible dimension) and the batch with `shard_batch` (examples split over the `data` axis);
every segment then runs on the mesh, each layer's Gram / Hessian X^T X is a sum over the data
shards (one all-reduce, inserted by XLA), GPTQ's column loop runs with its output channels split
over the model axis (its rows are independent given H), and the returned params carry the
input's shardings (`keep_shardings`).

The same Q as one device, bit for bit: on a small model the default path gives it, but on deep
ones the streams drift apart (a data-split Gram's all-reduce adds the shards' partials in
another order than one device's product; a product with a kernel split over its fan-in, or a
layer norm over features split by the previous kernel, sums partials across the model axis).
`reduce_chunks=C` on `qjax.gptq` / `qjax.gpfq` / `qjax.qronos` (`qjax.driver.run`) makes the
reduction deterministic: every Gram is C fixed row chunks added in a fixed order (`exact_tmm`)
and the segments use each split weight whole (all-gathered inside the segment), so every mesh
gives the one-device Q of the same C.

`memory_plan` estimates the bytes per device before a long run (weights of both streams, the
largest layer's Hessian, the activations of both streams at the widest stop); `compiled_bytes`
reads XLA's compiled memory analysis of a jitted function on the real shardings, and
`qjax.plan_segments` that of every segment of a driver run (a dry run, Q = W).

Multi-host: the same calls should work on global arrays after `jax.distributed.initialize()`
(build them with `jax.make_array_from_process_local_data`): the driver path reads no split array
to the host (the finite checks, errors and alphabets reduce on the devices and fetch replicated
scalars; resharding is a jitted identity, `reshard`). tests/test_mesh.py checks this on one host
by making every host read of a split array raise; a real multi-host run is not tested.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any


def check_axis(mesh: Mesh, axis: str | None, arg: str) -> None:
  """ValueError naming `arg` when `axis` is not an axis of `mesh`."""
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  if axis is not None and axis not in mesh.axis_names:
    raise ValueError(f"{arg}={axis!r} is not an axis of the mesh (axes {mesh.axis_names})")


def kernel_spec(shape: tuple[int, ...], size: int, axis: str, min_elements: int) -> P:
  """The rule: split the largest dimension divisible by `size`; small leaves stay replicated.

  Largest first so the split halves the biggest share; ties go to the last (output) dim, the
  one GPTQ's independent rows and GPFQ's neurons run over.
  """
  if size == 1 or len(shape) < 2 or int(np.prod(shape)) < min_elements:
    return P()
  dims = [d for d in range(len(shape)) if shape[d] % size == 0]
  if not dims:
    return P()
  best = max(dims, key=lambda d: (shape[d], d))
  return P(*[axis if d == best else None for d in range(len(shape))])


def shard_params(params: PyTree, mesh: Mesh, *, model_axis: str = "model",
                 min_elements: int = 1024) -> PyTree:
  """Params on `mesh`: each leaf of >= 2 dims and >= `min_elements` entries split over
  `model_axis` along its largest divisible dim (`kernel_spec`); everything else replicated.

  Raises ValueError when `model_axis` is not an axis of the mesh.
  """
  check_axis(mesh, model_axis, "model_axis")
  size = mesh.shape[model_axis]

  def place(leaf):
    leaf = jnp.asarray(leaf)
    return jax.device_put(leaf, NamedSharding(mesh, kernel_spec(leaf.shape, size, model_axis,
                                                                min_elements)))
  return jax.tree_util.tree_map(place, params)


def shard_batch(batch: PyTree, mesh: Mesh, *, data_axis: str = "data") -> PyTree:
  """A calibration batch (or a list of batches) split over `data_axis` on its leading axis.

  Raises ValueError when the axis does not exist or the examples do not divide by its size.
  We do not pad: padded rows would add zero rows to X (exact for the Grams) but also shift
  layer norms' and attention's statistics of nothing, and change the report's row count; pad
  your data yourself to a multiple of the data-axis size if you need to.
  """
  check_axis(mesh, data_axis, "data_axis")
  if isinstance(batch, list):
    return [shard_batch(b, mesh, data_axis=data_axis) for b in batch]
  size = mesh.shape[data_axis]

  def place(x):
    # Host data stay numpy: a multi-host device_put needs the host value, not a local device array.
    x = x if isinstance(x, jax.Array) else np.asarray(x)
    if x.ndim == 0 or x.shape[0] % size:
      raise ValueError(f"batch of {x.shape[0] if x.ndim else 0} examples (shape {x.shape}) does "
                       f"not divide over the {size} devices of mesh axis {data_axis!r}; pass a "
                       f"multiple of {size} examples")
    return jax.device_put(x, NamedSharding(mesh, P(data_axis)))
  return jax.tree_util.tree_map(place, batch)


def shardings(tree: PyTree) -> PyTree:
  """The sharding of each leaf (None for leaves that are not jax Arrays)."""
  return jax.tree_util.tree_map(lambda x: getattr(x, "sharding", None), tree)


def keep_shardings(reference: PyTree, out: PyTree) -> PyTree:
  """`out` with each leaf placed as the same leaf of `reference` when that is a NamedSharding
  (the driver's result keeps the input's shardings); other leaves are returned unchanged."""
  ref_leaves = jax.tree_util.tree_leaves(reference)
  out_leaves, treedef = jax.tree_util.tree_flatten(out)
  if len(ref_leaves) != len(out_leaves):
    return out
  placed = []
  for r, o in zip(ref_leaves, out_leaves):
    s = getattr(r, "sharding", None)
    if isinstance(s, NamedSharding) and hasattr(o, "shape") and getattr(o, "sharding", None) != s:
      o = reshard(o, s) if isinstance(o, jax.Array) else jax.device_put(o, s)
    placed.append(o)
  return jax.tree_util.tree_unflatten(treedef, placed)


def replicated(x: Any) -> Any:
  """`x` placed whole on every device of its mesh when it is a jax.Array split over one (else
  `x` itself, and tracers untouched): a reduction over the result runs in the one-device order
  on every device, so a mean over a sharded vector gives the one-device bits (a split sum adds
  per-device partial sums, 1 ulp off). For small vectors (per-neuron statistics) only."""
  if isinstance(x, jax.core.Tracer) or not isinstance(x, jax.Array):
    return x
  s = x.sharding
  if isinstance(s, NamedSharding) and not s.is_fully_replicated:
    return reshard(x, NamedSharding(s.mesh, P()))
  return x


@functools.lru_cache(maxsize=None)
def _identity_to(sharding: NamedSharding) -> Callable:
  return jax.jit(lambda a: a, out_shardings=sharding)


def reshard(x: jax.Array, sharding: NamedSharding) -> jax.Array:
  """`x` placed with `sharding`, on the devices: a jitted identity (XLA's collectives) when `x`
  is split over several devices, so no host reads it (an eager device_put between two
  shardings of one host's devices copies through host memory; a global multi-host array cannot
  be read at all), else `jax.device_put`. Bits are unchanged."""
  if x.sharding == sharding:
    return x
  if len(x.sharding.device_set) > 1 and not x.is_fully_replicated:
    return _identity_to(sharding)(x)
  return jax.device_put(x, sharding)


def check_reduce_chunks(reduce_chunks: Any) -> None:
  """ValueError naming `reduce_chunks` unless it is None or a positive int."""
  if reduce_chunks is None:
    return
  if isinstance(reduce_chunks, bool) or not isinstance(reduce_chunks, (int, np.integer)) or (
      reduce_chunks < 1):
    raise ValueError(f"reduce_chunks must be None or a positive int, got {reduce_chunks!r}")


def row_shards(x: Any) -> int:
  """How many devices split the rows (leading axis) of `x` (1 for host arrays and tracers)."""
  s = getattr(x, "sharding", None)
  if isinstance(x, jax.core.Tracer) or s is None or np.ndim(x) == 0 or not x.shape[0]:
    return 1
  return x.shape[0] // s.shard_shape(x.shape)[0]


def check_chunk_rows(x: Any, reduce_chunks: int) -> None:
  """ValueError naming `reduce_chunks` unless it divides the rows of `x` and is a multiple of
  the number of devices its rows are split over (each chunk then lives on one device)."""
  rows, shards = int(np.shape(x)[0]), row_shards(x)
  if rows % reduce_chunks or reduce_chunks % shards:
    raise ValueError(f"reduce_chunks={reduce_chunks} must divide the {rows} rows of a layer's "
                     f"data and be a multiple of the {shards} devices they are split over")


def exact_tmm(a: jax.Array, b: jax.Array, reduce_chunks: int) -> jax.Array:
  """a^T b (rows of a and b summed) in an order that does not depend on the devices.

  The rows are cut into `reduce_chunks` fixed chunks (`check_chunk_rows`: each chunk on one
  device); one batched product gives the chunks' partial sums, every chunk's product the same
  shape on one device and on any mesh, and the partials are added in the fixed order c = 0, 1,
  ... (elementwise adds: bitwise the same wherever they run). On a data-split mesh a plain
  a^T b lets XLA sum the shards' partials in its own order instead, a few ulp off one device's
  product. Cost: the C partials (C x a.shape[1] x b.shape[1], float32) are held at once.
  """
  c, n = reduce_chunks, a.shape[0]
  parts = jax.lax.dot_general(a.reshape(c, n // c, a.shape[1]), b.reshape(c, n // c, b.shape[1]),
                              (((1,), (1,)), ((0,), (0,))), precision=jax.lax.Precision.HIGHEST)
  out = parts[0]
  for i in range(1, c):
    out = out + parts[i]
  return out


def per_device_bytes(tree: PyTree) -> int:
  """Bytes the leaves of `tree` occupy on the busiest device (its addressable shards)."""
  per: dict[Any, int] = {}
  for leaf in jax.tree_util.tree_leaves(tree):
    if isinstance(leaf, jax.Array):
      for s in leaf.addressable_shards:
        per[s.device] = per.get(s.device, 0) + s.data.nbytes
    else:
      per[None] = per.get(None, 0) + np.asarray(leaf).nbytes
  return max(per.values()) if per else 0


def compiled_bytes(fn: Callable, *args) -> int:
  """Peak bytes per device XLA plans for `jax.jit(fn)(*args)` on the args' shardings
  (arguments + outputs + temporaries - aliased, from the compiled memory analysis)."""
  m = jax.jit(fn).lower(*args).compile().memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Estimated bytes per device of one lockstep quantization run (both streams).

  weights: float + quantized params (2 copies) split by their shardings (or the rule).
  hessian: the largest layer's N0 x N0 Gram (GPTQ's H; GPFQ keeps two), float32, replicated
    (it is needed whole by every model shard; its rows are summed over the data axis).
  activations: the widest stop's input rows in both streams, split over the data axis.
  """
  weights: int
  hessian: int
  activations: int

  @property
  def total(self) -> int:
    return self.weights + self.hessian + self.activations

  def __str__(self) -> str:
    mib = lambda b: f"{b / 2**20:,.1f} MiB"
    return (f"per device: weights {mib(self.weights)}, hessian {mib(self.hessian)}, "
            f"activations {mib(self.activations)}, total {mib(self.total)}")


def memory_plan(weight_shapes: dict[str, tuple[int, ...]], *, rows: int, data: int = 1,
                model: int = 1, weight_bytes: int = 4, act_bytes: int = 4,
                grams: int = 1) -> MemoryPlan:
  """Estimate per-device bytes for quantizing a model given its kernels' (N0, N1) shapes.

  Args:
    weight_shapes: {name: kernel shape}; a kernel's first dim is its fan-in N0 (the layer's
      input width), the rest the outputs.
    rows: calibration rows (tokens or patches) at every stop, over all batches.
    data, model: sizes of the mesh's data and model axes.
    weight_bytes, act_bytes: bytes per weight / activation entry (2 for bfloat16).
    grams: N0 x N0 float32 matrices kept per layer (1 for GPTQ, 2 for GPFQ's Gram form).
  """
  for arg, v in (("rows", rows), ("data", data), ("model", model)):
    if int(v) < 1:
      raise ValueError(f"{arg} must be >= 1, got {v}")
  n_weights = sum(int(np.prod(s)) for s in weight_shapes.values())
  widest = max((s[0] for s in weight_shapes.values()), default=0)
  weights = 2 * n_weights * weight_bytes // model
  hessian = grams * widest * widest * 4
  activations = 2 * (-(-rows // data)) * widest * act_bytes
  return MemoryPlan(weights, hessian, activations)
