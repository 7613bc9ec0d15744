"""IR50 truncated to three stages, with BatchNorm grouped per branch.

Layout is NHWC. The stacked training batch of a model with G branches is
(B*G, H, W, C) where item b*G + g is sample b of branch g (batch-major), so
per-branch statistics view it as (B, G, H, W, C).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
PAD1 = ((1, 1), (1, 1))  # PyTorch padding=1; Flax 'SAME' pads (0, 1) at stride 2.


# --- PyTorch default initialisers ------------------------------------------------

# kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)), fan_in = in * kh * kw.
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch's default Linear/Conv2d bias: U(+-1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def torch_conv(features: int, in_features: int, kernel: int, stride: int = 1,
               padding: Any = 'VALID', use_bias: bool = True,
               dtype: Optional[Dtype] = None, name: Optional[str] = None) -> nn.Conv:
  """A Conv with PyTorch's default init and explicit PyTorch-style padding."""
  fan_in = in_features * kernel * kernel
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=padding, use_bias=use_bias, dtype=dtype,
                 kernel_init=torch_kernel_init,
                 bias_init=torch_bias_init(fan_in), name=name)


def stats_dtype(*dtypes: Dtype) -> Dtype:
  """Dtype for norm statistics: float32 at least, float64 if any input is."""
  return jnp.result_type(jnp.float32, *dtypes)


# --- Layers -----------------------------------------------------------------------


class GroupedBatchNorm(nn.Module):
  """BatchNorm with per-branch train statistics (PyTorch semantics).

  In train mode the input (G*B, ..., C) is viewed as (B, G, ..., C) and branch
  g is normalised with the mean and biased variance of its own samples. The
  running statistics receive the composition of G sequential PyTorch updates
  r <- (1 - m) r + m s_g (g = 0..G-1), s = mean or unbiased variance, i.e.
  exactly what G separate PyTorch train-mode calls in branch order produce.
  Under jit with a batch-sharded input the reductions are global (all devices).

  Attributes:
    momentum: PyTorch momentum (weight of the new statistic).
    epsilon: added to the variance.
    dtype: output dtype; None keeps the statistics dtype.
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, groups: int = 1) -> jax.Array:
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (c,), jnp.float32)
    sdt = stats_dtype(x.dtype, scale.dtype, ra_mean.value.dtype)
    xs = x.astype(sdt)
    if train:
      if groups < 1 or x.shape[0] % groups:
        raise ValueError(f'GroupedBatchNorm: batch {x.shape[0]} is not a multiple '
                         f'of groups={groups}')
      xg = xs.reshape((x.shape[0] // groups, groups) + x.shape[1:])
      axes = (0,) + tuple(range(2, xg.ndim - 1))
      mean = jnp.mean(xg, axis=axes, keepdims=True)
      var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
      y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
      if not self.is_initializing():
        n = int(np.prod([xg.shape[a] for a in axes]))
        unbiased = var * (n / max(n - 1, 1))
        m = self.momentum
        new_mean, new_var = ra_mean.value.astype(sdt), ra_var.value.astype(sdt)
        for g in range(groups):  # branch order, as the reference's calls
          new_mean = (1 - m) * new_mean + m * mean.reshape(groups, c)[g]
          new_var = (1 - m) * new_var + m * unbiased.reshape(groups, c)[g]
        ra_mean.value = new_mean.astype(ra_mean.value.dtype)
        ra_var.value = new_var.astype(ra_var.value.dtype)
    else:
      y = (xs - ra_mean.value.astype(sdt)) * jax.lax.rsqrt(
          ra_var.value.astype(sdt) + self.epsilon)
    y = y * scale.astype(sdt) + bias.astype(sdt)
    return y.astype(self.dtype or sdt)


class PReLU(nn.Module):
  """PyTorch PReLU with one slope per channel (init 0.25)."""
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    alpha = self.param('alpha', nn.initializers.constant(0.25),
                       (x.shape[-1],), jnp.float32)
    dt = self.dtype or jnp.result_type(x.dtype, alpha.dtype)
    x, alpha = x.astype(dt), alpha.astype(dt)
    return jnp.where(x >= 0, x, alpha * x)


def nearest_indices(size_in: int, size_out: int) -> np.ndarray:
  """Source rows of PyTorch `F.interpolate(mode='nearest')`: floor(i*in/out).

  PyTorch computes the scale in float32; so do we, for identical rounding.
  """
  scale = np.float32(size_in) / np.float32(size_out)
  idx = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(idx, size_in - 1)


def resize_nearest(x: jax.Array, size: int) -> jax.Array:
  """Nearest resize of NHWC `x` to (size, size), PyTorch's pixel choice."""
  h, w = x.shape[1:3]
  if h == 2 * size and w == 2 * size:
    return x[:, ::2, ::2]
  return x[:, nearest_indices(h, size)][:, :, nearest_indices(w, size)]


class BottleneckIR(nn.Module):
  """IR unit: BN-conv-PReLU-conv(stride)-BN residual + (subsampled) shortcut."""
  in_c: int
  depth: int
  stride: int
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, groups: int = 1) -> jax.Array:
    s, cd = self.stride, self.dtype
    if self.in_c == self.depth:
      shortcut = x[:, ::s, ::s]  # MaxPool2d(kernel 1, stride s)
    else:
      shortcut = torch_conv(self.depth, self.in_c, 1, s, use_bias=False, dtype=cd,
                            name='shortcut_conv')(x)
      shortcut = GroupedBatchNorm(dtype=cd, name='shortcut_bn')(shortcut, train, groups)
    r = GroupedBatchNorm(dtype=cd, name='res_bn1')(x, train, groups)
    r = torch_conv(self.depth, self.in_c, 3, 1, PAD1, use_bias=False, dtype=cd,
                   name='res_conv1')(r)
    r = PReLU(dtype=cd, name='res_prelu')(r)
    r = torch_conv(self.depth, self.depth, 3, s, PAD1, use_bias=False, dtype=cd,
                   name='res_conv2')(r)
    r = GroupedBatchNorm(dtype=cd, name='res_bn2')(r, train, groups)
    return r + shortcut


REMAT_POLICIES = ('none', 'convs', 'full')


def remat_unit(policy: str) -> Any:
  """BottleneckIR, or it under nn.remat with jax.checkpoint `policy` (same parameter tree)."""
  if policy == 'none':
    return BottleneckIR
  if policy not in REMAT_POLICIES:
    raise ValueError(f'config.model.remat must be one of {REMAT_POLICIES}, got {policy!r}')
  saveable = jax.checkpoint_policies.dots_saveable if policy == 'convs' else None
  # self is argument 0: (x, train, groups) are 1, 2, 3; train and groups are Python values.
  return nn.remat(BottleneckIR, static_argnums=(2, 3), policy=saveable)


class IR50(nn.Module):
  """The first three stages of IR50 (input resized to img_size // 2).

  Attributes:
    img_size: nominal input size; the input is resized to img_size // 2.
    stage_channels: widths of body1..3 (the input layer has the first width).
    stage_units: number of units of body1..3; each stage's first unit has
      stride 2.
    dtype: compute dtype of convs and activations (None: follow inputs).
    remat: rematerialisation of each IR unit in the backward pass (REMAT_POLICIES):
      'none' keeps every activation; 'convs' keeps the conv outputs and recomputes
      BatchNorm/PReLU; 'full' keeps only each unit's input. Same numbers, less memory.
  """
  img_size: int = 224
  stage_channels: Sequence[int] = (64, 128, 256)
  stage_units: Sequence[int] = (3, 4, 14)
  dtype: Optional[Dtype] = None
  remat: str = 'none'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, groups: int = 1
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(N, H, W, 3) -> stage outputs x1, x2, x3 (NHWC, strides 4, 8, 16 of img_size)."""
    if x.ndim != 4:
      raise ValueError(f'IR50 expects NHWC images, got shape {x.shape}')
    cd = self.dtype
    x = resize_nearest(x, self.img_size // 2)
    c0 = self.stage_channels[0]
    x = torch_conv(c0, x.shape[-1], 3, 1, PAD1, use_bias=False, dtype=cd,
                   name='input_conv')(x)
    x = GroupedBatchNorm(dtype=cd, name='input_bn')(x, train, groups)
    x = PReLU(dtype=cd, name='input_prelu')(x)
    outs = []
    in_c = c0
    unit = remat_unit(self.remat)
    for stage, (depth, units) in enumerate(zip(self.stage_channels, self.stage_units)):
      for i in range(units):
        x = unit(in_c, depth, 2 if i == 0 else 1, dtype=cd,
                         name=f'body{stage + 1}_{i}')(x, train, groups)
        in_c = depth
      outs.append(x)
    return tuple(outs)
