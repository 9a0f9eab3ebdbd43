"""A BERT encoder in Flax (Devlin et al., 2019), laid out so every matmul is a plain `nn.Dense`.

  model = BertEncoder(BertConfig())                      # all-MiniLM-L6-v2 sizes by default
  hidden = model.apply({'params': params}, input_ids, attention_mask)   # (n, L, hidden) float32
  emb = mean_pool_normalize(hidden, attention_mask)      # sentence embeddings, unit L2 norm

Post-LN blocks as in the original BERT: x = LN(x + Dense(Attn(x))), then
x = LN(x + Dense(GELU(Dense(x)))).
The query/key/value/output projections are separate `nn.Dense` layers (not DenseGeneral), so
every weight matrix is a plain (in, out) kernel that a Dense-level quantizer can reach. GELU is
the exact erf form and LayerNorm eps 1e-12, as in the checkpoint's config.json. Sentence
embeddings follow Sentence-BERT (Reimers & Gurevych, 2019): the mean of the token states over the
attention mask, L2-normalised. Module names follow the checkpoint's structure so that
`qjax.pretrained.bert` maps it one to one.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Sizes of the encoder (defaults: all-MiniLM-L6-v2's config.json)."""
  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads "
                       f"{self.num_heads}")


class SelfAttention(nn.Module):
  """Multi-head attention with separate query/key/value Dense layers and a key padding mask."""
  config: BertConfig

  @nn.compact
  def __call__(self, x, attention_mask):
    c = self.config
    head_dim = c.hidden_size // c.num_heads
    split = lambda t: t.reshape(t.shape[:2] + (c.num_heads, head_dim))  # noqa: E731
    q = split(nn.Dense(c.hidden_size, name="query")(x))
    k = split(nn.Dense(c.hidden_size, name="key")(x))
    v = split(nn.Dense(c.hidden_size, name="value")(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(head_dim))
    # Padding keys get the most negative float (as the reference does): exp underflows to 0.
    keep = attention_mask[:, None, None, :].astype(bool)
    scores = jnp.where(keep, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return ctx.reshape(ctx.shape[:2] + (c.hidden_size,))


class Layer(nn.Module):
  """One post-LN encoder layer."""
  config: BertConfig

  @nn.compact
  def __call__(self, x, attention_mask):
    c = self.config
    ln = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, name=name)  # noqa: E731
    h = SelfAttention(c, name="attention")(x, attention_mask)
    x = ln("attention_norm")(x + nn.Dense(c.hidden_size, name="attention_output")(h))
    h = nn.gelu(nn.Dense(c.intermediate_size, name="intermediate")(x), approximate=False)
    return ln("output_norm")(x + nn.Dense(c.hidden_size, name="output")(h))


class BertEncoder(nn.Module):
  """Token states of a BERT encoder: int (n, L) ids and mask -> float32 (n, L, hidden)."""
  config: BertConfig = BertConfig()

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None):
    c = self.config
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
      raise ValueError(f"BertEncoder: input_ids and attention_mask must both be (n, L), got "
                       f"{input_ids.shape} and {attention_mask.shape}")
    if input_ids.shape[1] > c.max_position_embeddings:
      raise ValueError(f"BertEncoder: sequence length {input_ids.shape[1]} exceeds "
                       f"max_position_embeddings {c.max_position_embeddings}")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    positions = jnp.arange(input_ids.shape[1])[None, :]
    x = (nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")(input_ids)
         + nn.Embed(c.max_position_embeddings, c.hidden_size,
                    name="position_embeddings")(positions)
         + nn.Embed(c.type_vocab_size, c.hidden_size,
                    name="token_type_embeddings")(token_type_ids))
    x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="embeddings_norm")(x)
    for i in range(c.num_layers):
      x = Layer(c, name=f"layer_{i}")(x, attention_mask)
    return x


def mean_pool_normalize(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Sentence-BERT pooling: mean of the token states where mask is 1, then unit L2 norm.

  The denominators are clamped like the reference (count >= 1e-9, norm >= 1e-12), so an input
  with an all-zero mask gives zeros rather than NaN.
  """
  m = attention_mask.astype(hidden.dtype)[..., None]
  pooled = (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)
  norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
  return pooled / jnp.maximum(norm, 1e-12)
