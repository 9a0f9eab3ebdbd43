"""Llama-family decoders from GGUF files (llama.cpp's format), into the Hugging Face names.

Tensors are dequantized to float32 with the `gguf` package, the config comes from the file's
metadata, the tokenizer is rebuilt from its tokens, merges and pre-tokenizer. llama.cpp's
converter permutes the rows of the q and k projections of Llama models (rotary pairs interleaved
instead of "rotate half"); the loader undoes it, so the params equal the Hugging Face
checkpoint's.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from qjax.models.llama import LlamaConfig
from qjax.pretrained.huggingface import CausalLM, _expected_shapes, map_tensors

# GGUF tensor types the loader dequantizes (gguf.GGMLQuantizationType names).
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K",
              "Q6_K", "Q8_K", "Q2_K", "Q3_K")
GGUF_ARCHS = ("llama", "qwen2")
# llama.cpp's names of a block's tensors -> the Hugging Face ones (under model.layers.{i}.).
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


__all__ = ["gguf_config", "gguf_tokenizer", "gguf_to_hf_name", "unpermute_qk", "GGUF_TYPES",
           "GGUF_ARCHS"]
