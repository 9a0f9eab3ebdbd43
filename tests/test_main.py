"""The experiment runner: config validation and overrides, and one short run end to end."""
import json
import os
import subprocess
import sys

import pytest

from qjax import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "mnist_lenet5.py")


@pytest.fixture
def config():
  return main.load_config(CONFIG)


@pytest.mark.parametrize("key,value,match", [
    ("dataset", "svhn", "config.dataset: unknown dataset 'svhn'"),
    ("model", "lenet7", "config.model: unknown model 'lenet7'"),
    ("bits", (4, 0), "config.bits must be in 1..16"),
    ("bits", (17,), "config.bits must be in 1..16"),
    ("methods", ("rtn", "magic"), "unknown method 'magic'"),
])
def test_bad_config_values(config, key, value, match):
  config[key] = value
  with pytest.raises(ValueError, match=match):
    main.validate_config(config)


def test_unknown_override_key(config):
  main.check_overrides(config, ["--config.bits=3", "--config.epochs=2"])
  with pytest.raises(ValueError, match="unknown config key 'config.nope'"):
    main.check_overrides(config, ["--config.nope=1"])
  with pytest.raises(ValueError, match="unknown config key 'config.epochs.x'"):
    main.check_overrides(config, ["--config.epochs.x=1"])


def test_cli_override_and_clear_errors(tmp_path):
  cmd = [sys.executable, "-m", "qjax", f"--config={CONFIG}", f"--workdir={tmp_path}"]
  bad = subprocess.run(cmd + ["--config.nope=1"], capture_output=True, text=True, cwd=ROOT)
  assert bad.returncode != 0 and "unknown config key 'config.nope'" in bad.stderr
  bad = subprocess.run(cmd + ["--config.bits=0"], capture_output=True, text=True, cwd=ROOT)
  assert bad.returncode != 0 and "config.bits must be in 1..16" in bad.stderr


def test_one_short_run_writes_table_json_and_plot(config, tmp_path):
  config.epochs = 1
  config.bits = (8, 2)
  config.methods = ("rtn",)
  rows = main.run(config, str(tmp_path))
  methods = [(r["method"], r["bits"]) for r in rows]
  assert methods == [("float", 32), ("rtn", 8), ("rtn", 2)]
  with open(tmp_path / "results.json") as f:
    saved = json.load(f)
  assert saved["rows"] == rows and saved["config"]["bits"] == [8, 2]
  assert (tmp_path / "accuracy_vs_bits.png").stat().st_size > 1000
  float_acc, rtn8, rtn2 = (r["accuracy"] for r in rows)
  assert float_acc > 80.0 and abs(rtn8 - float_acc) <= 1.0 and rtn2 < float_acc
  # A second run restores the float model instead of training it again.
  again = main.run(config, str(tmp_path))
  assert again[0]["accuracy"] == float_acc


def test_format_table_aligns_columns():
  text = main.format_table([main.row("rtn", 4, 97.5, 98.0, 0.1234),
                            main.row("gpfq", 2, 90.0, 98.0, 3.0, sparsity=0.5)])
  lines = text.splitlines()
  assert lines[0].split() == ["method", "bits", "accuracy", "drop", "seconds", "sparsity"]
  assert len({len(line) for line in lines}) == 1
