"""Layers of the PyTorch reference network (NCHW), with the authors' module names:
the IR50 units and stages, and the ViT neck with the layers its forward never uses
(docs/ARCHITECTURE.md sections 1-3). Assembled in reference.py."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

# ----------------------------------------------------------------------------
# IR50 backbone.


class BottleneckIR(nn.Module):
  """bottleneck_IR unit: BN-conv-PReLU-conv(stride)-BN plus a shortcut."""

  def __init__(self, in_c: int, depth: int, stride: int):
    super().__init__()
    if in_c == depth:
      self.shortcut_layer = nn.MaxPool2d(1, stride)
    else:
      self.shortcut_layer = nn.Sequential(
          nn.Conv2d(in_c, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
    self.res_layer = nn.Sequential(
        nn.BatchNorm2d(in_c),
        nn.Conv2d(in_c, depth, 3, 1, 1, bias=False),
        nn.PReLU(depth),
        nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
        nn.BatchNorm2d(depth))

  def forward(self, x):
    return self.res_layer(x) + self.shortcut_layer(x)


def make_stage(in_c: int, depth: int, units: int) -> nn.Sequential:
  return nn.Sequential(*[
      BottleneckIR(in_c if i == 0 else depth, depth, 2 if i == 0 else 1)
      for i in range(units)])


class Backbone(nn.Module):
  """IR50 truncated to three stages, plus the unused output_layer."""

  def __init__(self, stage_channels: Sequence[int] = (64, 128, 256),
               stage_units: Sequence[int] = (3, 4, 14), img_size: int = 224):
    super().__init__()
    c0, c1, c2 = stage_channels
    c4 = 2 * c2  # the 4th stage's width (512 at paper size)
    side = img_size // 32
    self.img_size = img_size
    self.input_layer = nn.Sequential(
        nn.Conv2d(3, c0, 3, 1, 1, bias=False), nn.BatchNorm2d(c0), nn.PReLU(c0))
    self.output_layer = nn.Sequential(
        nn.BatchNorm2d(c4), nn.Dropout(0.0), nn.Flatten(),
        nn.Linear(c4 * side * side, c4), nn.BatchNorm1d(c4))
    self.body1 = make_stage(c0, c0, stage_units[0])
    self.body2 = make_stage(c0, c1, stage_units[1])
    self.body3 = make_stage(c1, c2, stage_units[2])

  def forward(self, x):
    x = F.interpolate(x, size=self.img_size // 2)  # mode 'nearest'
    x = self.input_layer(x)
    x1 = self.body1(x)
    x2 = self.body2(x1)
    x3 = self.body3(x2)
    return x1, x2, x3


# ----------------------------------------------------------------------------
# ViT neck.


class PatchEmbed(nn.Module):
  """Conv 1x1 to tokens (the reference ignores its img/patch-size arguments)."""

  def __init__(self, in_c: int, embed_dim: int):
    super().__init__()
    self.proj = nn.Conv2d(in_c, embed_dim, 1)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):

  def __init__(self, dim: int, num_heads: int, proj_drop: float):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.qkv = nn.Linear(dim, 3 * dim)
    self.attn_drop = nn.Dropout(0.0)
    self.proj = nn.Linear(dim, dim)
    self.proj_drop = nn.Dropout(proj_drop)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-2, -1)) * self.scale
    attn = self.attn_drop(attn.softmax(dim=-1))
    x = (attn @ v).transpose(1, 2).reshape(b, n, c)
    return self.proj_drop(self.proj(x))


class Mlp(nn.Module):

  def __init__(self, dim: int, hidden: int, drop: float = 0.0):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(hidden, dim)
    self.drop = nn.Dropout(drop)

  def forward(self, x):
    return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
  """Pre-norm transformer block; `conv` exists in the checkpoints, unused."""

  def __init__(self, dim, num_tokens, num_heads, mlp_ratio, drop, proj_drop):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, num_heads, proj_drop)
    self.conv = nn.Conv1d(num_tokens + 1, num_tokens + 1, 1)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class SEBlock(nn.Module):

  def __init__(self, dim: int):
    super().__init__()
    self.linear1 = nn.Linear(dim, dim)
    self.linear2 = nn.Linear(dim, dim)

  def forward(self, x):
    return x * torch.sigmoid(self.linear2(F.relu(self.linear1(x))))


class ClassificationHead(nn.Module):

  def __init__(self, dim: int, num_classes: int):
    super().__init__()
    self.linear = nn.Linear(dim, num_classes)

  def forward(self, x):
    return self.linear(x)


class EcaBlock(nn.Module):
  """Unused in forward; only its `conv` weight is in the checkpoints."""

  def __init__(self):
    super().__init__()
    self.conv = nn.Conv1d(1, 1, 5, padding=2, bias=False)  # [1, 1, 5] in the released files


class VisionTransformer(nn.Module):
  """ViT neck on a token sequence -> (logits, tokens)."""

  def __init__(self, num_tokens: int, embed_dim: int, depth: int,
               num_heads: int, mlp_ratio: float, num_classes: int,
               drop: float, proj_drop: float, backbone_width: int):
    super().__init__()
    d, c3 = embed_dim, backbone_width
    self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
    self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens + 1, d))
    self.pos_drop = nn.Dropout(drop)
    # Unused layers kept for the state-dict key set (paper size: 256->768,
    # 1024->768, 768->512).
    self.patch_embed = PatchEmbed(c3, d)
    self.CON1 = nn.Conv2d(c3, d, 1, bias=False)
    self.IRLinear1 = nn.Linear(4 * c3, d)
    self.IRLinear2 = nn.Linear(d, 2 * c3)
    self.eca_block = EcaBlock()
    self.blocks = nn.Sequential(*[
        Block(d, num_tokens, num_heads, mlp_ratio, drop, proj_drop)
        for _ in range(depth)])
    self.norm = nn.LayerNorm(d, eps=1e-6)
    self.se_block = SEBlock(d)
    self.head = ClassificationHead(d, num_classes)

  def forward(self, tokens):
    cls = self.cls_token.expand(tokens.shape[0], -1, -1)
    x = self.pos_drop(torch.cat([cls, tokens], dim=1) + self.pos_embed)
    x = self.norm(self.blocks(x))
    return self.head(self.se_block(x[:, 0])), x[:, 1:]


# ----------------------------------------------------------------------------
# Cross similarity attention and the cross module.
