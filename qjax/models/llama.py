"""A Llama-family decoder (Llama 2/3, Mistral without sliding window, Qwen2, SmolLM2) in Flax.

  cfg = LlamaConfig.from_hf(json.load(open("config.json")))
  model = Llama(cfg)
  logits = model.apply({"params": params}, tokens)   # int32 (batch, seq) -> float32 (b, s, vocab)

Each block is x + Attn(RMSNorm(x)) then x + SwiGLU(RMSNorm(x)), as in Hugging Face's
`LlamaForCausalLM`: rotary embeddings in the "rotate half" layout (the Hugging Face checkpoint
layout; GGUF files are converted back by `qjax.pretrained.gguf`), grouped-query attention (each
key/value head serves num_heads / num_kv_heads query heads) with a causal mask and an optional
padding mask, optional q/k/v biases (Qwen2), tied or untied output head. Every projection is an
`nn.Dense`, so `qjax.gpfq` / `qjax.gptq` see each as one weight op; the tied head is
`embed.attend`, which `skip="embed"` leaves float.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qjax.files import json_number

# model_type values of config.json this decoder reproduces exactly.
HF_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Sizes and options of a Llama-family decoder (Hugging Face config.json names)."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: tuple | None = None   # sorted (key, value) items of config.json's rope_scaling
  tie_word_embeddings: bool = False
  attention_bias: bool = False        # q/k/v (not o) biases: Qwen2 always, Llama when set
  max_position_embeddings: int = 2048
  model_type: str = "llama"
  dtype: str = "float32"              # compute dtype ('float32' or 'bfloat16'); params float32

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim"):
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"LlamaConfig.{name} must be a positive int, got {v!r}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"LlamaConfig: num_attention_heads {self.num_attention_heads} is not a "
                       f"multiple of num_key_value_heads {self.num_key_value_heads}")
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig.head_dim must be even (rotary pairs), got {self.head_dim}")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"LlamaConfig.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
    scaling = dict(self.rope_scaling or ())
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "llama3", "linear"):
      raise ValueError(f"LlamaConfig.rope_scaling: rope_type {kind!r} is not supported "
                       "(default, linear, llama3)")

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], source: str = "config.json", **overrides) -> "LlamaConfig":
    """From a Hugging Face config.json dict (model_type llama, mistral or qwen2); errors name
    `source`, and a size that is not an int (a str "384", a float 4.5) is refused, not coerced."""
    if not isinstance(hf, Mapping):
      raise ValueError(f"{source}: expected a JSON object, got {type(hf).__name__}")
    mt = hf.get("model_type")
    if mt not in HF_MODEL_TYPES:
      raise ValueError(f"{source}: model_type {mt!r} is not a Llama-family decoder; supported: "
                       f"{HF_MODEL_TYPES}")
    if mt in ("mistral", "qwen2") and hf.get("sliding_window") and hf.get(
        "use_sliding_window", mt == "mistral"):
      raise ValueError(f"{source}: sliding-window attention ({hf['sliding_window']}) is not "
                       "supported")
    if hf.get("hidden_act", "silu") != "silu":
      raise ValueError(f"{source}: hidden_act {hf.get('hidden_act')!r}; only 'silu' (SwiGLU)")
    if hf.get("mlp_bias"):
      raise ValueError(f"{source}: mlp_bias=True is not supported")

    def size(key, *default):
      return json_number(hf, key, source, int, *default)

    heads = size("num_attention_heads")
    hidden = size("hidden_size")
    # transformers v5 writes rope_parameters {rope_theta, rope_type, ...}; v4 rope_theta and
    # rope_scaling.
    rp = dict(hf.get("rope_parameters") or {})
    theta = json_number(rp, "rope_theta", source, float,
                        json_number(hf, "rope_theta", source, float, 10000.0))
    rp.pop("rope_theta", None)
    rs = hf.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
    kw = dict(
        vocab_size=size("vocab_size"), hidden_size=hidden,
        intermediate_size=size("intermediate_size"),
        num_hidden_layers=size("num_hidden_layers"), num_attention_heads=heads,
        num_key_value_heads=size("num_key_value_heads", heads),
        head_dim=size("head_dim", hidden // max(heads, 1)),  # heads < 1: __post_init__ says
        rms_norm_eps=json_number(hf, "rms_norm_eps", source, float, 1e-6),
        rope_theta=theta,
        rope_scaling=tuple(sorted(rs.items())) if rs else None,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", mt != "qwen2")),
        attention_bias=bool(hf.get("attention_bias", False)) or mt == "qwen2",
        max_position_embeddings=size("max_position_embeddings", 2048),
        model_type=mt)
    kw.update(overrides)
    try:
      return cls(**kw)
    except ValueError as e:  # e.g. hidden_size 0: name the file it came from
      raise ValueError(f"{source}: {e}") from None


def rope_frequencies(cfg: LlamaConfig) -> np.ndarray:
  """Inverse frequencies (head_dim/2,) float64, with linear or Llama 3 scaling (Hugging Face's
  `_compute_llama3_parameters`: long wavelengths divided by `factor`, short ones kept, a smooth
  blend between)."""
  d = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
  s = dict(cfg.rope_scaling or ())
  kind = s.get("rope_type", s.get("type", "default"))
  if kind == "linear":
    return inv / float(s["factor"])
  if kind == "llama3":
    factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    smooth = (old / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * inv / factor + smooth * inv
    out = np.where(wavelen > old / lo, inv / factor, inv)
    mid = (wavelen <= old / lo) & (wavelen >= old / hi)
    return np.where(mid, blended, out)
  return inv


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotate x (batch, seq, heads, head_dim) by position, the "rotate half" layout: dimension i
  pairs with i + head_dim/2."""
  ang = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)[None, None]
  cos = jnp.concatenate([jnp.cos(ang)] * 2, axis=-1)[:, :, None, :].astype(x.dtype)
  sin = jnp.concatenate([jnp.sin(ang)] * 2, axis=-1)[:, :, None, :].astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


class RMSNorm(nn.Module):
  """x / sqrt(mean(x^2) + eps) * scale, computed in float32 (as Hugging Face does)."""
  eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (scale.reshape((1,) * (y.ndim - 1) + (-1,)) * y).astype(self.dtype)


class Attention(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x, positions, mask):
    c = self.cfg
    dt = jnp.dtype(c.dtype)
    b, s, _ = x.shape
    hd, nq, nkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
    dense = lambda n, name, bias: nn.Dense(n, use_bias=bias, dtype=dt, name=name)  # noqa: E731
    q = dense(nq * hd, "q_proj", c.attention_bias)(x).reshape(b, s, nq, hd)
    k = dense(nkv * hd, "k_proj", c.attention_bias)(x).reshape(b, s, nkv, hd)
    v = dense(nkv * hd, "v_proj", c.attention_bias)(x).reshape(b, s, nkv, hd)
    inv = rope_frequencies(c)
    q, k = apply_rope(q, positions, inv), apply_rope(k, positions, inv)
    # GQA: query head h reads key/value head h // (nq / nkv) (Hugging Face's repeat_kv).
    k = jnp.repeat(k, nq // nkv, axis=2)
    v = jnp.repeat(v, nq // nkv, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(hd)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, nq * hd)
    return dense(c.hidden_size, "o_proj", False)(out)


class MLP(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x):
    c, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    gate = nn.Dense(c.intermediate_size, use_bias=False, dtype=dt, name="gate_proj")(x)
    up = nn.Dense(c.intermediate_size, use_bias=False, dtype=dt, name="up_proj")(x)
    return nn.Dense(c.hidden_size, use_bias=False, dtype=dt, name="down_proj")(nn.silu(gate) * up)


class Block(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x, positions, mask):
    c, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    x = x + Attention(c, name="self_attn")(
        RMSNorm(c.rms_norm_eps, dt, name="input_layernorm")(x), positions, mask)
    return x + MLP(c, name="mlp")(RMSNorm(c.rms_norm_eps, dt, name="post_attention_layernorm")(x))


class Llama(nn.Module):
  """The decoder; `__call__(tokens, attention_mask=None)` -> float32 logits (batch, seq, vocab).

  attention_mask (batch, seq), 1 for real tokens, 0 for padding (left or right): padded keys are
  never attended to and positions count real tokens only, as Hugging Face does with left padding.
  """
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, tokens, attention_mask=None):
    c, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    b, s = tokens.shape
    causal = jnp.tril(jnp.ones((s, s), bool))[None, None]
    if attention_mask is None:
      positions = jnp.broadcast_to(jnp.arange(s), (b, s))
      mask = causal
    else:
      am = jnp.asarray(attention_mask).astype(bool)
      positions = jnp.maximum(jnp.cumsum(am, axis=1) - 1, 0)
      # A padded query row keeps its own position so softmax never sees an all-masked row.
      mask = causal & (am[:, None, None, :] | jnp.eye(s, dtype=bool)[None, None])
    embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=dt, name="embed_tokens")
    x = embed(tokens)
    for i in range(c.num_hidden_layers):
      x = Block(c, name=f"layers_{i}")(x, positions, mask)
    x = RMSNorm(c.rms_norm_eps, dt, name="norm")(x)
    if c.tie_word_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(c.vocab_size, use_bias=False, dtype=dt, name="lm_head")(x)
    return logits.astype(jnp.float32)
