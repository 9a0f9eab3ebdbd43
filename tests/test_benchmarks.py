"""The benchmark scripts run (--quick) and their JSON holds what the tables claim.

Speeds are not asserted (they live in the benchmarks, not in tests); the memory goal and exactness
are: streamed GPFQ stays under 1 GiB resident, and sharded GPFQ gives the one-device Q.
"""
import ast
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).parents[1] / "benchmarks"


def private_uses(source: str) -> list[str]:
  """qjax names a script reaches that start with '_' (private modules or functions)."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "qjax":
      parts = node.module.split(".") + [alias.name for alias in node.names]
      found += [f"from {node.module} import {a.name}" for a in node.names
                if any(p.startswith("_") for p in parts)]
    elif isinstance(node, ast.Import):
      found += [a.name for a in node.names
                if a.name.split(".")[0] == "qjax" and any(p.startswith("_") for p in
                                                           a.name.split("."))]
    elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
      if ast.unparse(node.value).split(".")[0] == "qjax":
        found.append(ast.unparse(node))
  return found


def test_private_uses_finds_them():
  assert sorted(private_uses("from qjax._gpfq import layer\nimport qjax._gpfq.kernels\n"
                             "from qjax.x import _f\nimport qjax\nqjax._gpfq\n")) == [
                                 "from qjax._gpfq import layer", "from qjax.x import _f",
                                 "qjax._gpfq", "qjax._gpfq.kernels"]
  assert not private_uses("import qjax\nfrom qjax import gpfq_flops\nx._y\n")


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py")))
def test_benchmarks_use_public_names_only(script):
  assert not private_uses((BENCHMARKS / script).read_text()), script


def run_quick(script: str, out: pathlib.Path) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick", "--out", str(out)],
                 env=env, check=True, capture_output=True, text=True, timeout=600)
  return json.loads(out.read_text())


@pytest.mark.slow
def test_gpfq_layer_benchmark(tmp_path):
  result = run_quick("gpfq_layer.py", tmp_path / "layer.json")
  assert len(result["speed"]) == 4
  for row in result["speed"]:
    assert row["gemm_gflops"] > 0 and row["auto_s"] > 0 and row["auto_flops_over_floor"] > 0
    # The two printed factors multiply back to the ratio.
    assert row["auto_over_floor"] == pytest.approx(
        row["auto_flops_over_floor"] / row["auto_gemm_efficiency"], rel=1e-9)
  assert result["stream"]["peak_rss_bytes"] < 2**30


@pytest.mark.slow
def test_gpfq_sharded_benchmark(tmp_path):
  result = run_quick("gpfq_sharded.py", tmp_path / "sharded.json")
  assert result["devices"] == 8
  sharded = [row for row in result["rows"] if row["mesh"] != "1 device"]
  assert len(sharded) == 6
  assert all(row["differ"]["entries"] == 0 for row in sharded), sharded


def test_scaling_estimate(tmp_path, monkeypatch):
  spec = importlib.util.spec_from_file_location("scaling_estimate",
                                                BENCHMARKS / "scaling_estimate.py")
  module = importlib.util.module_from_spec(spec)
  monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up
  spec.loader.exec_module(module)
  returned = module.main(["--out", str(tmp_path / "e.json"), "--md", str(tmp_path / "e.md")])
  result = json.loads((tmp_path / "e.json").read_text())
  assert result == json.loads(json.dumps(returned))
  # The committed markdown is this script's output (regenerate it when the model changes).
  assert (tmp_path / "e.md").read_text() == (BENCHMARKS / "scaling_estimate.md").read_text()
  slices = {m: r["slices"] for m, r in result.items()}
  assert any(e["fits"] for e in slices["7B"]["v5e-8"]["meshes"])
  assert not any(e["fits"] for e in slices["70B"]["v5p-8"]["meshes"])
  assert slices["70B"]["v5p-8"]["meshes"][0]["grams_bytes"] == 2 * 28672**2 * 4  # H, G of down
  # 7B `down` (11,008 x 4,096) takes the data form: on (2, 4) one all-reduce over the data axis
  # per block of 128 inputs, of its two 128 x 128 block Grams and the 128 x 1,024 projections.
  down = next(e for e in slices["7B"]["v5e-8"]["meshes"] if e["data"] == 2)
  assert down["forms"]["down"] == "scan" and down["widest_stop"] == "down"
  assert down["reduces_per_widest_stop"] == 86
  assert down["reduce_bytes_widest_stop"] == 4 * (2 * 128 * 128 + 128 * 4096 // 4)
  assert next(e for e in slices["7B"]["v5e-8"]["meshes"]
              if e["data"] == 1)["reduces_per_widest_stop"] == 0  # no data axis to sum over
  for model, per_slice in slices.items():
    for name, s in per_slice.items():
      meshes = s["meshes"]
      assert [e["data"] * e["model"] for e in meshes] == [s["chips"]] * len(meshes)
      assert {1, s["chips"]} <= {e["data"] for e in meshes}, (model, name)
      assert s["best"] == min(meshes, key=lambda e: e["total_bytes"])["data"]
      for e in meshes:
        assert e["total_bytes"] == e["weights_bytes"] + e["activations_bytes"] + e["grams_bytes"]
        assert e["fits"] == (e["total_bytes"] < 0.9 * s["hbm_gib"] * 2**30)
        assert e["minutes"] == pytest.approx(e["kernel_minutes"] + e["forward_minutes"])
      for a, b in zip(meshes, meshes[1:]):  # data doubles, so model halves
        assert b["data"] == 2 * a["data"]
        assert b["weights_bytes"] == pytest.approx(2 * a["weights_bytes"], rel=1e-9)
        assert a["activations_bytes"] == pytest.approx(2 * b["activations_bytes"], rel=1e-9)
    # The forwards split over every chip: 8x the chips, an eighth of the minutes.
    assert per_slice["v5e-64"]["meshes"][0]["forward_minutes"] == pytest.approx(
        per_slice["v5e-8"]["meshes"][0]["forward_minutes"] / 8)
