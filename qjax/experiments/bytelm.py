"""Task 'bytelm': the byte-level LM trained on the shipped corpus, quantized.

  python -m qjax --config configs/bytelm_ptq.py

The model (`qjax.text.train_bytelm`) is trained once and cached in the work directory. Every
Dense/attention kernel is quantized (the tied byte embedding stays float) by the methods of
`config.methods` (`qjax.experiments.ptq.SUPPORTED`) at every `config.bits` (and grid);
calibration: 128 random windows of the calibration split. Metric: bits per byte on the test
split, its increase over float, next to the unigram byte model's bits per byte.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from qjax import text
from qjax.experiments import config_section, ptq, results

ORDER = ptq.ORDER


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "bytelm"
  c.methods = ptq.DEFAULT_METHODS
  c.bits = (8, 4, 3)
  c.grids = ("channel", "g64")    # of the grid methods (`ptq.grid_spec`)
  c.acts = ()                     # also each grid method with these activations (`ptq.act_spec`)
  c.calibration_size = 128        # windows of bytelm.seq_len bytes from the calibration split
  c.seed = 0                      # calibration draw
  c.bytelm = text.bytelm_config()
  c.gpfq = ptq.gpfq_config()
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """The runner's eager check (`qjax.main.validate_config`)."""
  config_section(config, "gpfq", ptq.gpfq_config())
  config_section(config, "bytelm", text.bytelm_config())
  ptq.validate(config)


def run(config: ml_collections.ConfigDict, workdir: str) -> tuple[dict[str, list[dict]], str]:
  """Train (or restore) the byte LM, then float and quantized bits-per-byte rows:
  ({method run: rows}, key)."""
  validate(config)
  config.gpfq = config_section(config, "gpfq", ptq.gpfq_config())
  lm = text.train_bytelm(config.bytelm, workdir, progress=True)
  corpus = text.load_corpus()
  seq_len = int(lm.config.seq_len)
  x, y = text.eval_windows(corpus.bytes("test"), seq_len)
  evaluate = lambda p, apply=None: text.evaluate_bits_per_byte(  # noqa: E731
      apply or lm.apply_fn, p, x, y, batch_size=int(lm.config.eval_batch_size))
  float_bpb = evaluate(lm.params)
  unigram = text.unigram_bits_per_byte(corpus.bytes("calibration"), y.ravel())
  rows = [results.row("float", 32, lm.seconds, grid="", bits_per_byte=round(float_bpb, 4),
                      increase=0.0,
                      unigram_bits_per_byte=round(unigram, 4),
                      train_steps=len(lm.losses) or int(lm.config.steps))]
  print(rows[0])
  rng = np.random.default_rng(int(config.seed))
  calib, _ = text.random_windows(corpus.bytes("calibration"), seq_len,
                                 int(config.calibration_size), rng)
  # jax arrays: the driver's write-back needs them (a restored checkpoint holds numpy arrays).
  task = ptq.Task("bytelm", jax.tree_util.tree_map(jnp.asarray, lm.params), lm.apply_fn, calib,
                  config)

  def metrics(q, apply=None):
    bpb = evaluate(q, apply)
    return {"bits_per_byte": round(bpb, 4), "increase": round(bpb - float_bpb, 4)}

  runs = {"float": rows, **ptq.quantized_rows(task, metrics)}
  key = ptq.run_key("bytelm", text.bytelm_config_hash(config.bytelm), int(config.calibration_size),
                    int(config.seed))
  return runs, key


def plot(rows: list[dict], path: str) -> None:
  """Bits per byte vs bits, one line per method, the float and unigram levels as lines."""
  ptq.plot(rows, ["bits_per_byte"], path, "byte LM, test split", hline="unigram_bits_per_byte")
