"""Files that are never left half written: atomic replace, and a lock for read-merge-write.

A crash, a kill or a full disk during a write leaves the old file (or none), never a truncated
one: data go to a temporary file in the same directory, are flushed to disk, and replace the
target with `os.replace` (atomic on POSIX). `locked(path)` serialises read-merge-write cycles of
several processes on one file with `fcntl.flock` on a `<path>.lock` beside it.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from typing import Iterator


def atomic_write(path: str, data: bytes | str) -> None:
  """Write `data` to `path` so that readers see the old file or the whole new one."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data.encode() if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
  """Hold an exclusive advisory lock for `path` (on `<path>.lock`) for the `with` block."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".lock", "a") as lock:
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def set_aside(path: str, why: str) -> str:
  """Rename a damaged file to `<path>.corrupt-<time>` (kept for inspection); return the name."""
  aside = f"{path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
  os.replace(path, aside)
  print(f"warning: {path} {why}; moved it to {aside}")
  return aside
