"""PSGD on MNIST LeNet5: SGD-trained vs PSGD-trained, then plain rounding / pruning, no data.

The classification task (`qjax.experiments.classify.Context`) builds `ctx` (model, SGD-trained float `variables`, data splits,
`evaluate`, `train`, `config`, `key`) and calls `rows(ctx)`. Recipes (`default_config`) were tuned
on the validation split only; the trials are in configs/psgd_tuning.md.
"""
from __future__ import annotations

import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

import qjax
from qjax import psgd as psgd_lib
from qjax import rounding
from qjax import rules
from qjax.experiments import config_section, methods, results
from qjax.experiments import gpfq as gpfq_experiment

PyTree = Any
FLOAT_BITS = 32  # the `bits` of the pruning rows (weights stay full precision)


def default_config() -> ml_collections.ConfigDict:
  """Defaults of `config.psgd` (tuned on the validation split; see configs/psgd_tuning.md).

  Shared optimizer settings, then one recipe per run: `recipes.bits<b>` for the b-bit grid and
  `recipes.prune` for target 0. A recipe either continues from the SGD-trained weights (the
  authors' recipe) or trains from a fresh init (`from_scratch`), which the 2-bit grid needs.
  """
  c = ml_collections.ConfigDict()
  c.bits = (4, 3, 2)
  c.edge_bits = 8  # first and last layer when bits < 4 (the authors' code)
  c.momentum = 0.9
  c.eps = 1e-8
  # learning_rate: peak of a cosine decay over the run; lambda_s only used when not normalized.
  c.recipes = ml_collections.ConfigDict({
      "bits4": dict(epochs=5, from_scratch=False, learning_rate=0.01, weight_decay=5e-4,
                    normalized=True, lambda_s=150.0),
      "bits3": dict(epochs=15, from_scratch=True, learning_rate=0.05, weight_decay=5e-3,
                    normalized=True, lambda_s=150.0),
      "bits2": dict(epochs=15, from_scratch=True, learning_rate=0.015, weight_decay=5e-3,
                    normalized=True, lambda_s=150.0),
      "prune": dict(epochs=10, from_scratch=False, learning_rate=0.01, weight_decay=1e-1,
                    normalized=False, lambda_s=150.0),
  })
  c.prune_sparsities = (0.7, 0.8, 0.9, 0.95, 0.98)
  c.prune_scopes = ("layer", "global")  # see `qjax.rounding.prune_smallest`
  # PSGD + GPFQ: GPFQ (config.gpfq options) of each PSGD-trained model onto the grid PSGD
  # trained for (rule 'uniform', C = 1, the same per-layer bits as the rounding).
  c.gpfq = True
  return c


def validate(cfg: ml_collections.ConfigDict, where: str = "config.psgd") -> None:
  """Eager checks of `config.psgd`, before any training."""
  for b in cfg.bits:
    rules.check_bits(b, f"{where}.bits", low=2)
    if f"bits{b}" not in cfg.recipes:
      raise ValueError(f"{where}.recipes has no recipe 'bits{b}' for {where}.bits={b}")
  rules.check_bits(cfg.edge_bits, f"{where}.edge_bits", low=2)


def layer_bits(params: PyTree, bits: int, edge_bits: int) -> dict[str, int]:
  """Bits rules (`qjax.rules`): `bits` everywhere, `edge_bits` for the first and last kernel
  when bits < 4 (the authors' recipe). The same rules serve PSGD's targets, the rounding and
  `qjax.gpfq`, so every method lands on the grid PSGD trained for."""
  names = rounding.kernel_names(params)
  edges = sorted({names[0], names[-1]}) if bits < 4 else []
  return {**{f"^{re.escape(n)}$": edge_bits for n in edges}, "default": bits}


def train_psgd(ctx, bits: int | None) -> PyTree:
  """A PSGD run towards the b-bit grid, or towards 0 if bits is None (`config.psgd.recipes`).

  The targets use the same per-layer bits as the rounding in `rows` (edge layers at
  `edge_bits` when bits < 4), so the final rounding lands on the grid PSGD trained for.
  """
  c = config_section(ctx.config, "psgd", default_config())
  name = "prune" if bits is None else f"bits{bits}"
  if name not in c.recipes:
    raise ValueError(f"no PSGD recipe for {name!r}: add config.psgd.recipes.{name}")
  recipe = c.recipes[name]
  params = ctx.variables["params"]
  if bits is None:
    targets = psgd_lib.zero_targets()
  else:
    targets = psgd_lib.uniform_targets(layer_bits(params, bits, c.edge_bits))
  x_train = ctx.data["train"][0]
  steps = max(1, recipe.epochs * (x_train.shape[0] // ctx.config.batch_size))
  tx = psgd_lib.psgd(optax.cosine_decay_schedule(recipe.learning_rate, steps), targets=targets,
                     momentum=c.momentum, weight_decay=recipe.weight_decay,
                     normalized=recipe.normalized, eps=c.eps, lambda_s=recipe.lambda_s)
  variables = ctx.variables
  if recipe.from_scratch:
    init_key = jax.random.fold_in(ctx.key, 0 if bits is None else bits)
    variables = ctx.model.init(init_key, jnp.asarray(x_train[:1]), train=False)
  variables, _ = ctx.train(variables, tx, recipe.epochs, seed=ctx.config.seed + 1,
                           desc=f"psgd {name}")
  return variables


def _round(variables: PyTree, bits: int, edge_bits: int) -> PyTree:
  params = variables["params"]
  rtn = methods.run("rtn", params, None, None, layer_bits(params, bits, edge_bits))
  return {**variables, "params": rtn.params}


def rows(ctx, trained: dict | None = None) -> list[dict]:
  """Rows for SGD- vs PSGD-trained models under plain rounding (config.psgd.bits) and pruning.

  Args:
    ctx: the runner context (see module docstring).
    trained: optional dict filled with the PSGD-trained variables, keyed by bits (None for the
      pruning run), e.g. to run GPFQ on them afterwards; entries already present are reused.

  Returns:
    dicts with method ('sgd+rtn', 'psgd+rtn', 'psgd+gpfq', 'sgd+prune', 'psgd+prune'), bits
    (32 for the unquantized pruning rows), accuracy, drop (points below the SGD float accuracy),
    seconds (PSGD training + rounding/GPFQ/pruning), sparsity and prune_scope for the pruning
    rows; psgd+rtn and psgd+gpfq rows also carry `float_accuracy`, the test accuracy of their
    PSGD model before quantization.
  """
  c = config_section(ctx.config, "psgd", default_config())
  trained = {} if trained is None else trained
  base = ctx.float_accuracy
  out = []

  def row(method, bits, variables, seconds, **extra):
    # `extra` may hold a float_accuracy column, which is also accuracy_row's parameter name.
    out.append({**results.accuracy_row(method, bits, ctx.evaluate(variables, "test"), base,
                                       seconds), **extra})

  for bits in c.bits:
    t = time.time()
    row("sgd+rtn", bits, _round(ctx.variables, bits, c.edge_bits), time.time() - t)
  for bits in c.bits:
    t = time.time()
    if bits not in trained:
      trained[bits] = train_psgd(ctx, bits)
    seconds = time.time() - t
    float_acc = round(ctx.evaluate(trained[bits], "test"), 2)
    t = time.time()
    row("psgd+rtn", bits, _round(trained[bits], bits, c.edge_bits),
        seconds + time.time() - t, float_accuracy=float_acc)
    if c.gpfq:
      q_vars, _, gpfq_seconds = gpfq_experiment.quantize(
          ctx, trained[bits], layer_bits(trained[bits]["params"], bits, c.edge_bits),
          rule="uniform", C=1.0, C_grid=())
      row("psgd+gpfq", bits, q_vars, seconds + gpfq_seconds, float_accuracy=float_acc)

  t = time.time()
  if None not in trained:
    trained[None] = train_psgd(ctx, None)
  train_seconds = time.time() - t
  for method, variables, extra_seconds in (("sgd+prune", ctx.variables, 0.0),
                                           ("psgd+prune", trained[None], train_seconds)):
    for scope in c.prune_scopes:
      for fraction in c.prune_sparsities:
        t = time.time()
        pruned = {**variables,
                  "params": rounding.prune_smallest(variables["params"], fraction, scope=scope)}
        row(method, FLOAT_BITS, pruned, extra_seconds + time.time() - t,
            sparsity=round(qjax.sparsity(pruned["params"])["overall"], 4), prune_scope=scope)
  return out
