"""The training augmentation of transforms.Transform, batched on the device.

The host caches every image resized to the recipe's source size (``source_hw``)
as uint8; everything after the resize runs here inside the jitted step:
rotate -> random crop -> h-flip -> colour jitter (random order) -> normalise ->
random erasing, with torchvision's parameter laws (transforms.py) drawn from a
JAX key. ``augment_batch`` gives row (a, k) the key
fold_in(fold_in(fold_in(key, epoch[a]), position[a]), k), so an augmented image
is a pure function of (key, epoch, anchor position, branch): independent of the
batch it sits in, of sharding, of the process count and of the resume point.

``augment`` (transforms.Augment, frozen) and ``img_size`` are static arguments.
"""
from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from qcs_jax.data import device_ops as ops
from qcs_jax.data import transforms

Array = jax.Array
Params = dict[str, Array]

_NEUTRAL = (1.0, 1.0, 1.0, 0.0)   # brightness, contrast, saturation, hue factors that are off


def source_hw(augment: transforms.Augment, img_size: int) -> tuple[int, int]:
  """(H, W) of the cached uint8 images the device augmentation of `augment` expects.

  Raises ValueError (naming the field) for what the host Transform rejects and for
  keep_aspect=True: its images differ in shape, which one device array cannot hold.
  """
  transforms.Transform(augment, img_size, train=True)   # the host's own checks
  if augment.keep_aspect:
    raise ValueError("augment.keep_aspect=True keeps each image's aspect ratio (varying "
                     "shapes); device augmentation needs one square resize: set "
                     "keep_aspect=False or data.augment_on='host'")
  r = augment.resize
  if r == 0 or r == (0, 0):
    return int(img_size), int(img_size)
  return (int(r[0]), int(r[1])) if isinstance(r, tuple) else (int(r), int(r))


_PERMUTATIONS = np.array(list(itertools.permutations(range(4))), np.int32)   # (24, 4)
# The 32-bit words of one image's draw, in order (see draw_params).
_ANGLE, _TOP, _LEFT, _FLIP, _ORDER, _JITTER, _ERASE_P, _ERASE = 0, 1, 2, 3, 4, 5, 9, 10
_N = transforms.ERASE_ATTEMPTS
_WORDS = _ERASE + 4 * _N


def _unit(bits: Array) -> Array:
  """uint32 -> float32 uniform on [0, 1) with 24 random bits (exact in float32)."""
  return (bits >> 8).astype(jnp.float32) * jnp.float32(2.0 ** -24)


def _uniform(bits: Array, lo: float, hi: float) -> Array:
  """U[lo, hi) (hi itself only by float rounding, as jax.random.uniform)."""
  return jnp.float32(lo) + jnp.float32(hi - lo) * _unit(bits)


def _integers(bits: Array, n: Array | int) -> Array:
  """Uniform on 0..n-1 (bits mod n: bias below n / 2**32)."""
  return (bits % jnp.asarray(n, jnp.uint32)).astype(jnp.int32)


def draw_params(key: Array, augment: transforms.Augment, src_hw: tuple[int, int],
                img_size: int) -> Params:
  """One image's random parameters, with the laws of transforms.Transform (torchvision).

  angle ~ U[-rotate, rotate); (top, left) uniform on the integers 0..H-S, 0..W-S
  (0 without crop); flip with probability 0.5; jitter order a uniform permutation
  of (brightness, contrast, saturation, hue) and each active factor uniform on
  its ColorJitter range (neutral when off); RandomErasing with probability
  erase_p: 10 attempts of (area scale ~ U[scale], log aspect ~ U[log 0.3,
  log 3.3)), h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)) (half
  to even, as Python's round), the first attempt with h < S and w < S wins and
  places its box uniformly; no valid attempt -> no erase. The raw attempts are
  kept in the result ('erase_apply': the p-coin, 'erase_scales', 'erase_log_ratios')
  for checking; 'erase_on' says whether a box is written.

  All of it comes from one jax.random.bits call of 50 words (one threefry
  program per image: separate draws made the compile several times slower).
  """
  a, s = augment, int(img_size)
  height, width = src_hw
  bits = jax.random.bits(key, (_WORDS,), jnp.uint32)
  p: Params = {}
  p["angle"] = _uniform(bits[_ANGLE], -a.rotate, a.rotate) if a.rotate else jnp.float32(0.0)
  if a.crop:
    p["top"] = _integers(bits[_TOP], height - s + 1)
    p["left"] = _integers(bits[_LEFT], width - s + 1)
  else:
    p["top"] = p["left"] = jnp.int32(0)
  p["flip"] = (_unit(bits[_FLIP]) < 0.5) if a.hflip else jnp.bool_(False)
  jitter = transforms.ColorJitter.from_values(*a.jitter) if a.jitter else None
  ranges = ((jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
            if jitter is not None else (None,) * 4)
  p["jitter_factors"] = jnp.stack([
      jnp.float32(n) if r is None else _uniform(bits[_JITTER + i], r[0], r[1])
      for i, (r, n) in enumerate(zip(ranges, _NEUTRAL))])
  p["jitter_order"] = jnp.asarray(_PERMUTATIONS)[_integers(bits[_ORDER], 24)]
  p.update(_draw_erase(bits, a, s))
  return p


def _draw_erase(bits: Array, a: transforms.Augment, s: int) -> Params:
  """RandomErasing.get_params on the (s, s) normalised image, all 10 attempts at once."""
  if not a.erase_scale:
    zero = jnp.int32(0)
    return dict(erase_apply=jnp.bool_(False), erase_on=jnp.bool_(False), erase_top=zero, erase_left=zero, erase_h=zero,
                erase_w=zero, erase_scales=jnp.zeros((_N,), jnp.float32),
                erase_log_ratios=jnp.zeros((_N,), jnp.float32))
  words = bits[_ERASE:].reshape(4, _N)
  lo_r, hi_r = (math.log(r) for r in transforms.ERASE_RATIO)
  scales = _uniform(words[0], a.erase_scale[0], a.erase_scale[1])
  log_ratios = _uniform(words[1], lo_r, hi_r)
  area = jnp.float32(s * s) * scales
  aspect = jnp.exp(log_ratios)
  h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  valid = (h < s) & (w < s)
  first = jnp.argmax(valid)
  tops = _integers(words[2], jnp.maximum(s - h + 1, 1))
  lefts = _integers(words[3], jnp.maximum(s - w + 1, 1))
  apply = _unit(bits[_ERASE_P]) < a.erase_p
  return dict(erase_apply=apply, erase_on=apply & jnp.any(valid), erase_top=tops[first], erase_left=lefts[first],
              erase_h=h[first], erase_w=w[first], erase_scales=scales,
              erase_log_ratios=log_ratios)


def _blend_step(img: Array, op: Array, factors: Array, on: list[bool], when: Array) -> Array:
  """Brightness (op 0), contrast (1) or saturation (2) where `when` and op is on, else img.

  The three are one blend with different degenerate images (0, the grey mean,
  the luma), so one blend serves whichever op this slot holds.
  """
  degenerate = jnp.zeros_like(img)
  if on[1] or on[2]:
    lum = ops.luma(img)
    mean = (2 * jnp.sum(lum) + lum.size) // (2 * lum.size)   # as ops.adjust_contrast
    degenerate = jnp.where(op == 1, mean, jnp.where(op == 2, lum[..., None], degenerate))
  active = jnp.isin(op, jnp.array([i for i in range(3) if on[i]], jnp.int32))
  return jnp.where(when & active, ops.blend(degenerate, img, factors[op]), img)


def jitter_uint8(img: Array, factors: Array, order: Array,
                 augment: transforms.Augment) -> Array:
  """ColorJitter: the active ops of (brightness, contrast, saturation, hue) in `order`.

  The hue shift (the costly op) runs once: the blends that `order` puts before
  it, the hue shift, then the blends after it (each blend slot masked).
  """
  on = [bool(v) for v in augment.jitter]
  if not any(on[:3]):
    return ops.adjust_hue(img, factors[3]) if on[3] else img
  if not on[3]:
    for slot in range(4):
      img = _blend_step(img, order[slot], factors, on, jnp.bool_(True))
    return img
  at = jnp.argmax(order == 3)                       # the hue's slot
  blends = [order[j + (j >= at)] for j in range(3)]  # order with the hue slot skipped
  for j in range(3):
    img = _blend_step(img, blends[j], factors, on, j < at)
  img = ops.adjust_hue(img, factors[3])
  for j in range(3):
    img = _blend_step(img, blends[j], factors, on, j >= at)
  return img


def apply_params(params: Params, image: Array, augment: transforms.Augment,
                 img_size: int) -> Array:
  """One uint8 (H, W, 3) source image -> float32 (S, S, 3), normalised and erased."""
  a, s = augment, int(img_size)
  img = image.astype(jnp.int32)
  if a.rotate:
    img = ops.rotate_crop_flip(img, params["angle"], params["top"], params["left"],
                               params["flip"], s, s)
  else:
    img = ops.crop_flip(img, params["top"], params["left"], params["flip"], s, s)
  if a.jitter and any(a.jitter):
    img = jitter_uint8(img, params["jitter_factors"], params["jitter_order"], a)
  x = ops.normalize(img)
  if a.erase_scale:
    x = ops.erase(x, params["erase_on"], params["erase_top"], params["erase_left"],
                  params["erase_h"], params["erase_w"])
  return x


def row_key(key: Array, epoch: Array, position: Array, branch: Array | int) -> Array:
  """The key of branch `branch` of the anchor at global position `position` in `epoch`."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, epoch), position),
                            branch)


def augment_batch(key: Array, images: Array, epoch: Array, position: Array,
                  augment: transforms.Augment, img_size: int) -> Array:
  """uint8 (B, nb, H, W, 3) -> float32 (B, nb, S, S, 3); row (a, k) from row_key(key, epoch[a],
  position[a], k). Shapes are checked at trace time (ValueError)."""
  return augment_batch_with_params(key, images, epoch, position, augment, img_size)[0]


def augment_batch_with_params(key: Array, images: Array, epoch: Array, position: Array,
                              augment: transforms.Augment, img_size: int
                              ) -> tuple[Array, Params]:
  """augment_batch and the (B, nb, ...) parameters each row drew (for checks and logging)."""
  if images.ndim != 5 or images.shape[-1] != 3:
    raise ValueError(f"images must be (B, branches, H, W, 3), got shape {images.shape}")
  if images.dtype != jnp.uint8:
    raise ValueError(f"images must be uint8 (the cache's dtype), got {images.dtype}")
  src = source_hw(augment, img_size)
  if tuple(images.shape[2:4]) != src:
    raise ValueError(f"images are {tuple(images.shape[2:4])} but augment.resize={augment.resize} "
                     f"with img_size {img_size} needs the cache at {src}")
  b, nb = images.shape[:2]
  if epoch.shape != (b,) or position.shape != (b,):
    raise ValueError(f"epoch and position must be ({b},), got {epoch.shape}, {position.shape}")
  branches = jnp.arange(nb, dtype=jnp.int32)
  keys = jax.vmap(lambda e, p: jax.vmap(lambda k: row_key(key, e, p, k))(branches))(
      epoch.astype(jnp.int32), position.astype(jnp.int32))
  params = jax.vmap(jax.vmap(lambda k: draw_params(k, augment, src, img_size)))(keys)
  out = jax.vmap(jax.vmap(lambda p, x: apply_params(p, x, augment, img_size)))(params, images)
  return out, params


def eval_preprocess(images: Array) -> Array:
  """Eval on the device: uint8 (..., S, S, 3), centre-cropped on the host -> normalised float32."""
  if images.dtype != jnp.uint8 or images.shape[-1] != 3:
    raise ValueError(f"images must be uint8 (..., S, S, 3), got {images.dtype} {images.shape}")
  return ops.normalize(images)

