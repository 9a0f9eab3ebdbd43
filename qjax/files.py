"""Files that are never left half written: atomic replace, and a lock for read-merge-write.

A crash, a kill or a full disk during a write leaves the old file (or none), never a truncated
one: data go to a temporary file in the same directory, are flushed to disk, and replace the
target with `os.replace` (atomic on POSIX). `locked(path)` serialises read-merge-write cycles of
several processes on one file with `fcntl.flock` on a `<path>.lock` beside it.

Checkpoint JSON files (config.json, tokenizer.json, ...) are read with `read_json`, and their
numbers with `json_number`: a damaged file or a wrongly typed value is a ValueError naming the file
(and the key), not a bare JSONDecodeError or a TypeError from deep inside a model.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from typing import Any, Iterator, Mapping

_REQUIRED = object()


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


def read_json(where: str, data: bytes | str | None = None) -> Any:
  """The JSON value of the file `where` (or of `data`, its contents read elsewhere, e.g. from a
  zip: `where` then only names it in errors).

  Raises:
    ValueError: naming `where`, if it is not valid UTF-8 JSON (a damaged or truncated file).
  """
  if data is None:
    with open(where, "rb") as f:
      data = f.read()
  try:
    return json.loads(data)
  except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
    raise ValueError(f"{where}: not a valid JSON file ({e}); is the file damaged or truncated?") from None


def json_number(obj: Mapping[str, Any], key: str, where: str, kind: type = int,
                default: Any = _REQUIRED) -> Any:
  """obj[key], checked to be an int (kind=int) or an int or float (kind=float), as a `kind`.

  A JSON number is never coerced from a str ("384") and an int is never truncated from a float
  (4.5): either is a wrong config, not a value to guess. `default` is returned for a missing key
  (or null); without one, a missing key is an error.

  Raises:
    ValueError: naming the file `where` and the key.
  """
  if not isinstance(obj, Mapping):
    raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
  want = "an int" if kind is int else "a number"
  if obj.get(key) is None and default is not _REQUIRED:
    return default
  if key not in obj:
    raise ValueError(f"{where}: missing key {key!r} ({want})")
  value = obj[key]
  if isinstance(value, bool) or not isinstance(value, (int,) if kind is int else (int, float)):
    raise ValueError(f"{where}: {key!r} must be {want}, got {type(value).__name__} {value!r}")
  return kind(value)


def find_wheel(env: str, folder: str, prefix: str, fetch: str, what: str, required: bool,
               root: str | os.PathLike) -> str | None:
  """A model shipped as a PyPI wheel: the path in env var `env` (which must exist), else the
  newest `<root>/.cache/<folder>/<prefix>*.whl`, else None (or a ValueError naming the `fetch`
  command when `required`)."""
  path = os.environ.get(env)
  if path:
    if not os.path.exists(path):
      raise ValueError(f"{env}={path!r} does not exist; fetch the wheel with `{fetch}`")
    return path
  cache = os.path.join(os.fspath(root), ".cache", folder)
  if os.path.isdir(cache):
    wheels = sorted(f for f in os.listdir(cache) if f.startswith(prefix) and f.endswith(".whl"))
    if wheels:
      return os.path.join(cache, wheels[-1])
  if required:
    raise ValueError(f"{what} not found (env {env}, or .cache/{folder}/*.whl under "
                     f"{os.path.abspath(root)}); fetch it with `{fetch}`")
  return None
