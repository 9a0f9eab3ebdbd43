"""Real English text shipped with qjax, byte-level LM data, and the byte LM's training loop.

The corpus is the prose of CPython's `pydoc_data.topics` (the Python documentation's topic help;
Copyright Python Software Foundation, PSF License Agreement), built once by
`qjax/_data/make_corpus.py` into `qjax/_data/pydoc_corpus.json.gz`. The shipped file is the truth:
nothing here reads `pydoc_data`, so the text and the splits are the same on every machine.

  corpus = qjax.text.load_corpus()
  corpus.sentences['heldout']      # 2,000 sentences (MiniLM's retrieval set)
  corpus.text('test')              # the test blocks as one string (byte LM)

Two independent partitions, each disjoint within itself (see make_corpus.py): blocks/paragraphs
(80/10/10 % calibration/heldout/test by a hash of each block's words), and unique sentences.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import importlib.resources
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

SPLITS = ("calibration", "heldout", "test")
# sha256 of the decompressed JSON in qjax/_data/pydoc_corpus.json.gz (built with Python 3.11.7).
CORPUS_SHA256 = "92786a25cafe570cde3e98351463eaeb14b3304b31654f131197e94ba4b97b4f"
CORPUS_CREDIT = ("Text: CPython pydoc_data.topics, the Python documentation's topic help, "
                 "Copyright Python Software Foundation, PSF License Agreement.")


@dataclasses.dataclass(frozen=True)
class Corpus:
  """The shipped corpus; every field maps a split name to a list of strings.

  Attributes:
    blocks: blank-line separated blocks of every topic (prose, code, grammar, tables), as written.
    paragraphs: the prose blocks, each on one line.
    sentences: unique prose sentences of 3 to 80 words (a partition of its own).
    python_version: the Python whose pydoc_data built the file.
    sha256: checksum of the decompressed file.
  """
  blocks: dict[str, list[str]]
  paragraphs: dict[str, list[str]]
  sentences: dict[str, list[str]]
  python_version: str
  sha256: str

  def text(self, split: str) -> str:
    """The blocks of a split joined by blank lines: the byte LM's text stream."""
    _check_split(split)
    return "\n\n".join(self.blocks[split])

  def bytes(self, split: str) -> np.ndarray:
    """`text(split)` as UTF-8 bytes, uint8 (n,)."""
    return np.frombuffer(self.text(split).encode("utf-8"), dtype=np.uint8)


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


@functools.lru_cache(maxsize=1)
def load_corpus() -> Corpus:
  """The shipped corpus, its checksum verified (ValueError if the file was altered)."""
  with importlib.resources.files("qjax").joinpath("_data/pydoc_corpus.json.gz").open("rb") as f:
    raw = gzip.decompress(f.read())
  digest = hashlib.sha256(raw).hexdigest()
  if digest != CORPUS_SHA256:
    raise ValueError(f"qjax/_data/pydoc_corpus.json.gz: sha256 {digest} != {CORPUS_SHA256}; "
                     "the shipped corpus was altered")
  data = json.loads(raw.decode("utf-8"))
  return Corpus(blocks=data["blocks"], paragraphs=data["paragraphs"],
                sentences=data["sentences"], python_version=data["python_version"],
                sha256=digest)


# ---------------------------------------------------------------------------------------------
# Byte-level LM data and metrics.


def eval_windows(data: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Non-overlapping (input, target) windows covering a byte stream once.

  Window i reads bytes [i L, (i+1) L) and predicts bytes [i L + 1, (i+1) L + 1): every byte after
  the first is predicted exactly once (a window's context restarts at its start). The last,
  shorter window is dropped. Returns int32 (n, L) inputs and targets.
  """
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}")
  n = (len(data) - 1) // seq_len
  if n < 1:
    raise ValueError(f"data of {len(data)} bytes is shorter than one window of {seq_len + 1}")
  x = np.asarray(data[:n * seq_len], np.int32).reshape(n, seq_len)
  y = np.asarray(data[1:n * seq_len + 1], np.int32).reshape(n, seq_len)
  return x, y


def random_windows(data: np.ndarray, seq_len: int, batch_size: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """A batch of random (input, target) windows of a byte stream (training)."""
  start = rng.integers(0, len(data) - seq_len - 1, size=batch_size)
  idx = start[:, None] + np.arange(seq_len)[None, :]
  return np.asarray(data[idx], np.int32), np.asarray(data[idx + 1], np.int32)


def unigram_bits_per_byte(train: np.ndarray, test: np.ndarray) -> float:
  """Bits per byte of `test` under add-one smoothed byte frequencies of `train` (the baseline)."""
  counts = np.bincount(np.asarray(train, np.int64), minlength=256).astype(np.float64) + 1.0
  logp = np.log2(counts / counts.sum())
  return float(-logp[np.asarray(test, np.int64)].mean())


def bits_per_byte(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean negative log2-likelihood of the targets: cross entropy in nats / ln 2."""
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return nll.mean() / jnp.float32(math.log(2.0))


def evaluate_bits_per_byte(apply_fn, params, x: np.ndarray, y: np.ndarray,
                           batch_size: int = 64) -> float:
  """Bits per byte of `apply_fn(params, x) -> logits` over all windows (equal-size batches are
  summed in float64, so the result does not depend on batch_size)."""
  fn = _nll_sum_fn(apply_fn)
  total, count = 0.0, 0
  for i in range(0, x.shape[0], batch_size):
    xb, yb = x[i:i + batch_size], y[i:i + batch_size]
    pad = batch_size - xb.shape[0]  # one compiled shape: pad, then mask the padding out
    mask = np.concatenate([np.ones(xb.shape, np.float32), np.zeros((pad,) + xb.shape[1:],
                                                                   np.float32)])
    if pad:
      xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
      yb = np.concatenate([yb, np.zeros((pad,) + yb.shape[1:], yb.dtype)])
    total += float(fn(params, xb, yb, mask))
    count += int(mask.sum())
  return total / count / math.log(2.0)


@functools.lru_cache(maxsize=16)
def _nll_sum_fn(apply_fn):
  @jax.jit
  def fn(params, x, y, mask):
    logits = apply_fn(params, x).astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(nll * mask)
  return fn


# ---------------------------------------------------------------------------------------------
# Training the byte LM.


def bytelm_config() -> ml_collections.ConfigDict:
  """Defaults of `config.bytelm`: a ~0.8M-parameter model, a few CPU minutes of AdamW."""
  c = ml_collections.ConfigDict()
  c.num_layers = 4
  c.dim = 128
  c.num_heads = 4
  c.mlp_ratio = 4
  c.max_len = 128
  c.tied_embeddings = True
  c.seq_len = 128
  c.batch_size = 32
  c.steps = 500
  c.learning_rate = 3e-3
  c.warmup_steps = 50
  c.weight_decay = 0.01
  c.seed = 0
  c.eval_batch_size = 64
  return c


def _model(cfg):
  from qjax.models.bytelm import ByteLM  # pylint: disable=g-import-not-at-top
  return ByteLM(num_layers=cfg.num_layers, dim=cfg.dim, num_heads=cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio, max_len=cfg.max_len,
                tied_embeddings=cfg.tied_embeddings)


def bytelm_config_hash(cfg: ml_collections.ConfigDict) -> str:
  text = json.dumps(cfg.to_dict(), sort_keys=True, default=str) + CORPUS_SHA256
  return hashlib.sha1(text.encode()).hexdigest()[:10]


@dataclasses.dataclass
class TrainedByteLM:
  """A trained byte LM: `apply_fn(params, x) -> logits` with x int32 (batch, seq)."""
  model: Any
  params: Any
  config: ml_collections.ConfigDict
  losses: list[float]          # training loss (nats per byte) per step; empty when restored
  seconds: float               # training wall time (0 when restored)

  def apply_fn(self, params, x):
    return self.model.apply({"params": params}, x)


def train_bytelm(config: ml_collections.ConfigDict | None = None, workdir: str | None = None,
                 *, progress: bool = False) -> TrainedByteLM:
  """Train the byte LM on the corpus' calibration text, or restore it from `workdir`.

  The weights are cached as `workdir/bytelm_<hash>.msgpack`, the hash covering the whole config
  and the corpus checksum (like the LeNet5 float model of `qjax.main.float_model`).

  Args:
    config: `bytelm_config()` keys (missing keys take the defaults; unknown keys raise).
    workdir: cache directory, or None for no caching.
    progress: print the loss every 100 steps.
  """
  from qjax import train as train_lib  # pylint: disable=g-import-not-at-top
  cfg = bytelm_config()
  if config is not None:
    unknown = set(config.keys()) - set(cfg.keys())
    if unknown:
      raise ValueError(f"config.bytelm: unknown keys {sorted(unknown)}; known: {sorted(cfg)}")
    cfg.update(config)
  if cfg.seq_len > cfg.max_len:
    raise ValueError(f"config.bytelm.seq_len ({cfg.seq_len}) exceeds max_len ({cfg.max_len})")
  model = _model(cfg)
  key = jax.random.key(int(cfg.seed))
  params = model.init(key, jnp.zeros((1, cfg.seq_len), jnp.int32))["params"]
  path = None
  if workdir is not None:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, f"bytelm_{bytelm_config_hash(cfg)}.msgpack")
    cached = train_lib.restore_cached(path, params)
    if cached is not None:
      return TrainedByteLM(model, cached, cfg, [], 0.0)

  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                                max(cfg.steps, cfg.warmup_steps + 1))
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(schedule, weight_decay=cfg.weight_decay))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  data = load_corpus().bytes("calibration")
  rng = np.random.default_rng(int(cfg.seed))
  losses = []
  start = time.perf_counter()
  for i in range(int(cfg.steps)):
    x, y = random_windows(data, cfg.seq_len, cfg.batch_size, rng)
    params, opt_state, loss = step(params, opt_state, x, y)
    losses.append(float(loss))
    if progress and (i % 100 == 0 or i == cfg.steps - 1):
      print(f"bytelm step {i}: loss {losses[-1] / math.log(2):.3f} bits/byte "
            f"({time.perf_counter() - start:.0f} s)")
  seconds = time.perf_counter() - start
  if path is not None:
    train_lib.save_variables(path, params)
  return TrainedByteLM(model, params, cfg, losses, seconds)
