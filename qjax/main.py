"""The experiment runner: config in; float model, quantization rows, table, JSON and plot out.

  python -m qjax --config configs/mnist_lenet5.py [--config.bits=4,3] [--workdir DIR]

Every method contributes rows {method, bits, accuracy, drop, seconds, ...} to one results table;
`config.methods` names which run ('rtn' always runs: it is the baseline of the others).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import optax

from qjax import data as data_lib
from qjax import models
from qjax import rounding
from qjax import train as train_lib

# method name -> module providing `rows(ctx) -> list[dict]`.
METHODS = {
    "gpfq": "qjax.experiments.gpfq",
    "psgd": "qjax.experiments.psgd",
    "alq": "qjax.experiments.alq",
}


@dataclasses.dataclass
class Context:
  """What every method's `rows(ctx)` gets: the trained float model and the data."""
  config: ml_collections.ConfigDict
  model: Any
  variables: dict
  data: dict                      # 'train' / 'val' / 'test' -> (x, y) numpy
  float_accuracy: float           # test accuracy of `variables`, percent
  key: jax.Array
  workdir: str
  rows: list = dataclasses.field(default_factory=list)  # rows produced so far

  def evaluate(self, variables: dict, split: str = "test") -> float:
    return train_lib.evaluate(self.model.apply, variables, *self.data[split])

  def train(self, variables: dict, tx: optax.GradientTransformation, epochs: int,
            seed: int = 0, desc: str = "train") -> tuple[dict, list[float]]:
    """Continue training `variables` with optimizer `tx` on the train split."""
    state = train_lib.create_train_state(self.model, self.key, self.data["train"][0], tx,
                                         variables=variables)
    state, history = train_lib.fit(state, *self.data["train"], epochs=epochs,
                                   batch_size=self.config.batch_size, seed=seed,
                                   augment_shift=self.config.augment_shift, desc=desc)
    return train_lib.state_variables(state), history


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Eager checks with messages that name the offending key."""
  if config.dataset not in data_lib.DATASETS:
    raise ValueError(f"config.dataset: unknown dataset {config.dataset!r}; "
                     f"choose one of {list(data_lib.DATASETS)}")
  if config.model not in models.MODELS:
    raise ValueError(f"config.model: unknown model {config.model!r}; "
                     f"choose one of {sorted(models.MODELS)}")
  for b in config.bits:
    rounding.check_bits(b, "config.bits")
  for m in config.methods:
    if m != "rtn" and m not in METHODS:
      raise ValueError(f"config.methods: unknown method {m!r}; choose from "
                       f"{['rtn', *METHODS]}")


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


def load_config(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file (as ml_collections' config_flags loads it)."""
  spec = importlib.util.spec_from_file_location("qjax_config", path)
  if spec is None or not os.path.exists(path):
    raise ValueError(f"config file {path!r} not found")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def check_overrides_in_argv(argv: list[str], default: str = "configs/mnist_lenet5.py") -> None:
  """Fail early, and clearly, on overrides of keys the chosen config file does not have."""
  path = default
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
  if any(a.startswith("--config.") for a in argv):
    check_overrides(load_config(path), argv)


def train_config_hash(config: ml_collections.ConfigDict) -> str:
  keys = ("dataset", "model", "seed", "epochs", "batch_size", "learning_rate", "momentum",
          "weight_decay", "augment_shift", "val_fraction")
  text = json.dumps({k: config[k] for k in keys}, sort_keys=True, default=str)
  return hashlib.sha1(text.encode()).hexdigest()[:10]


def float_model(config, model, splits, key, workdir) -> dict:
  """Train the float model, or restore it from the work directory when the recipe is unchanged."""
  path = os.path.join(workdir, f"float_{config.model}_{train_config_hash(config)}.msgpack")
  steps = config.epochs * (splits["train"][0].shape[0] // config.batch_size)
  schedule = optax.cosine_decay_schedule(config.learning_rate, max(steps, 1))
  tx = optax.chain(optax.add_decayed_weights(config.weight_decay),
                   optax.sgd(schedule, momentum=config.momentum))
  state = train_lib.create_train_state(model, key, splits["train"][0], tx)
  if os.path.exists(path):
    print(f"restoring float model from {path}")
    return train_lib.restore_variables(path, train_lib.state_variables(state))
  state, _ = train_lib.fit(state, *splits["train"], epochs=config.epochs,
                           batch_size=config.batch_size, seed=config.seed,
                           augment_shift=config.augment_shift, desc="float")
  variables = train_lib.state_variables(state)
  train_lib.save_variables(path, variables)
  return variables


def rtn_rows(ctx: Context) -> list[dict]:
  """Round-to-nearest on the per-tensor symmetric grid, every Dense/Conv kernel, no data."""
  rows = []
  for bits in ctx.config.bits:
    start = time.perf_counter()
    params = rounding.quantize_uniform(ctx.variables["params"], bits)
    acc = ctx.evaluate({**ctx.variables, "params": params})
    rows.append(row("rtn", bits, acc, ctx.float_accuracy, time.perf_counter() - start))
  return rows


def row(method: str, bits: float, accuracy: float, float_accuracy: float, seconds: float,
        **extra) -> dict:
  return {"method": method, "bits": bits, "accuracy": round(accuracy, 2),
          "drop": round(float_accuracy - accuracy, 2), "seconds": round(seconds, 2), **extra}


def format_table(rows: list[dict]) -> str:
  cols = ["method", "bits", "accuracy", "drop", "seconds"]
  extra = sorted({k for r in rows for k, v in r.items()
                  if k not in cols and isinstance(v, (int, float, str))})
  cols += extra
  cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
  widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
  line = lambda xs: "  ".join(x.rjust(w) for x, w in zip(xs, widths))
  return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(x) for x in cells])


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.3g}" if 0 < abs(v) < 0.01 else f"{v:.2f}"
  return str(v)


def plot(rows: list[dict], float_accuracy: float, path: str) -> None:
  """Accuracy vs bits per weight; with pruning rows, a second panel of accuracy vs sparsity."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  quantized = [r for r in rows if "sparsity" not in r and isinstance(r["bits"], (int, float))
               and r["bits"] <= 16]
  pruned = [r for r in rows if "sparsity" in r]
  fig, axes = plt.subplots(1, 2 if pruned else 1, figsize=(11 if pruned else 6, 4), squeeze=False)
  ax = axes[0, 0]
  for method in dict.fromkeys(r["method"] for r in quantized):
    pts = sorted((r["bits"], r["accuracy"]) for r in quantized if r["method"] == method)
    ax.plot(*zip(*pts), marker="o", label=method)
  ax.set(xlabel="bits per weight", ylabel="top-1 accuracy (%)", title="accuracy vs bits")
  if pruned:
    sub = axes[0, 1]
    for name in dict.fromkeys((r["method"], r.get("prune_scope", "")) for r in pruned):
      pts = sorted((100 * r["sparsity"], r["accuracy"]) for r in pruned
                   if (r["method"], r.get("prune_scope", "")) == name)
      sub.plot(*zip(*pts), marker="o", label=" ".join(x for x in name if x))
    sub.set(xlabel="sparsity (%)", ylabel="top-1 accuracy (%)", title="accuracy vs sparsity")
  for a in axes[0]:
    a.axhline(float_accuracy, color="k", ls="--", lw=1, label="float")
    a.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(config: ml_collections.ConfigDict, workdir: str,
        methods: dict[str, Callable[[Context], list[dict]]] | None = None) -> list[dict]:
  """Train or restore the float model, run every configured method, write the results."""
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  splits = data_lib.load(config.dataset, data_dir=config.get("data_dir") or None)
  train, val = data_lib.split_validation(*splits["train"], config.val_fraction, seed=config.seed)
  splits = {"train": train, "val": val, "test": splits["test"]}
  model = models.get_model(config.model, config.num_classes)
  key = jax.random.key(config.seed)
  variables = float_model(config, model, splits, key, workdir)
  ctx = Context(config=config, model=model, variables=variables, data=splits, float_accuracy=0.0,
                key=key, workdir=workdir)
  ctx.float_accuracy = ctx.evaluate(variables)
  ctx.rows.append(row("float", 32, ctx.float_accuracy, ctx.float_accuracy, 0.0))
  ctx.rows.extend(rtn_rows(ctx))
  methods = methods or {}
  for name in config.methods:
    if name == "rtn":
      continue
    fn = methods.get(name) or importlib.import_module(METHODS[name]).rows
    start = time.perf_counter()
    ctx.rows.extend(fn(ctx))
    print(f"{name}: {time.perf_counter() - start:.1f} s")
  table = format_table(ctx.rows)
  print(table)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"config": config.to_dict(), "rows": ctx.rows}, f, indent=1, default=_jsonable)
  with open(os.path.join(workdir, "results.txt"), "w") as f:
    f.write(table + "\n")
  plot(ctx.rows, ctx.float_accuracy, os.path.join(workdir, "accuracy_vs_bits.png"))
  print(f"wrote {workdir}/results.json, results.txt, accuracy_vs_bits.png")
  return ctx.rows


def _jsonable(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)
