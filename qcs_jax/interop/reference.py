"""PyTorch reference of the QCS network (NCHW), written from docs/ARCHITECTURE.md.

Module names follow the authors' code so `state_dict()` keys are those of their
checkpoints, including the layers their forward never uses (IR50
`output_layer`, the ViTs' per-block `conv`, `CON1`, `IRLinear1/2`,
`eca_block`, `patch_embed`). Widths are configurable with the fields of
`config.model` so tests can run tiny models. The training-time forward calls
`ir_back` once per branch, as the reference does.

Also here: helpers that give a model random weights and non-trivial BatchNorm
running statistics. Writers of the PyTorch file kinds of docs/CONVERTER.md are in
reference_files.py.
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from qcs_jax.models.qcs import NUM_BRANCHES  # pylint: disable=unused-import
from qcs_jax.models.shapes import DEFAULT_MODEL_CFG

# The fields of config.model at paper size: the one source of model defaults.
FULL_CFG: dict[str, Any] = dict(DEFAULT_MODEL_CFG)

# A tiny model: 64x64 images -> 2x2 tokens per level (12 tokens). Units
# (2, 1, 2) cover every unit kind: subsampling and identity shortcuts, conv
# shortcuts.
TINY_CFG: dict[str, Any] = dict(
    FULL_CFG, img_size=64, stage_channels=(8, 16, 32), stage_units=(2, 1, 2),
    embed_dim=32, num_heads=4)

# XLA options for test-only jits: no LLVM optimisation, ~3x faster compiles.
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def make_cfg(base: dict[str, Any] | None = None, **overrides) -> dict[str, Any]:
  """Returns a model config dict (TINY_CFG unless `base`) with overrides."""
  cfg = dict(TINY_CFG if base is None else base)
  cfg.update(overrides)
  return cfg


def tokens_per_level(img_size: int) -> int:
  side = img_size // 32
  return side * side


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


def _shift_min(d, per_sample: bool):
  if per_sample:
    return d - d.amin(dim=(1, 2), keepdim=True)
  return d - d.min()


def _flip(d, per_sample: bool):
  """max(D) - D (the similarity of a min-shifted distance matrix)."""
  if per_sample:
    return d.amax(dim=(1, 2), keepdim=True) - d
  return d.max() - d


def _cols(m):
  """normalize over K then sum over R: (B, R, K) -> (B, K)."""
  return F.normalize(m, p=2, dim=2).sum(dim=1)


def _rows(m):
  """normalize over R then sum over K: (B, R, K) -> (B, R)."""
  return F.normalize(m, p=2, dim=1).sum(dim=2)


def dcs_maps(qk1, qk2, minmax='global'):
  ps = minmax == 'sample'
  s = _flip(_shift_min(torch.cdist(qk2, qk1), ps), ps)
  return _cols(s).softmax(-1), _rows(s).softmax(-1)


def qcs_maps(qk1, qk2, qk3, qk4, theta, variant='sd', minmax='global'):
  ps = minmax == 'sample'
  s21 = _flip(_shift_min(torch.cdist(qk2, qk1), ps), ps)
  s43 = _flip(_shift_min(torch.cdist(qk4, qk3), ps), ps)
  d31 = _shift_min(torch.cdist(qk3, qk1), ps)
  d42 = _shift_min(torch.cdist(qk4, qk2), ps)
  s_terms = (_cols(s21), _cols(s21.transpose(1, 2)),
             _rows(s43.transpose(1, 2)), _rows(s43))
  d_terms = (_cols(d31), _cols(d42), _rows(d31), _rows(d42))
  k = torch.tanh(theta) + 1
  if variant == 'sd':
    logits = [s + k * d for s, d in zip(s_terms, d_terms)]
  elif variant == 's':
    logits = s_terms
  elif variant == 'd':
    logits = d_terms
  else:
    raise ValueError(f'unknown QCS variant {variant!r}')
  return tuple(l.softmax(-1) for l in logits)


class CrossMlp(nn.Module):

  def __init__(self, dim: int):
    super().__init__()
    self.fc1 = nn.Linear(dim, 4 * dim)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(4 * dim, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class CrossModule(nn.Module):
  """One pyramid level's cross module for 2 (DCS) or 4 (QCS) branches."""

  def __init__(self, dim: int, kind: str, csa: str, minmax: str):
    super().__init__()
    self.dim, self.kind, self.csa, self.minmax = dim, kind, csa, minmax
    self.norm1 = nn.LayerNorm(dim)
    self.proj = nn.Linear(dim, 2 * dim)
    self.norm2 = nn.LayerNorm(dim)
    self.mlp = CrossMlp(dim)
    if kind == 'qcs':
      self.theta = nn.Parameter(torch.tensor(0.))  # 0-d, as in the released files
    self.last_maps = None

  def forward(self, *xs):
    xs = [self.norm1(x) for x in xs]
    qk, v = zip(*[self.proj(x).split(self.dim, dim=-1) for x in xs])
    if self.kind == 'dcs' and self.csa == 'sdpa':
      inter = qk[1] @ qk[0].transpose(1, 2) * self.dim ** -0.5  # (B, N2, N1)
      m2 = inter.softmax(dim=2)
      m1 = inter.softmax(dim=1).transpose(1, 2)
      self.last_maps = (m1, m2)
      adds = [m1 @ v[1], m2 @ v[0]]
    else:
      if self.kind == 'dcs':
        maps = dcs_maps(qk[0], qk[1], self.minmax)
      else:
        maps = qcs_maps(*qk, self.theta, self.csa, self.minmax)
      self.last_maps = maps
      adds = [m[..., None] * vb for m, vb in zip(maps, v)]
    out = []
    for x, a in zip(xs, adds):
      x = self.norm2(x + a)
      out.append(x + self.mlp(x))
    return out


# ----------------------------------------------------------------------------
# The whole model.


class QCSReference(nn.Module):
  """baseline / DCS / QCS with the authors' module names."""

  def __init__(self, cfg: dict[str, Any]):
    super().__init__()
    self.cfg = dict(cfg)
    name = cfg['name']
    c0, c1, c2 = cfg['stage_channels']
    d = cfg['embed_dim']
    n = 3 * tokens_per_level(cfg['img_size'])
    self.num_branches = NUM_BRANCHES[name]
    self.ir_back = Backbone(cfg['stage_channels'], cfg['stage_units'],
                            cfg['img_size'])
    self.conv1 = nn.Conv2d(c0, c0, 3, 2, 1)
    self.conv2 = nn.Conv2d(c1, c1, 3, 2, 1)
    self.conv3 = nn.Conv2d(c2, c2, 3, 2, 1)
    self.embed_q = nn.Sequential(nn.Conv2d(c0, d, 3, 2, 1),
                                 nn.Conv2d(d, d, 3, 2, 1))
    self.embed_k = nn.Sequential(nn.Conv2d(c1, d, 3, 2, 1))
    self.embed_v = PatchEmbed(c2, d)
    vit = dict(num_tokens=n, embed_dim=d, num_heads=cfg['num_heads'],
               mlp_ratio=cfg['mlp_ratio'], num_classes=cfg['num_classes'],
               backbone_width=c2)
    self.VIT_base = VisionTransformer(depth=cfg['base_depth'],
                                      drop=cfg['base_drop'],
                                      proj_drop=cfg['base_proj_drop'], **vit)
    if name != 'baseline':
      self.VIT_cross = VisionTransformer(depth=cfg['cross_depth'],
                                         drop=cfg['cross_drop'],
                                         proj_drop=cfg['cross_proj_drop'],
                                         **vit)
      for level in (1, 2, 3):
        setattr(self, f'cross_attention_{level}',
                CrossModule(d, name, cfg['csa'], cfg['minmax']))

  def features(self, x) -> dict[str, torch.Tensor]:
    """Inference path with every intermediate: stages, tokens, logits."""
    x1, x2, x3 = self.ir_back(x)
    t1 = self.embed_q(self.conv1(x1)).flatten(2).transpose(1, 2)
    t2 = self.embed_k(self.conv2(x2)).flatten(2).transpose(1, 2)
    t3 = self.embed_v(self.conv3(x3))
    logits, tokens = self.VIT_base(torch.cat([t1, t2, t3], dim=1))
    return dict(x1=x1, x2=x2, x3=x3, tokens=tokens, logits=logits)

  def infer(self, x):
    return self.features(x)['logits']

  def forward_train(self, *branches) -> dict[str, list[Any]]:
    """The training-time graph: one ir_back call per branch, as the reference.

    Returns base and cross logits per branch, plus every branch's features().
    """
    if len(branches) != self.num_branches:
      raise ValueError(f'{self.cfg["name"]} takes {self.num_branches} branches')
    feats = [self.features(x) for x in branches]
    out = dict(base=[f['logits'] for f in feats], features=feats)
    if self.cfg['name'] == 'baseline':
      return out
    n = feats[0]['tokens'].shape[1] // 3
    refined = []
    for level in range(3):
      module = getattr(self, f'cross_attention_{level + 1}')
      refined.append(module(*[f['tokens'][:, level * n:(level + 1) * n]
                              for f in feats]))
    out['cross'] = []
    for b, f in enumerate(feats):
      r = torch.cat([refined[level][b] for level in range(3)], dim=1)
      out['cross'].append(self.VIT_cross(f['tokens'] + r)[0])
    return out

  forward = forward_train


# Parameters the reference holds but never uses in forward (name patterns).
UNUSED_PATTERNS = (
    r'^ir_back\.output_layer\.',
    r'^VIT_(base|cross)\.blocks\.\d+\.conv\.',
    r'^VIT_(base|cross)\.(CON1|IRLinear1|IRLinear2|eca_block|patch_embed)\.',
)


# ----------------------------------------------------------------------------
# Random weights with non-trivial BatchNorm statistics.


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0, calib_batch: int = 4) -> None:
  """Random weights everywhere and realistic, non-trivial BN running stats.

  Affine BN/LN parameters, PReLU slopes, biases, cls/pos tokens and theta get
  random values (PyTorch's defaults would make many of them trivial); the BN
  running statistics are then set from one train-mode pass over a random
  batch (so activations keep a sane scale through the 21 units) and
  perturbed, so that eval mode differs from train mode.
  """
  gen = torch.Generator().manual_seed(seed)

  def rand(shape, lo, hi):
    return torch.rand(shape, generator=gen) * (hi - lo) + lo

  def randn(shape, std):
    return torch.randn(shape, generator=gen) * std

  for name, mod in model.named_modules():
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear)):
      fan_in = mod.weight[0].numel()
      mod.weight.copy_(randn(mod.weight.shape, 1.0 / math.sqrt(fan_in)))
      if mod.bias is not None:
        mod.bias.copy_(randn(mod.bias.shape, 0.1))
    elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
      mod.weight.copy_(rand(mod.weight.shape, 0.5, 1.5))
      mod.bias.copy_(randn(mod.bias.shape, 0.2))
    elif isinstance(mod, nn.LayerNorm):
      mod.weight.copy_(rand(mod.weight.shape, 0.7, 1.3))
      mod.bias.copy_(randn(mod.bias.shape, 0.1))
    elif isinstance(mod, nn.PReLU):
      mod.weight.copy_(rand(mod.weight.shape, 0.05, 0.5))
    if isinstance(mod, VisionTransformer):
      mod.cls_token.copy_(randn(mod.cls_token.shape, 0.5))
      mod.pos_embed.copy_(randn(mod.pos_embed.shape, 0.5))
    if isinstance(mod, CrossModule) and hasattr(mod, 'theta'):
      mod.theta.copy_(randn((), 0.5))
  # The last BN of each residual branch scaled down, as in a trained ResNet.
  for mod in model.modules():
    if isinstance(mod, BottleneckIR):
      mod.res_layer[4].weight.mul_(0.3)
  calibrate_bn_(model, gen, calib_batch)


@torch.no_grad()
def calibrate_bn_(model: nn.Module, gen: torch.Generator, batch: int) -> None:
  """Sets BN running stats to one random batch's statistics, then perturbs."""
  backbones = [m for m in model.modules() if isinstance(m, Backbone)]
  bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
  was_training = model.training
  saved = [m.momentum for m in bns]
  for m in bns:
    m.reset_running_stats()
    m.momentum = None  # cumulative average: one pass = that batch's stats
  for bb in backbones:
    bb.train()
    bb(torch.randn((batch, 3, bb.img_size, bb.img_size), generator=gen))
  for m, mom in zip(bns, saved):
    m.momentum = mom
    m.running_mean.add_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
    m.running_var.mul_(torch.rand(m.running_var.shape, generator=gen) * 0.6 + 0.7)
    m.num_batches_tracked.fill_(1000)
  for m in model.modules():
    if isinstance(m, nn.BatchNorm1d):  # the unused output_layer's BN1d
      m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
      m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
  model.train(was_training)


def build_reference(cfg: dict[str, Any], seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> QCSReference:
  """A reference model with random weights and BN stats, in eval mode."""
  torch.manual_seed(seed)
  model = QCSReference(cfg)
  randomize_(model, seed)
  return model.to(dtype).eval()


def random_images(cfg: dict[str, Any], batch: int, seed: int = 0,
                  branches: int | None = None) -> np.ndarray:
  """Normalised-looking NHWC float32 images: (B, H, W, 3) or (B, nb, H, W, 3)."""
  rng = np.random.default_rng(seed)
  size = cfg['img_size']
  shape = (batch, size, size, 3) if branches is None else (
      batch, branches, size, size, 3)
  return rng.normal(0.0, 1.0, shape).astype(np.float32)


def to_nchw(images: np.ndarray, dtype=torch.float32) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(
      np.moveaxis(images, -1, -3))).to(dtype)


def to_nhwc(t: torch.Tensor) -> np.ndarray:
  return np.moveaxis(t.detach().numpy(), -3, -1)


def rel_err(ours, ref) -> float:
  """max|ours - ref| / max|ref| over the whole tensor."""
  ours = np.asarray(ours, np.float64)
  ref = np.asarray(ref, np.float64)
  if ours.shape != ref.shape:
    raise AssertionError(f'shape {ours.shape} != reference {ref.shape}')
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


# ----------------------------------------------------------------------------
# Writers of the three PyTorch file kinds.


def count_params(module: nn.Module, skip_patterns: Sequence[str] = ()) -> int:
  return sum(p.numel() for k, p in module.named_parameters()
             if not any(re.search(pat, k) for pat in skip_patterns))
