"""ALQ in the main job: `rows(ctx)` runs Alg. 5 of Qu et al. (2020) on ctx's float model and
reports every round."""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from qjax.alq import pipeline
from qjax.experiments import config_section
from qjax.alq.accounting import format_report
from qjax.alq.kernel import reconstruct


def default_config() -> ml_collections.ConfigDict:
  """`config.alq` for LeNet5 on the 5,000 embedded MNIST digits, scaled to ~5 CPU minutes.

  Structures, I_max, AMSGrad step sizes and per-epoch decays are the authors' (Appendix B.2, C.1).
  Scaled down: 2 basis + 1 coordinate epochs per round instead of 20 + 10, 4 final epochs
  instead of 50, and a proposal fraction top_k large enough that one epoch of the small training
  set can remove a round's alphas. prune_ratio is the fraction removed per round (Eq. 30).
  """
  c = pipeline.default_config()
  c.init_epochs = 1
  c.rounds = 4
  c.prune_ratio = 0.5
  c.top_k = 0.02
  c.basis_epochs = 2
  c.coordinate_epochs = 1
  c.final = "basis"
  c.final_epochs = 4
  return c


def rows(ctx: Any) -> list[dict[str, Any]]:
  """One row per ALQ round (0 = right after init): bits, accuracy, drop, storage, compression.

  Uses ctx.model / variables / data['train'] / evaluate / float_accuracy / key and
  ctx.config.alq (defaults from `default_config` for missing keys). Accuracies are in the units
  of ctx.evaluate (percent in the main job); drop is in the same points.
  """
  c = config_section(ctx.config, "alq", default_config())
  variables = ctx.variables

  def loss_fn(params, x, y):
    logits = ctx.model.apply({**variables, "params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def evaluate(q):
    return ctx.evaluate({**variables, "params": reconstruct(q)}, split="test")

  def show(entry):
    print(f"alq round {entry['round']}: {entry['bits']:.3f} bits, {entry['alphas']} alphas, "
          f"{entry['storage_bytes']:.0f} bytes, accuracy {entry['accuracy']:.2f}, "
          f"{entry['seconds']:.0f} s", flush=True)
    if entry["round"] == "final":
      print(format_report(entry["report"]), flush=True)

  _, history = pipeline.run(variables["params"], loss_fn, ctx.data["train"], c,
                            key=jax.random.fold_in(ctx.key, 4), evaluate=evaluate, on_round=show)
  return [{"method": "alq", "round": e["round"], "bits": round(e["bits"], 3),
           "accuracy": round(e["accuracy"], 2),
           "drop": round(ctx.float_accuracy - e["accuracy"], 2),
           "storage_bytes": int(round(e["storage_bytes"])),
           "compression": round(e["compression"], 1), "seconds": round(e["seconds"], 1)}
          for e in history.rounds]
