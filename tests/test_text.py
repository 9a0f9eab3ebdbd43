"""The shipped corpus: checksum, fixed split sizes, disjointness, determinism; byte LM data."""
from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from qjax import text


def test_checksum_and_credit():
  raw = gzip.decompress(
      importlib.resources.files("qjax").joinpath("_data/pydoc_corpus.json.gz").read_bytes())
  assert hashlib.sha256(raw).hexdigest() == text.CORPUS_SHA256
  data = json.loads(raw)
  assert "Python Software Foundation" in data["license"] and "PSF" in data["license"]
  corpus = text.load_corpus()
  assert corpus.sha256 == text.CORPUS_SHA256 and corpus.python_version == "3.11.7"


def test_split_sizes():
  c = text.load_corpus()
  assert {k: len(v) for k, v in c.sentences.items()} == {
      "calibration": 200, "heldout": 2000, "test": 138}
  assert {k: len(v) for k, v in c.blocks.items()} == {
      "calibration": 2055, "heldout": 263, "test": 290}
  assert {k: len(v) for k, v in c.paragraphs.items()} == {
      "calibration": 1199, "heldout": 142, "test": 160}
  assert [len(c.bytes(s)) for s in text.SPLITS] == [373171, 45681, 47338]
  total = sum(len(c.text(s)) for s in text.SPLITS)
  assert 450_000 < total < 480_000  # ~465k characters of pydoc topics


def test_splits_are_disjoint_and_sentences_unique():
  c = text.load_corpus()
  for field in (c.sentences, c.paragraphs):
    sets = [set(field[s]) for s in text.SPLITS]
    for i in range(3):
      for j in range(i + 1, 3):
        assert not sets[i] & sets[j]
  all_sentences = [s for split in text.SPLITS for s in c.sentences[split]]
  assert len(all_sentences) == len(set(all_sentences))
  for s in all_sentences:
    assert 3 <= len(s.split()) <= 80 and "\n" not in s
  # Every paragraph is the prose of a block of the same split.
  for split in text.SPLITS:
    blob = " ".join(" ".join(b.split()) for b in c.blocks[split])
    for p in c.paragraphs[split][:50]:
      assert " ".join(p.split()) in blob


def test_deterministic_and_cached():
  a = text.load_corpus()
  text.load_corpus.cache_clear()
  b = text.load_corpus()
  assert a is not b and a == b
  assert a.sentences["heldout"][:3] == b.sentences["heldout"][:3]
  with pytest.raises(ValueError, match="split must be one of"):
    a.text("train")


def test_eval_windows_cover_each_byte_once():
  data = np.arange(23, dtype=np.uint8)
  x, y = text.eval_windows(data, 5)
  assert x.shape == y.shape == (4, 5) and x.dtype == np.int32
  np.testing.assert_array_equal(y.ravel(), np.arange(1, 21))
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
  with pytest.raises(ValueError, match="shorter than one window"):
    text.eval_windows(data[:3], 5)


def test_random_windows_are_shifted_pairs():
  data = np.frombuffer(b"the quick brown fox jumps over the lazy dog", np.uint8)
  x, y = text.random_windows(data, 8, 5, np.random.default_rng(0))
  assert x.shape == (5, 8)
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])


def test_bits_per_byte_against_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 7, 256)).astype(np.float32)
  targets = rng.integers(0, 256, size=(3, 7))
  m = logits.max(-1, keepdims=True)
  logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
  want = -np.mean(np.take_along_axis(logp, targets[..., None], -1)) / math.log(2)
  got = float(text.bits_per_byte(jnp.asarray(logits), jnp.asarray(targets)))
  assert got == pytest.approx(want, rel=1e-5)
  # Uniform logits: exactly 8 bits per byte.
  assert float(text.bits_per_byte(jnp.zeros((2, 4, 256)), jnp.zeros((2, 4), jnp.int32))) == (
      pytest.approx(8.0, rel=1e-6))


def test_evaluate_bits_per_byte_does_not_depend_on_batching():
  rng = np.random.default_rng(1)
  table = rng.normal(size=(256, 256)).astype(np.float32)
  apply_fn = lambda p, x: p[x]  # noqa: E731  (a bigram "model")
  x = rng.integers(0, 256, size=(10, 6)).astype(np.int32)
  y = rng.integers(0, 256, size=(10, 6)).astype(np.int32)
  a = text.evaluate_bits_per_byte(apply_fn, table, x, y, batch_size=4)
  b = text.evaluate_bits_per_byte(apply_fn, table, x, y, batch_size=10)
  c = float(text.bits_per_byte(jnp.asarray(table[x]), jnp.asarray(y)))
  assert a == pytest.approx(b, rel=1e-6) and a == pytest.approx(c, rel=1e-5)


def test_unigram_bits_per_byte():
  train = np.array([0, 0, 1], np.uint8)
  test = np.array([0, 1], np.uint8)
  p0, p1 = 3 / 259, 2 / 259  # add-one smoothing over 256 byte values
  assert text.unigram_bits_per_byte(train, test) == pytest.approx(
      -(math.log2(p0) + math.log2(p1)) / 2)
  c = text.load_corpus()
  assert 4.5 < text.unigram_bits_per_byte(c.bytes("calibration"), c.bytes("test")) < 5.0
