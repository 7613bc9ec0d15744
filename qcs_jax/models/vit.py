"""The ViT neck of QCS (`VIT_base`, `VIT_cross`) and the layers it shares.

Tokens are (B, T, D). Pre-norm blocks, qkv split as (3, heads, head_dim),
exact-erf GELU, LayerNorm eps 1e-6, SE-gated class token, linear head.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from qcs_jax.models.backbone import stats_dtype, torch_bias_init, torch_kernel_init

Dtype = Any



def torch_trunc_normal(std: float) -> nn.initializers.Initializer:
  """PyTorch's trunc_normal_(std=std): cut at +-2 ABSOLUTE (i.e. +-2/std sigmas)."""
  return nn.initializers.truncated_normal(std, lower=-2.0 / std, upper=2.0 / std)


# ViT init (docs/ARCHITECTURE.md section 3): Linear trunc-normal 0.01 + zero bias.
vit_kernel_init = torch_trunc_normal(0.01)
token_init = torch_trunc_normal(0.02)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis, PyTorch formula, statistics in >= float32.

  Attributes:
    epsilon: 1e-6 in the ViT, 1e-5 (PyTorch default) in the cross modules.
    dtype: output dtype; None keeps the statistics dtype.
  """
  epsilon: float = 1e-6
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (d,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (d,), jnp.float32)
    sdt = stats_dtype(x.dtype, scale.dtype)
    x = x.astype(sdt)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = y * scale.astype(sdt) + bias.astype(sdt)
    return y.astype(self.dtype or sdt)


def dense(features: int, fan_in: int, torch_init: bool, dtype: Optional[Dtype],
          name: str) -> nn.Dense:
  """A Dense with the ViT init (trunc-normal 0.01, zero bias) or PyTorch's default."""
  if torch_init:
    return nn.Dense(features, dtype=dtype, kernel_init=torch_kernel_init,
                    bias_init=torch_bias_init(fan_in), name=name)
  return nn.Dense(features, dtype=dtype, kernel_init=vit_kernel_init,
                  bias_init=nn.initializers.zeros, name=name)


class Mlp(nn.Module):
  """fc1 -> exact GELU -> dropout -> fc2 -> dropout."""
  hidden_dim: int
  drop: float = 0.0
  torch_init: bool = False
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    d = x.shape[-1]
    h = dense(self.hidden_dim, d, self.torch_init, self.dtype, 'fc1')(x)
    h = nn.gelu(h, approximate=False)
    h = nn.Dropout(self.drop, deterministic=not train)(h)
    h = dense(d, self.hidden_dim, self.torch_init, self.dtype, 'fc2')(h)
    return nn.Dropout(self.drop, deterministic=not train)(h)


class Attention(nn.Module):
  """Multi-head self-attention; softmax in >= float32; dropout after proj."""
  num_heads: int
  proj_drop: float = 0.0
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    b, n, d = x.shape
    if d % self.num_heads:
      raise ValueError(f'embed_dim {d} is not divisible by num_heads {self.num_heads}')
    hd = d // self.num_heads
    qkv = dense(3 * d, d, False, self.dtype, 'qkv')(x)
    qkv = qkv.reshape(b, n, 3, self.num_heads, hd)  # PyTorch order (3, heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) * hd ** -0.5
    attn = jax.nn.softmax(logits.astype(stats_dtype(logits.dtype)), axis=-1)
    out = jnp.einsum('bhqk,bkhd->bqhd', attn.astype(v.dtype), v).reshape(b, n, d)
    out = dense(d, d, False, self.dtype, 'proj')(out)
    return nn.Dropout(self.proj_drop, deterministic=not train)(out)


class Block(nn.Module):
  """Pre-norm transformer block: x + Attn(LN1 x), then x + MLP(LN2 x)."""
  num_heads: int
  mlp_ratio: float = 4.0
  drop: float = 0.0
  proj_drop: float = 0.0
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    d = x.shape[-1]
    h = LayerNorm(1e-6, self.dtype, name='norm1')(x)
    x = x + Attention(self.num_heads, self.proj_drop, self.dtype, name='attn')(h, train)
    h = LayerNorm(1e-6, self.dtype, name='norm2')(x)
    return x + Mlp(int(d * self.mlp_ratio), self.drop, False, self.dtype,
                   name='mlp')(h, train)


class SEBlock(nn.Module):
  """Squeeze-excitation gate on the class token: c * sigmoid(W2 relu(W1 c))."""
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, c: jax.Array) -> jax.Array:
    d = c.shape[-1]
    g = nn.relu(dense(d, d, False, self.dtype, 'linear1')(c))
    g = jax.nn.sigmoid(dense(d, d, False, self.dtype, 'linear2')(g))
    return c * g


class VisionTransformer(nn.Module):
  """ViT neck over pre-computed tokens; returns (logits, tokens).

  Attributes:
    num_classes: width of `head`.
    embed_dim: token width D.
    depth: number of blocks (`blocks_0` ...).
    num_heads: attention heads (head dim D / heads).
    mlp_ratio: MLP hidden width / D.
    drop_ratio: dropout after pos_embed and inside each MLP (train only).
    proj_drop: dropout after each attention `proj` (train only).
    dtype: compute dtype (None: follow inputs/params); logits are returned in
      >= float32.
  """
  num_classes: int = 7
  embed_dim: int = 768
  depth: int = 2
  num_heads: int = 8
  mlp_ratio: float = 4.0
  drop_ratio: float = 0.0
  proj_drop: float = 0.0
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool = False
               ) -> tuple[jax.Array, jax.Array]:
    """(B, T, D) tokens -> logits (B, K) and normalised tokens (B, T, D)."""
    b, t, d = tokens.shape
    if d != self.embed_dim:
      raise ValueError(f'VisionTransformer: token width {d} != embed_dim {self.embed_dim}')
    cls = self.param('cls_token', token_init, (1, 1, d), jnp.float32)
    pos = self.param('pos_embed', token_init, (1, t + 1, d), jnp.float32)
    cls = jnp.broadcast_to(cls, (b, 1, d))
    x = jnp.concatenate([cls, tokens], axis=1) + pos
    x = nn.Dropout(self.drop_ratio, deterministic=not train)(x)
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_ratio, self.drop_ratio, self.proj_drop,
                self.dtype, name=f'blocks_{i}')(x, train)
    x = LayerNorm(1e-6, self.dtype, name='norm')(x)
    c = SEBlock(self.dtype, name='se_block')(x[:, 0])
    logits = dense(self.num_classes, d, False, self.dtype, 'head')(c)
    return logits.astype(stats_dtype(logits.dtype)), x[:, 1:]
