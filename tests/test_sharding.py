"""GPFQ, PSGD and ALQ on a 2 x 4 mesh of host CPU devices (tests/sharding_checks.py).

The number of host devices is fixed when JAX starts, so the checks run once in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8; each check is reported as its own test.
"""
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("sharding_checks.py")
CHECKS = [
    "gpfq_scan", "gpfq_scan_same", "gpfq_gram", "gpfq_gram_same", "gpfq_rows_padded",
    "gpfq_auto_and_stream", "gpfq_ambient_explicit_mesh", "gpfq_other_axes",
    "gpfq_no_mesh_falls_back", "gpfq_errors", "gpfq_layer_mesh_argument", "gpfq_network_on_mesh",
    "psgd_data_parallel", "psgd_param_sharded",
    "alq_data_parallel", "alq_param_sharded", "alq_param_sharded_explicit", "alq_prune_sharded",
]


@pytest.fixture(scope="module")
def results() -> dict[str, str]:
  # Backend optimization level 0 halves the (compile-bound) run time; the checks compare
  # results, not speed.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8 "
             "--xla_backend_optimization_level=0")
  proc = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True,
                        timeout=600)
  lines = [line for line in proc.stdout.splitlines() if line.startswith(("PASS ", "FAIL "))]
  out = {line.split()[1].rstrip(":"): line for line in lines}
  assert sorted(out) == sorted(CHECKS), (
      f"checks reported {sorted(out)}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}")
  assert proc.returncode == sum(line.startswith("FAIL") for line in lines), proc.stderr[-3000:]
  return out


@pytest.mark.parametrize("name", CHECKS)
def test_sharding(results, name):
  assert results[name].startswith("PASS"), results[name]
