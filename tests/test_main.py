"""The experiment runner and its CLI: config validation, overrides, results files, clear errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from qjax import main
from qjax.experiments import classify, results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "mnist_lenet5.py")


@pytest.fixture
def config():
  config = main.load_config(CONFIG)
  config.seeds = (0,)
  return config


@pytest.mark.parametrize("key,value,error,match", [
    ("dataset", "svhn", ValueError, "config.dataset: unknown dataset 'svhn'"),
    ("model", "lenet7", ValueError, "config.model: unknown model 'lenet7'"),
    ("bits", (4, 0), ValueError, "config.bits must be in 2..16"),
    ("bits", (17,), ValueError, "config.bits must be in 2..16"),
    ("methods", ("rtn", "magic"), ValueError, "unknown method 'magic'"),
    ("task", "translate", ValueError, "config.task: unknown task 'translate'"),
    ("gpfq.bits", (4, 0), ValueError, "config.gpfq.bits must be in 1..16"),
    ("gpfq.bits", ("abc",), TypeError, "config.gpfq.bits must be an int"),
    ("gpfq.rule", "nope", ValueError, "config.gpfq.rule must be one of"),
    ("psgd.bits", (5,), ValueError, "config.psgd.recipes has no recipe 'bits5'"),
])
def test_bad_config_values(config, key, value, error, match):
  node = config
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  with config.unlocked() if hasattr(config, "unlocked") else _nullcontext():
    node[leaf] = value
  with pytest.raises(error, match=match):
    main.validate_config(config)


class _nullcontext:
  def __enter__(self):
    return self

  def __exit__(self, *args):
    return False


def test_unknown_method_section_key(config):
  config.gpfq.unlock()
  config.gpfq.nope = 1
  with pytest.raises(ValueError, match=r"config.gpfq: unknown keys \['nope'\]"):
    main.validate_config(config)


def test_unknown_override_key(config):
  main.check_overrides(config, ["--config.bits=3", "--config.epochs=2"])
  with pytest.raises(ValueError, match="unknown config key 'config.nope'"):
    main.check_overrides(config, ["--config.nope=1"])
  with pytest.raises(ValueError, match="unknown config key 'config.epochs.x'"):
    main.check_overrides(config, ["--config.epochs.x=1"])


def _cli(args, cwd, **kw):
  return subprocess.run([sys.executable, "-m", "qjax", *args], capture_output=True, text=True,
                        cwd=cwd, timeout=300, **kw)


def test_cli_errors_come_before_any_training(tmp_path):
  # Each of these used to fail only after training (or with a traceback); now: exit 1 at once,
  # one line naming the key, and nothing written to the work directory.
  cases = [(["--config.nope=1"], "unknown config key 'config.nope'"),
           (["--config.bits=0"], "config.bits must be in 2..16"),
           (["--config.gpfq.bits=0"], "config.gpfq.bits must be in 1..16"),
           (["--config.gpfq.bits=abc"], "config.gpfq.bits must be"),
           ([f"--config={tmp_path}/missing.py"], "config file"),
           ]
  for args, message in cases:
    work = tmp_path / "work"
    out = _cli([f"--workdir={work}", *args], cwd=ROOT)
    assert out.returncode == 1, (args, out.stderr[-2000:])
    assert message in out.stderr and "Traceback" not in out.stderr, (args, out.stderr[-2000:])
    assert not work.exists()


def test_cli_help_lists_config_keys_and_runs_from_any_directory(tmp_path):
  out = _cli(["--help"], cwd=tmp_path)  # default config path resolved from the repository
  assert out.returncode == 0, out.stderr
  assert "config.gpfq.bits = " in out.stdout and "config.methods = " in out.stdout
  out = _cli(["--config=configs/mnist_lenet5_psgd.py", "--help"], cwd=tmp_path)
  assert out.returncode == 0 and "config.psgd.recipes" in out.stdout


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


def test_rows_over_seeds_are_the_mean_of_single_seed_runs(config, tmp_path):
  config.epochs = 1
  config.bits = (4,)
  config.methods = ("rtn",)
  single = []
  for seed in (0, 1):
    config.seeds = (seed,)
    single.append(main.run(config, str(tmp_path / str(seed))))
  config.seeds = (0, 1)
  rows = main.run(config, str(tmp_path / "both"))
  for i, row in enumerate(rows):
    accs = [s[i]["accuracy"] for s in single]
    assert row["seeds"] == 2 and row["accuracy"] == pytest.approx(np.mean(accs), abs=1e-3)
    assert row["acc_std"] == pytest.approx(np.std(accs, ddof=1), abs=0.01)


def test_partial_run_keeps_other_methods_rows(config, tmp_path):
  config.epochs = 1
  config.bits = (8,)
  config.methods = ("rtn",)
  fake = {"gpfq": lambda ctx: [results.accuracy_row("gpfq", 4, 90.0, ctx.float_accuracy, 1.0)],
          "alq": lambda ctx: [results.accuracy_row("alq", 0.5, 80.0, ctx.float_accuracy, 2.0)]}
  path = tmp_path / "results.json"

  def run(methods, **fns):
    config.methods = methods
    runs, key = classify.run(config, str(tmp_path), fns)
    return results.save(str(path), key, config.to_dict(), runs, classify.ORDER)

  run(("rtn", "gpfq", "alq"), **fake)
  fake2 = {"gpfq": lambda ctx: [results.accuracy_row("gpfq", 3, 85.0, ctx.float_accuracy, 1.0)]}
  rows = run(("gpfq",), **fake2)
  assert [(r["method"], r["bits"]) for r in rows] == [
      ("float", 32), ("rtn", 8), ("gpfq", 3), ("alq", 0.5)]
  # Another float recipe: the old rows belong to another model and are dropped.
  config.seeds = (1,)
  rows = run(("rtn",))
  assert [r["method"] for r in rows] == ["float", "rtn"]


def test_format_table_aligns_columns():
  text = results.format_table([results.accuracy_row("rtn", 4, 97.5, 98.0, 0.1234),
                               results.accuracy_row("gpfq", 2, 90.0, 98.0, 3.0, sparsity=0.5)])
  lines = text.splitlines()
  assert lines[0].split() == ["method", "bits", "accuracy", "drop", "seconds", "sparsity"]
  assert len({len(line) for line in lines}) == 1


def test_plot_has_a_log_drop_panel(tmp_path):
  import matplotlib.image
  rows = [results.accuracy_row("float", 32, 98.0, 98.0, 0.0),
          results.accuracy_row("rtn", 4, 97.9, 98.0, 0.0),
          results.accuracy_row("rtn", 2, 10.0, 98.0, 0.0),
          results.accuracy_row("gpfq", 4, 98.0, 98.0, 0.0),
          results.accuracy_row("gpfq", 2, 97.5, 98.0, 0.0)]
  path = str(tmp_path / "p.png")
  classify.plot(rows, path)
  height, width = matplotlib.image.imread(path).shape[:2]
  assert width > 1.8 * height  # two panels side by side
