"""orbax-checkpoint `save` / `restore` of packed params: a nested dict of plain arrays (no static
fields needed), each packed leaf with its format version and a CRC-32 of its arrays.
"""
from __future__ import annotations

import os
import zlib
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from qjax import activations
from qjax import views as views_lib
from qjax.export.codes import _KINDS, ActQuant, Packed, is_packed

PyTree = Any
# Version of the checkpoint layout `save` writes; `restore` refuses any other.
FORMAT_VERSION = 2


def _to_state(tree: PyTree) -> Any:
  if is_packed(tree):
    meta = [_KINDS.index(tree.kind), tree.bits, tree.group_size or 0, int(tree.symmetric),
            len(tree.shape), *tree.shape]
    if tree.view is not None:  # offset, N0, N1, K, K sizes, K strides
      v = tree.view
      meta += [v.offset, *v.shape, len(v.sizes), *v.sizes, *v.strides]
    state = {"data": np.asarray(tree.data), "meta": np.asarray(meta, np.int64)}
    if tree.act is not None:
      a = tree.act
      state["act_meta"] = np.asarray(
          [activations.FORMATS.index(a.fmt), a.bits, activations.GRANULARITIES.index(
              a.granularity), a.group_size or 0, int(a.symmetric), int(a.dynamic)], np.int64)
      state["act_scale"] = np.asarray(a.scale, np.float32).reshape(1)
      state["act_zero"] = np.asarray(a.zero, np.float32).reshape(1)
    if tree.kind == "table":
      state["levels"] = np.asarray(tree.levels)
    else:
      state["scale"], state["zero"] = np.asarray(tree.scale), np.asarray(tree.zero)
    state["check"] = np.asarray([FORMAT_VERSION, _checksum(state)], np.int64)
    return {"__packed__": state}
  if isinstance(tree, Mapping):
    return {str(k): _to_state(v) for k, v in tree.items()}
  if hasattr(tree, "shape") and hasattr(tree, "dtype"):
    return np.asarray(tree)
  raise TypeError(f"save handles nested dicts of arrays and Packed leaves, got "
                  f"{type(tree).__name__}")


def _checksum(state: Mapping[str, Any]) -> int:
  """CRC-32 over every array of a packed leaf's state (names, dtypes, shapes and bytes)."""
  crc = 0
  for k in sorted(state):
    if k == "check":
      continue
    a = np.ascontiguousarray(state[k])
    crc = zlib.crc32(f"{k}:{a.dtype.str}:{a.shape};".encode(), crc)
    crc = zlib.crc32(a.tobytes(), crc)
  return crc


def _from_state(state: Any, name: str = "") -> PyTree:
  if isinstance(state, Mapping) and "__packed__" in state:
    s = {k: np.asarray(v) for k, v in state["__packed__"].items()}
    where = f"packed leaf {name!r}"
    if "check" not in s or s["check"].shape != (2,):
      raise ValueError(f"{where}: no format version and checksum (written by an older qjax?)")
    version, crc = (int(v) for v in s["check"])
    if version != FORMAT_VERSION:
      raise ValueError(f"{where}: checkpoint format {version}, this qjax reads "
                       f"{FORMAT_VERSION}")
    if crc != _checksum(s):
      raise ValueError(f"{where}: checksum mismatch: the checkpoint was changed or damaged")
    kind, bits, group, symmetric, ndim, *rest = (int(v) for v in s["meta"])
    shape, rest = tuple(rest[:ndim]), rest[ndim:]
    view = None
    if rest:
      offset, n0, n1, k, *digits = rest
      if len(digits) != 2 * k:
        raise ValueError(f"{where}: metadata of {len(s['meta'])} fields does not match its "
                         f"view of {k} digits")
      view = views_lib.View((n0, n1), offset, tuple(digits[:k]), tuple(digits[k:2 * k]))
    levels = s.get("levels", np.zeros((1,), np.float32))
    scale = s.get("scale", np.zeros((1, 1), np.float32))
    zero = s.get("zero", np.zeros((1, 1), np.float32))
    act = None
    if "act_meta" in s:
      fmt, abits, gran, agroup, asym, adyn = (int(v) for v in np.asarray(s["act_meta"]))
      act = ActQuant(jnp.asarray(s["act_scale"], jnp.float32).reshape(()),
                     jnp.asarray(s["act_zero"], jnp.float32).reshape(()), bits=abits,
                     granularity=activations.GRANULARITIES[gran], group_size=agroup or None,
                     symmetric=bool(asym), dynamic=bool(adyn), fmt=activations.FORMATS[fmt])
    if not 0 <= kind < len(_KINDS):
      raise ValueError(f"{where}: unknown kind index {kind}")
    leaf = Packed(jnp.asarray(s["data"]), jnp.asarray(scale), jnp.asarray(zero),
                  jnp.asarray(levels), shape=shape, kind=_KINDS[kind], bits=bits,
                  group_size=group or None, symmetric=bool(symmetric), view=view, act=act)
    leaf.check(name)
    return leaf
  if isinstance(state, Mapping):
    return {k: _from_state(v, f"{name}/{k}" if name else k) for k, v in state.items()}
  return jnp.asarray(state)


def save(path: str | os.PathLike, packed: PyTree, *, compress: bool = False) -> int:
  """Write `pack` output to a new orbax checkpoint directory; returns its bytes on disk.

  Each packed leaf carries the format version and a CRC-32 of its arrays, which `restore`
  checks. Orbax writes to `<path>.orbax-checkpoint-tmp*` and renames when done: a save that
  fails removes it, and a save of `path` also removes any left by a killed earlier save.

  Without `compress` the arrays are stored raw, so the bytes on disk are `report`'s
  `total_bytes` plus orbax's metadata (a few KiB); with it orbax's zstd shrinks what compresses
  (constant zero points, the unused top bit of 3-bit codes in 4-bit nibbles).
  """
  import orbax.checkpoint as ocp  # imported here: only export needs it
  path = os.path.abspath(os.fspath(path))
  state = _to_state(packed)
  _remove_partial_saves(path)  # left by an earlier save of `path` that was killed
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=compress))
  try:
    checkpointer.save(path, args=ocp.args.PyTreeSave(state))
  except BaseException:
    _remove_partial_saves(path)
    raise
  return disk_bytes(path)


def _remove_partial_saves(path: str) -> None:
  """Delete orbax's temporary directories of `path` (`<path>.orbax-checkpoint-tmp*`)."""
  import shutil  # pylint: disable=g-import-not-at-top
  parent, base = os.path.split(path)
  if not os.path.isdir(parent):
    return
  for name in os.listdir(parent):
    if name.startswith(base + ".orbax-checkpoint-tmp"):
      print(f"export.save: removing {os.path.join(parent, name)}, left by an interrupted save")
      shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def restore(path: str | os.PathLike) -> PyTree:
  """Read a checkpoint written by `save`: the same packed tree (dict containers)."""
  import orbax.checkpoint as ocp
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
  state = checkpointer.restore(os.path.abspath(os.fspath(path)), args=ocp.args.PyTreeRestore())
  return _from_state(state)


def disk_bytes(path: str | os.PathLike) -> int:
  """Total size of the files under `path`."""
  total = 0
  for root, _, files in os.walk(os.fspath(path)):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total
