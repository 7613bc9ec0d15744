"""Baseline / DCS / QCS assembly: inference path plus the training-time cross path.

Inference path (the deployed model): images -> ir_back -> conv1..3 -> pyramid
embedding (3 levels of tokens) -> VIT_base -> logits. Training (DCS, QCS) adds
one cross module per level over all branches, u = t + r and VIT_cross.
All branches run as one batched pass: (B, nb, ...) -> (B*nb, ...), item
b*nb + g being sample b of branch g.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from qcs_jax.models.backbone import IR50, PAD1, remat_unit, torch_conv
from qcs_jax.models.cross import CrossAttention
from qcs_jax.models.vit import VisionTransformer

NUM_BRANCHES = {'baseline': 1, 'dcs': 2, 'qcs': 4}
CSA_CHOICES = {'dcs': ('s', 'sdpa'), 'qcs': ('sd', 's', 'd')}
MINMAX_CHOICES = ('global', 'sample')
DTYPES = {'float32': None, 'bfloat16': jnp.bfloat16}


def num_branches(name: str) -> int:
  """Images per training sample: baseline 1, DCS 2 (a, p), QCS 4 (a, p, n, n2)."""
  if name not in NUM_BRANCHES:
    raise ValueError(f'config.model.name must be one of {tuple(NUM_BRANCHES)}, got {name!r}')
  return NUM_BRANCHES[name]


def tokens_per_level(img_size: int) -> int:
  """Tokens of each pyramid level (49 for 224); the model has 3x as many.

  Every stride-2 layer maps n -> ceil(n / 2); each level's map is x1 (img_size
  // 2 halved once) halved three more times.
  """
  n = img_size // 2
  for _ in range(4):  # body1 stride, then three halvings
    n = -(-n // 2)
  return n * n


def _flatten(x: jax.Array) -> jax.Array:
  """(N, h, w, D) -> (N, h*w, D), token = i*w + j (PyTorch flatten(2).transpose)."""
  return x.reshape(x.shape[0], -1, x.shape[-1])


class QCSModel(nn.Module):
  """QCS / DCS / IR50+ViT baseline for facial expression recognition.

  Fields are the config.model keys. Note: `name` doubles as Flax's module
  name; None means 'qcs'.

  Methods:
    __call__(images (B, nb, H, W, 3), train) -> dict(base=(B, nb, K),
      cross=(B, nb, K)); no 'cross' for the baseline. Use
      mutable=['batch_stats'] when train=True. Initialise with this method so
      that every parameter exists.
    infer(images (B, H, W, 3)) -> logits (B, K), eval mode, inference path.
    features(images (B, H, W, 3)) -> dict(x1, x2, x3, tokens, logits), eval.
    base_forward(images (N, H, W, 3), train, groups) -> (logits, tokens,
      (x1, x2, x3)): the inference path on an already-merged batch.
  """
  name: str = 'qcs'  # also Flax's module name (reserved field): None -> 'qcs'
  csa: str = 'sd'
  minmax: str = 'global'
  num_classes: int = 7
  img_size: int = 224
  stage_channels: Sequence[int] = (64, 128, 256)
  stage_units: Sequence[int] = (3, 4, 14)
  embed_dim: int = 768
  num_heads: int = 8
  mlp_ratio: float = 4.0
  base_depth: int = 2
  cross_depth: int = 1
  base_drop: float = 0.0
  cross_drop: float = 0.0
  base_proj_drop: float = 0.0
  cross_proj_drop: float = 0.0
  dtype: str = 'float32'
  remat: str = 'none'

  def __post_init__(self):
    validate(self.model_name, self.csa, self.minmax, self.dtype, self.stage_channels,
             self.stage_units, self.img_size, self.embed_dim, self.num_heads)
    remat_unit(self.remat)  # raises ValueError naming config.model.remat
    super().__post_init__()

  @property
  def model_name(self) -> str:
    return self.name or 'qcs'

  @property
  def num_branches(self) -> int:
    return NUM_BRANCHES[self.model_name]

  def setup(self):
    cd = DTYPES[self.dtype]
    c0, c1, c2 = self.stage_channels
    d = self.embed_dim
    self.ir_back = IR50(self.img_size, tuple(self.stage_channels),
                        tuple(self.stage_units), dtype=cd, remat=self.remat)
    self.conv1 = torch_conv(c0, c0, 3, 2, PAD1, dtype=cd)
    self.conv2 = torch_conv(c1, c1, 3, 2, PAD1, dtype=cd)
    self.conv3 = torch_conv(c2, c2, 3, 2, PAD1, dtype=cd)
    self.embed_q_0 = torch_conv(d, c0, 3, 2, PAD1, dtype=cd)
    self.embed_q_1 = torch_conv(d, d, 3, 2, PAD1, dtype=cd)
    self.embed_k = torch_conv(d, c1, 3, 2, PAD1, dtype=cd)
    self.embed_v = torch_conv(d, c2, 1, 1, 'VALID', dtype=cd)
    self.VIT_base = VisionTransformer(
        self.num_classes, d, self.base_depth, self.num_heads, self.mlp_ratio,
        self.base_drop, self.base_proj_drop, dtype=cd)
    if self.model_name != 'baseline':
      self.VIT_cross = VisionTransformer(
          self.num_classes, d, self.cross_depth, self.num_heads, self.mlp_ratio,
          self.cross_drop, self.cross_proj_drop, dtype=cd)
      kind = 'qcs' if self.model_name == 'qcs' else ('sdpa' if self.csa == 'sdpa' else 'dcs')
      variant = self.csa if self.model_name == 'qcs' else 'sd'
      for level in (1, 2, 3):
        # The authors' cross MLP is fixed at 4C (mlp_ratio is the ViTs').
        setattr(self, f'cross_attention_{level}', CrossAttention(
            kind, variant, self.minmax, 4.0, dtype=cd))

  def embed(self, x1: jax.Array, x2: jax.Array, x3: jax.Array) -> jax.Array:
    """Stage outputs -> tokens (N, 3 * T_level, D), levels q | k | v."""
    l1 = _flatten(self.embed_q_1(self.embed_q_0(self.conv1(x1))))
    l2 = _flatten(self.embed_k(self.conv2(x2)))
    l3 = _flatten(self.embed_v(self.conv3(x3)))
    return jnp.concatenate([l1, l2, l3], axis=1)

  def base_forward(self, images: jax.Array, train: bool = False, groups: int = 1):
    """Inference path on (N, H, W, 3) -> (logits (N, K), tokens (N, T, D), (x1, x2, x3)).

    `groups` > 1: the batch is batch-major stacked branches (item b*groups + g)
    and train-mode BatchNorm uses per-branch statistics.
    """
    x1, x2, x3 = self.ir_back(images, train=train, groups=groups)
    tokens = self.embed(x1, x2, x3)
    logits, tokens = self.VIT_base(tokens, train=train)
    return logits, tokens, (x1, x2, x3)

  def cross_forward(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    """VIT_base tokens (B, nb, T, D) of all branches -> cross logits (B, nb, K)."""
    b, nb, t, d = tokens.shape
    if t % 3:
      raise ValueError(f'{t} tokens cannot be split into 3 equal pyramid levels')
    levels = jnp.split(tokens, 3, axis=2)
    modules = (self.cross_attention_1, self.cross_attention_2, self.cross_attention_3)
    refined = jnp.concatenate([m(lv) for m, lv in zip(modules, levels)], axis=2)
    u = tokens + refined  # residual connection to the base network
    logits, _ = self.VIT_cross(u.reshape(b * nb, t, d), train=train)
    return logits.reshape(b, nb, -1)

  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """(B, nb, H, W, 3) -> dict(base (B, nb, K), cross (B, nb, K) unless baseline)."""
    nb = self.num_branches
    if images.ndim != 5 or images.shape[1] != nb:
      raise ValueError(f'{self.model_name} expects images (B, {nb}, H, W, 3), '
                       f'got {images.shape}')
    b = images.shape[0]
    x = images.reshape((b * nb,) + images.shape[2:])
    logits, tokens, _ = self.base_forward(x, train=train, groups=nb)
    out = {'base': logits.reshape(b, nb, -1)}
    if self.model_name != 'baseline':
      out['cross'] = self.cross_forward(tokens.reshape((b, nb) + tokens.shape[1:]), train)
    return out

  def _check_single(self, images: jax.Array):
    if images.ndim != 4:
      raise ValueError(f'expected images (B, H, W, 3), got {images.shape}')

  def infer(self, images: jax.Array) -> jax.Array:
    """(B, H, W, 3) -> logits (B, K): the deployed model, eval mode."""
    self._check_single(images)
    return self.base_forward(images, train=False)[0]

  def features(self, images: jax.Array) -> dict[str, jax.Array]:
    """(B, H, W, 3) -> stage outputs x1..x3 (NHWC), VIT_base tokens and logits."""
    self._check_single(images)
    logits, tokens, (x1, x2, x3) = self.base_forward(images, train=False)
    return dict(x1=x1, x2=x2, x3=x3, tokens=tokens, logits=logits)


def validate(name: str, csa: str, minmax: str, dtype: str, stage_channels: Sequence[int],
             stage_units: Sequence[int], img_size: int, embed_dim: int,
             num_heads: int) -> None:
  """Raise ValueError naming the config.model key of an invalid setting."""
  num_branches(name)
  if name in CSA_CHOICES and csa not in CSA_CHOICES[name]:
    raise ValueError(f'config.model.csa={csa!r} is invalid for name={name!r}: '
                     f'choose one of {CSA_CHOICES[name]}')
  if minmax not in MINMAX_CHOICES:
    raise ValueError(f'config.model.minmax must be one of {MINMAX_CHOICES}, got {minmax!r}')
  if dtype not in DTYPES:
    raise ValueError(f'config.model.dtype must be one of {tuple(DTYPES)}, got {dtype!r}')
  for key, val in (('stage_channels', stage_channels), ('stage_units', stage_units)):
    if len(tuple(val)) != 3 or any(int(v) < 1 for v in val):
      raise ValueError(f'config.model.{key} must be 3 positive ints, got {val!r}')
  if img_size < 2:
    raise ValueError(f'config.model.img_size must be >= 2, got {img_size}')
  if embed_dim % num_heads:
    raise ValueError(f'config.model.embed_dim={embed_dim} is not divisible by '
                     f'num_heads={num_heads}')
