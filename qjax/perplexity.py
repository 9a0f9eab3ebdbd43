"""Perplexity of a causal LM, the protocol of the GPTQ paper, and calibration windows.

  ids = lm.encode(text)                                     # tokenize the whole text once
  ppl = qjax.perplexity.perplexity(lm.apply_fn, lm.params, ids, seq_len=2048)
  calib = qjax.perplexity.calibration_windows(calib_ids, n=128, seq_len=256, seed=0)

GPTQ's `opt_eval` / `llama_eval` (Frantar et al. 2023): the token stream is cut into
non-overlapping windows of `seq_len` tokens (the last partial window dropped); each window is one
sequence whose context restarts at its start; the NLL of every token after the first of each
window is averaged over all windows, and perplexity = exp(mean NLL). (The reference averages
per-window mean losses times seq_len, which is the same mean since every window has the same
length.) Calibration: `n` windows of `seq_len` tokens at random offsets (seeded) of the
calibration split's stream, as GPTQ's `get_wikitext2` draws them.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def windows(ids: np.ndarray, seq_len: int) -> np.ndarray:
  """Non-overlapping windows int32 (n, seq_len) covering `ids`; the short tail is dropped."""
  ids = np.asarray(ids)
  if ids.ndim != 1:
    raise ValueError(f"ids must be a 1-D token stream, got shape {ids.shape}")
  if seq_len < 2:
    raise ValueError(f"seq_len must be >= 2, got {seq_len}")
  n = len(ids) // seq_len
  if n < 1:
    raise ValueError(f"{len(ids)} tokens are fewer than one window of seq_len={seq_len}")
  return np.asarray(ids[:n * seq_len], np.int32).reshape(n, seq_len)


def calibration_windows(ids: np.ndarray, n: int, seq_len: int, seed: int = 0) -> np.ndarray:
  """n windows int32 (n, seq_len) at random offsets of `ids` (numpy Generator(seed))."""
  ids = np.asarray(ids)
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  if len(ids) <= seq_len:
    raise ValueError(f"calibration: {len(ids)} tokens, need more than seq_len={seq_len}")
  start = np.random.default_rng(seed).integers(0, len(ids) - seq_len, size=n)
  return np.asarray(ids[start[:, None] + np.arange(seq_len)[None, :]], np.int32)


@functools.lru_cache(maxsize=8)
def _nll_rows(apply_fn: Callable) -> Callable:
  @jax.jit
  def f(params, x):
    logits = apply_fn(params, x)[:, :-1].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.take_along_axis(logp, x[:, 1:, None], axis=-1)[..., 0], axis=1)
  return f


def mean_nll(apply_fn: Callable, params: Any, ids: np.ndarray, seq_len: int,
             batch_size: int = 4, max_windows: int | None = None) -> tuple[float, int]:
  """(mean NLL in nats, number of predicted tokens) over the windows of `ids`."""
  x = windows(ids, seq_len)
  if max_windows is not None:
    x = x[:int(max_windows)]
  f = _nll_rows(apply_fn)
  total = 0.0
  for i in range(0, len(x), batch_size):
    chunk = x[i:i + batch_size]
    k = len(chunk)
    if k < batch_size:  # pad the last batch to the jitted shape (one compile); pads dropped
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - k, axis=0)])
    total += float(np.sum(np.asarray(f(params, jnp.asarray(chunk)), np.float64)[:k]))
  n_tokens = len(x) * (seq_len - 1)
  return total / n_tokens, n_tokens


def perplexity(apply_fn: Callable, params: Any, ids: np.ndarray, seq_len: int = 2048,
               batch_size: int = 4, max_windows: int | None = None) -> float:
  """exp(mean NLL) over non-overlapping `seq_len` windows of the token stream `ids`."""
  nll, _ = mean_nll(apply_fn, params, ids, seq_len, batch_size, max_windows)
  return math.exp(nll)


__all__ = ["windows", "calibration_windows", "mean_nll", "perplexity"]
