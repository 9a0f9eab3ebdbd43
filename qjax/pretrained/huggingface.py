"""Llama-family decoders in the Hugging Face layout: `CausalLM`, the tensor names and shapes every
file format maps onto, and the loader of a model directory.

A directory holds `config.json`, `model.safetensors` or a sharded `model.safetensors.index.json`,
and `tokenizer.json`, read with safetensors' NumPy API and the `tokenizers` library (torch is
never needed). GGUF files (`qjax.pretrained.gguf`) are renamed to these names and mapped by the
same `map_tensors`.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from qjax.files import read_json
from qjax.models.llama import Llama, LlamaConfig


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


__all__ = ["CausalLM", "map_tensors"]
