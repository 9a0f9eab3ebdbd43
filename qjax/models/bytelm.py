"""A byte-level decoder-only transformer (GPT-style, pre-LN), written with ordinary Flax layers.

  model = ByteLM(num_layers=4, dim=128, num_heads=4)
  logits = model.apply({'params': params}, x)   # x int32 (batch, seq) bytes -> (batch, seq, 256)

Each block is x + Attn(LN(x)) then x + MLP(LN(x)) (pre-LN, as in GPT-2, Radford et al. 2019);
attention is `nn.MultiHeadDotProductAttention` with a causal mask, so the output at position t
depends on bytes <= t only. Embeddings of the 256 byte values and of positions are learned; the
output projection is the byte embedding transposed (`tied_embeddings=True`, Press & Wolf 2017) or
its own `nn.Dense`.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

VOCAB_SIZE = 256


class Block(nn.Module):
  """One pre-LN transformer block: causal self-attention, then a GELU MLP."""
  dim: int
  num_heads: int
  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, x, mask):
    h = nn.LayerNorm(name="ln_attn")(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name="attn")(
        h, h, mask=mask)
    h = nn.LayerNorm(name="ln_mlp")(x)
    h = nn.gelu(nn.Dense(self.mlp_ratio * self.dim, name="mlp_in")(h), approximate=False)
    return x + nn.Dense(self.dim, name="mlp_out")(h)


class ByteLM(nn.Module):
  """Byte-level causal LM; `__call__(x)` maps int bytes (batch, seq) to float32 logits."""
  num_layers: int = 4
  dim: int = 128
  num_heads: int = 4
  mlp_ratio: int = 4
  max_len: int = 128
  tied_embeddings: bool = True

  @nn.compact
  def __call__(self, x):
    if x.ndim != 2:
      raise ValueError(f"ByteLM: x must be int (batch, seq), got shape {x.shape}")
    if x.shape[1] > self.max_len:
      raise ValueError(f"ByteLM: sequence length {x.shape[1]} exceeds max_len {self.max_len}")
    embed = nn.Embed(VOCAB_SIZE, self.dim, name="embed")
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (self.max_len, self.dim),
                     jnp.float32)
    h = embed(x) + pos[None, :x.shape[1]]
    mask = nn.make_causal_mask(x)
    for i in range(self.num_layers):
      h = Block(self.dim, self.num_heads, self.mlp_ratio, name=f"block{i}")(h, mask)
    h = nn.LayerNorm(name="ln_final")(h)
    if self.tied_embeddings:
      return embed.attend(h).astype(jnp.float32)
    return nn.Dense(VOCAB_SIZE, name="head")(h).astype(jnp.float32)
