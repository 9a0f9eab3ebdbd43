"""Nothing lost, nothing silently wrong: atomic results and caches, checked exports (issue 21)."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import export
from qjax import grids
from qjax import train as train_lib
from qjax.experiments import results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(path) -> str:
  with open(path) as f:
    return f.read()


def _child(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, timeout=timeout,
                        capture_output=True, text=True)


# A child whose files may grow to `limit` bytes at most (a full disk), SIGXFSZ ignored so the
# write fails with OSError (EFBIG) as on a full disk.
_FULL_DISK = """
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
"""


def test_two_processes_saving_keep_every_row(tmp_path):
  path = str(tmp_path / "results.json")
  code = f"""
  from qjax.experiments import results
  for i in range(300):
    results.save({path!r}, "k", {{}}, {{f"TAG{{i}}": [{{"method": "m", "bits": i}}]}}, ())
  """
  procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code.replace("TAG", t))],
                            env={**os.environ, "PYTHONPATH": REPO})
           for t in ("a", "b")]
  assert [p.wait(timeout=300) for p in procs] == [0, 0]
  runs = results.load_runs(path, "k")
  assert sorted(runs) == sorted(f"{t}{i}" for t in "ab" for i in range(300))


def test_full_disk_keeps_the_old_results_file(tmp_path):
  path = str(tmp_path / "results.json")
  results.save(path, "k", {}, {"old": [{"method": "old", "bits": 4}]}, ())
  before = _read(path)
  big = [{"method": "new", "bits": 4, "pad": "x" * 100}] * 200  # ~30 kB, above the limit
  r = _child(_FULL_DISK.format(limit=8192) + f"""
from qjax.experiments import results
try:
  results.save({path!r}, "k", {{}}, {{"new": {big!r}}}, ())
except OSError as e:
  print("OSError", e.errno)
""")
  assert "OSError" in r.stdout, r.stderr
  assert _read(path) == before
  assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


def test_corrupt_results_file_is_named_and_set_aside(tmp_path, capsys):
  path = str(tmp_path / "results.json")
  with open(path, "w") as f:
    f.write('{"key": "k", "runs": {')
  with pytest.raises(ValueError, match="results.json"):
    results.load_runs(path, "k")
  results.check(path)
  out = capsys.readouterr().out
  assert "results.json" in out and "corrupt" in out
  aside = [f for f in os.listdir(tmp_path) if ".corrupt-" in f]
  assert len(aside) == 1
  assert _read(tmp_path / aside[0]) == '{"key": "k", "runs": {'
  assert not os.path.exists(path)
  rows = results.save(path, "k", {}, {"gpfq": [{"method": "gpfq", "bits": 4}]}, ())
  assert rows == [{"method": "gpfq", "bits": 4}]
  assert json.loads(_read(path))["rows"] == rows


def test_partial_float_cache_is_retrained_not_fatal(tmp_path, capsys):
  path = str(tmp_path / "float.msgpack")
  variables = {"params": {"w": jnp.arange(1000, dtype=jnp.float32)}}
  train_lib.save_variables(path, variables)
  np.testing.assert_array_equal(train_lib.restore_cached(path, variables)["params"]["w"],
                                variables["params"]["w"])
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])  # what a full disk left before the fix
  with pytest.raises(ValueError, match="float.msgpack"):
    train_lib.restore_variables(path, variables)
  assert train_lib.restore_cached(path, variables) is None
  assert "retraining" in capsys.readouterr().out
  assert not os.path.exists(path)


def test_full_disk_leaves_no_partial_float_cache(tmp_path):
  path = str(tmp_path / "float.msgpack")
  r = _child(_FULL_DISK.format(limit=4096) + f"""
import jax.numpy as jnp
from qjax import train
try:
  train.save_variables({path!r}, {{"w": jnp.zeros(100000, jnp.float32)}})
except OSError:
  print("OSError")
""")
  assert "OSError" in r.stdout, r.stderr
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# Export checks what it reads.


def _packed(seed=0):
  W = jax.random.normal(jax.random.key(seed), (37, 11), jnp.float32)
  grid = grids.fit(W, grids.GridSpec(4, "channel"))
  return {"dense": {"kernel": export.pack_kernel(grid.round(W), grid),
                    "bias": jnp.ones((11,), jnp.bfloat16)}}


def _tampered(tmp_path, change):
  """Save, edit the stored state of the packed kernel with `change`, save again as orbax."""
  import orbax.checkpoint as ocp
  export.save(tmp_path / "ok", _packed())
  ckpt = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
  state = ckpt.restore(str(tmp_path / "ok"), args=ocp.args.PyTreeRestore())
  leaf = state["dense"]["kernel"]["__packed__"]
  change(leaf)
  ckpt.save(str(tmp_path / "bad"), args=ocp.args.PyTreeSave(state))
  return tmp_path / "bad"


@pytest.mark.parametrize("change, message", [
    (lambda s: s["meta"].__setitem__(1, 2), "checksum"),            # metadata says 2 bits
    (lambda s: s["scale"].__setitem__((0, 0), np.nan), "checksum"),  # NaN scale
    (lambda s: s.__setitem__("data", s["data"][:-3]), "checksum"),   # truncated codes
    (lambda s: s.__setitem__("check", np.asarray([1, 0])), "format 1"),
    (lambda s: s.pop("check"), "format version"),
])
def test_tampered_checkpoint_is_refused_naming_the_leaf(tmp_path, change, message):
  path = _tampered(tmp_path, change)
  with pytest.raises(ValueError, match=f"dense.*{message}"):
    export.restore(path)


def test_restored_checkpoint_round_trips(tmp_path):
  packed = _packed()
  export.save(tmp_path / "ok", packed)
  np.testing.assert_array_equal(export.unpack(export.restore(tmp_path / "ok"))["dense"]["kernel"],
                                export.unpack(packed)["dense"]["kernel"])


@pytest.mark.parametrize("field, value, message", [
    ("bits", 2, "uint8 bytes"),
    ("scale", jnp.full((1, 11), jnp.nan), "NaN"),
    ("data", jnp.zeros((3,), jnp.uint8), "uint8 bytes"),
    ("scale", jnp.ones((2, 11)), "does not fit"),
])
def test_unpack_checks_each_leaf(field, value, message):
  import dataclasses
  packed = _packed()
  leaf = packed["dense"]["kernel"]
  packed["dense"]["kernel"] = dataclasses.replace(leaf, **{field: value})
  with pytest.raises(ValueError, match=f"dense.*{message}"):
    export.unpack(packed)


def test_report_counts_bytes_in_their_dtype():
  rep = export.report(_packed())
  assert rep["float_bytes"] == 11 * 2  # the bfloat16 bias


def test_save_removes_temporary_dirs_of_a_killed_save(tmp_path, capsys):
  stale = tmp_path / "ckpt.orbax-checkpoint-tmp-1234"
  stale.mkdir()
  (stale / "partial").write_bytes(b"x" * 10)
  export.save(tmp_path / "ckpt", _packed())
  assert not stale.exists()
  assert "interrupted save" in capsys.readouterr().out
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]
