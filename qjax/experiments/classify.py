"""Image classification: train (or restore) a float model, then every configured method's rows.

The task of `configs/mnist_lenet5*.py`. `config.methods` names row families: each a module
`qjax.experiments.<name>` (`FAMILIES`: `gpfq`, `psgd`, `alq`, `act`) with `default_config()` and
`rows(ctx) -> list[dict]`; the post-training methods inside them come from the one registry,
`qjax.experiments.methods`. 'rtn' (the registry's per-tensor round-to-nearest, no data) is the
baseline and lives here.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import time
from typing import Any, Callable

import jax
import ml_collections
import optax

from qjax import data as data_lib
from qjax import models
from qjax import rules
from qjax import train as train_lib
from qjax.experiments import config_section, results
from qjax.experiments import methods as registry  # `methods` names run()'s overrides here

# The row families besides 'rtn': module qjax.experiments.<name>, `default_config()`, `rows(ctx)`.
FAMILIES = ("gpfq", "psgd", "alq", "act")
_TRAIN_KEYS = ("dataset", "model", "seed", "epochs", "batch_size", "learning_rate", "momentum",
               "weight_decay", "augment_shift", "val_fraction")


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


def family(name: str) -> Any:
  """The module of row family `name` (one of `FAMILIES`)."""
  return importlib.import_module(f"qjax.experiments.{name}")


def method_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """The family's `default_config()` updated with `config.<name>`; unknown keys are an error."""
  return config_section(config, name, family(name).default_config())


def validate(config: ml_collections.ConfigDict) -> None:
  """Eager checks with messages that name the offending key (before any training)."""
  if config.dataset not in data_lib.DATASETS:
    raise ValueError(f"config.dataset: unknown dataset {config.dataset!r}; "
                     f"choose one of {list(data_lib.DATASETS)}")
  if config.model not in models.MODELS:
    raise ValueError(f"config.model: unknown model {config.model!r}; "
                     f"choose one of {sorted(models.MODELS)}")
  seeds = config.get("seeds") or ()
  if not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds) or (
      len(set(seeds)) != len(seeds)):
    raise ValueError(f"config.seeds must be distinct ints, got {seeds!r}")
  # A --config.seed=5 beside config.seeds would be silently ignored (0 is the default: fine).
  if seeds and config.seed not in (0, seeds[0]):
    raise ValueError(f"config.seed={config.seed!r} conflicts with config.seeds={tuple(seeds)!r}: "
                     "the rows are run over config.seeds; for one run with seed N pass "
                     "--config.seeds=N")
  for key in ("batch_size", "epochs"):
    low = 1 if key == "batch_size" else 0
    if isinstance(config[key], bool) or not isinstance(config[key], int) or config[key] < low:
      raise ValueError(f"config.{key} must be an int >= {low}, got {config[key]!r}")
  for b in config.bits:
    rules.check_bits(b, "config.bits", low=2)
  for m in config.methods:
    if m != "rtn" and m not in FAMILIES:
      raise ValueError(f"config.methods: unknown method {m!r}; choose from "
                       f"{['rtn', *FAMILIES]}")
  for m in config.methods:
    if m != "rtn":
      module = family(m)
      cfg = method_config(config, m)
      if hasattr(module, "validate"):
        module.validate(cfg, f"config.{m}")


def train_config_hash(config: ml_collections.ConfigDict) -> str:
  text = json.dumps({k: config[k] for k in _TRAIN_KEYS}, sort_keys=True, default=str)
  return hashlib.sha1(text.encode()).hexdigest()[:10]


def float_model(config, model, splits, key, workdir) -> dict:
  """Train the float model, or restore it from the work directory when the recipe is unchanged."""
  path = os.path.join(workdir, f"float_{config.model}_{train_config_hash(config)}.msgpack")
  steps = config.epochs * (splits["train"][0].shape[0] // config.batch_size)
  schedule = optax.cosine_decay_schedule(config.learning_rate, max(steps, 1))
  tx = optax.chain(optax.add_decayed_weights(config.weight_decay),
                   optax.sgd(schedule, momentum=config.momentum))
  state = train_lib.create_train_state(model, key, splits["train"][0], tx)
  cached = train_lib.restore_cached(path, train_lib.state_variables(state))
  if cached is not None:
    print(f"restored float model from {path}")
    return cached
  state, _ = train_lib.fit(state, *splits["train"], epochs=config.epochs,
                           batch_size=config.batch_size, seed=config.seed,
                           augment_shift=config.augment_shift, desc="float")
  variables = train_lib.state_variables(state)
  x, y = splits["val"] if splits["val"][0].shape[0] else splits["test"]
  accuracy = train_lib.evaluate(model.apply, variables, x, y)
  floor = 2 * 100.0 / config.num_classes
  if not accuracy >= floor:  # also catches NaN
    raise ValueError(f"the float {config.model} reached {accuracy:.1f}% on held-out digits, "
                     f"below twice chance ({floor:.0f}%): training failed (check "
                     f"config.learning_rate = {config.learning_rate}, config.epochs); not "
                     "cached, no rows written")
  train_lib.save_variables(path, variables)
  return variables


def rtn_rows(ctx: Context) -> list[dict]:
  """Round-to-nearest on the per-tensor symmetric grid, every Dense/Conv kernel, no data."""
  rows = []
  for bits in ctx.config.bits:
    start = time.perf_counter()
    params = registry.run("rtn", ctx.variables["params"], ctx.model.apply, None, bits).params
    acc = ctx.evaluate({**ctx.variables, "params": params})
    rows.append(results.accuracy_row("rtn", bits, acc, ctx.float_accuracy,
                                     time.perf_counter() - start))
  return rows


def _run_one(config: ml_collections.ConfigDict, workdir: str,
        methods: dict[str, Callable[[Context], list[dict]]] | None = None
        ) -> tuple[dict[str, list[dict]], str]:
  """Train or restore the float model and run every configured method.

  Returns:
    ({method run: its rows} with 'float' and 'rtn' first, the float recipe's hash: results saved
    under another hash belong to another float model).
  """
  splits = data_lib.load(config.dataset, data_dir=config.get("data_dir") or None)
  train, val = data_lib.split_validation(*splits["train"], config.val_fraction, seed=config.seed)
  splits = {"train": train, "val": val, "test": splits["test"]}
  model = models.get_model(config.model, config.num_classes)
  key = jax.random.key(config.seed)
  variables = float_model(config, model, splits, key, workdir)
  ctx = Context(config=config, model=model, variables=variables, data=splits, float_accuracy=0.0,
                key=key, workdir=workdir)
  ctx.float_accuracy = ctx.evaluate(variables)
  runs = {"float": [results.accuracy_row("float", 32, ctx.float_accuracy, ctx.float_accuracy,
                                         0.0)],
          "rtn": rtn_rows(ctx)}
  methods = methods or {}
  for name in config.methods:
    if name == "rtn":
      continue
    fn = methods.get(name) or family(name).rows
    start = time.perf_counter()
    runs[name] = fn(ctx)
    print(f"{name}: {time.perf_counter() - start:.1f} s")
  return runs, train_config_hash(config)


def run(config: ml_collections.ConfigDict, workdir: str,
        methods: dict[str, Callable[[Context], list[dict]]] | None = None
        ) -> tuple[dict[str, list[dict]], str]:
  """Every configured method's rows; over `config.seeds` (each a float model and a calibration
  draw): the rows' mean, with `acc_std` (sample std of accuracy) and `seeds` columns."""
  seeds = tuple(config.get("seeds") or (config.seed,))
  if len(seeds) == 1:
    one = ml_collections.ConfigDict(config.to_dict())
    one.seed = seeds[0]
    return _run_one(one, workdir, methods)
  per_seed = []
  for seed in seeds:
    print(f"--- seed {seed} ({len(per_seed) + 1} of {len(seeds)})")
    one = ml_collections.ConfigDict(config.to_dict())
    one.seed, one.seeds = seed, (seed,)
    per_seed.append(_run_one(one, workdir, methods)[0])
  return results.aggregate(per_seed), train_config_hash(config) + "-" + "-".join(map(str, seeds))


def plot(rows: list[dict], path: str) -> None:
  float_acc = next(r["accuracy"] for r in rows if r["method"] == "float")
  results.plot_accuracy(rows, float_acc, path)


ORDER = ("float", "rtn", *FAMILIES)
