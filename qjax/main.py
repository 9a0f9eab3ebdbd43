"""The experiment runner: a config in; the task's rows, a results table, JSON and a plot out.

  python -m qjax --config configs/mnist_lenet5.py [--config.KEY=VALUE ...] [--workdir DIR]

`config.task` names the experiment (`TASKS`; default 'classify'). The runner imports the task
modules in `qjax.experiments`, never the reverse. Results are merged per method run into
`<workdir>/results.json`, so a partial run (`--config.methods=gpfq`) replaces only its own rows.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import os

import ml_collections

from qjax import files
from qjax.experiments import results

# task -> (module, run function, plot function or None, plot file name).
TASKS: dict[str, tuple[str, str, str | None, str]] = {
    "classify": ("qjax.experiments.classify", "run", "plot", "accuracy_vs_bits.png"),
    "imagenet": ("qjax.experiments.imagenet", "run", "plot", "accuracy_vs_bits.png"),
    "minilm": ("qjax.experiments.minilm", "run", "plot", "minilm.png"),
    "bytelm": ("qjax.experiments.bytelm", "run", "plot", "bytelm.png"),
    "causal_lm": ("qjax.experiments.causal_lm", "run", "plot", "perplexity.png"),
}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "mnist_lenet5.py")


def task_of(config: ml_collections.ConfigDict) -> str:
  task = config.get("task", "classify")
  if task not in TASKS:
    raise ValueError(f"config.task: unknown task {task!r}; choose one of {sorted(TASKS)}")
  return task


def _module(config: ml_collections.ConfigDict):
  return importlib.import_module(TASKS[task_of(config)][0])


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Every eager check of the config (keys, values, each method's section) before any work."""
  module = _module(config)
  if hasattr(module, "validate"):
    module.validate(config)


def resolve_config_path(path: str) -> str:
  """`path` as given, else relative to the repository root (so runs work from any directory)."""
  if os.path.exists(path):
    return path
  beside = os.path.join(REPO_ROOT, path)
  if not os.path.isabs(path) and os.path.exists(beside):
    return beside
  raise ValueError(f"config file {path!r} not found (also looked in {REPO_ROOT})")


def load_config(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file (as ml_collections' config_flags loads it)."""
  path = resolve_config_path(path)
  spec = importlib.util.spec_from_file_location("qjax_config", path)
  if spec is None:
    raise ValueError(f"config file {path!r} is not a Python file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path!r} has no get_config()")
  return module.get_config()


def check_overrides(config: ml_collections.ConfigDict, argv: list[str]) -> None:
  """Raise a clear error for a `--config.a.b=...` flag whose key is not in the config."""
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0]
    node = config
    parts = path.split(".")
    for i, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ValueError(f"unknown config key 'config.{'.'.join(parts[:i + 1])}' in {arg!r}; "
                         f"known keys here: {known}")
      node = node[part]


def expand_lists(config: ml_collections.ConfigDict, argv: list[str]) -> list[str]:
  """`argv` with `--config.K=a,b` on a tuple-valued K spelled as a tuple literal ('a', 'b').

  Items are Python literals where they parse (`--config.bits=4,3`), else strings
  (`--config.methods=rtn,gptq-act`); values already in tuple or list syntax are kept.
  """
  out = []
  for arg in argv:
    if arg.startswith("--config.") and "=" in arg:
      key, value = arg[len("--config."):].split("=", 1)
      node = config
      for part in key.split("."):
        node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
      if isinstance(node, tuple) and not value.strip().startswith(("(", "[")):
        items = tuple(_literal(v.strip()) for v in value.split(",") if v.strip())
        arg = f"--config.{key}={items!r}"
    out.append(arg)
  return out


def _literal(text: str):
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text
  return value if isinstance(value, (int, float, str, bool)) else text


def config_keys(config: ml_collections.ConfigDict, prefix: str = "config") -> list[str]:
  """'config.a.b = value' lines for every leaf key: what `--config.a.b=...` can override."""
  lines = []
  for k in sorted(config.keys()):
    v = config[k]
    if isinstance(v, ml_collections.ConfigDict):
      lines += config_keys(v, f"{prefix}.{k}")
    else:
      lines.append(f"{prefix}.{k} = {v!r}")
  return lines


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Run the config's task; print and write the merged table, JSON and plot; return the rows."""
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  results_path = os.path.join(workdir, "results.json")
  results.check(results_path)
  module_name, run_name, plot_name, plot_file = TASKS[task_of(config)]
  module = importlib.import_module(module_name)
  out = getattr(module, run_name)(config, workdir)
  runs, key = out if isinstance(out, tuple) else ({"rows": out}, "")
  order = getattr(module, "ORDER", ())
  rows = results.save(results_path, key, config.to_dict(), runs, order)
  table = results.format_table(rows)
  print(table)
  files.atomic_write(os.path.join(workdir, "results.txt"), table + "\n")
  written = ["results.json", "results.txt"]
  if plot_name and hasattr(module, plot_name):
    getattr(module, plot_name)(rows, os.path.join(workdir, plot_file))
    written.append(plot_file)
  print(f"wrote {', '.join(os.path.join(workdir, w) for w in written)}")
  return rows


__all__ = ["TASKS", "run", "validate_config", "load_config", "check_overrides", "config_keys",
           "expand_lists"]
