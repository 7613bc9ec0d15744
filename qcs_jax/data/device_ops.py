"""The host augmentation ops (transforms.py, PIL) re-done in JAX, one image at a time.

Every function is pure and jittable and takes one image as int32 (H, W, 3) holding
uint8 values (or a float32 normalised image for ``erase``); augment_batch vmaps
them. Each PIL op returns uint8, so each op here returns the same integers, with
PIL's own rounding (Pillow's C sources, libImaging):

- blends (ImageEnhance, Blend.c): ``(UINT8)(in1 + alpha * (in2 - in1))`` in C float,
  i.e. float32 then truncation, clipped to 0..255 when alpha > 1;
- 'L' (Convert.c): ``(19595 R + 38470 G + 7471 B + 0x8000) >> 16``;
- Contrast: the degenerate grey is ``int(mean(L) + 0.5)``;
- hue (Convert.c rgb2hsv/hsv2rgb): C float/double arithmetic. The hue byte of
  rgb2hsv is tabulated in numpy with the C types (float32 where C has float,
  float64 where C has double); the saturation byte and hsv2rgb's p, q, t are
  integer roundings of the exact rationals, which equal PIL's on all 2**24
  inputs (checked against PIL, tests/test_device_augment.py);
- rotate (Geometry.c affine_fixed): 16.16 fixed point, ``xin = xx >> 16``.
  The fixed-point matrix comes from float32 cos/sin here but from double in
  PIL, so a pixel whose source coordinate lies within ~1e-5 px of a pixel edge
  may take the neighbour (tests/test_device_augment.py bounds the fraction).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from qcs_jax.data import transforms

Array = jax.Array


# ------------------------------------------------------------ colour tables --


@functools.lru_cache(maxsize=1)
def _hue_table() -> np.ndarray:
  """rgb2hsv's hue byte for every case, in numpy with the C types (float / double).

  The hue depends on which channel is the max (r first, then g) and on the other
  two channels' distances n1, n2 below it (cr = max(n1, n2)): index
  (case * 256 + n1) * 256 + n2. The rational floor(255 h) differs from C's on
  0.3% of colours, hence the table.
  """
  f32, f64 = np.float32, np.float64
  n1, n2 = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
  cr = np.maximum(n1, n2)
  with np.errstate(divide="ignore", invalid="ignore"):
    q1 = f32(n1) / f32(cr)
    q2 = f32(n2) / f32(cr)
    h_r = (q2 - q1).astype(f32)                                     # bc - gc (float)
    h_g = ((2.0 + q1.astype(f64)) - q2.astype(f64)).astype(f32)     # 2.0 + rc - bc (double)
    h_b = ((4.0 + q2.astype(f64)) - q1.astype(f64)).astype(f32)     # 4.0 + gc - rc (double)
    hue = []
    for h in (h_r, h_g, h_b):
      h = np.fmod(h.astype(f64) / 6.0 + 1.0, 1.0).astype(f32)
      uh = np.clip(np.trunc(np.nan_to_num(h.astype(f64) * 255.0)), 0, 255)
      hue.append(np.where(cr == 0, 0, uh).astype(np.uint8))
  return np.stack(hue).reshape(-1)


def hue_shift_levels(factor: Array) -> Array:
  """int(factor * 255) % 256 (Python's: truncation toward 0, non-negative modulo).

  float32's factor * 255 truncates as double's does for every float32 factor in
  [-0.5, 0.5]: rounding onto an integer K would need factor within 64 ulp(factor)
  / 255 < 1 ulp of K / 255, and no float32 within 8 ulps of any K / 255 does it
  (tests/test_device_augment.py checks those and 100,000 random factors).
  """
  k = jnp.trunc(jnp.asarray(factor, jnp.float32) * 255.0)
  return jnp.mod(k.astype(jnp.int32), 256)


def rgb_to_hsv(img: Array) -> Array:
  """PIL's convert('HSV') of int32 (..., 3) RGB values."""
  r, g, b = img[..., 0], img[..., 1], img[..., 2]
  maxc = jnp.maximum(r, jnp.maximum(g, b))
  minc = jnp.minimum(r, jnp.minimum(g, b))
  case = jnp.where(r == maxc, 0, jnp.where(g == maxc, 1, 2))
  n1 = maxc - jnp.where(case == 0, g, r)     # (r max: g, b), (g max: r, b), (b max: r, g)
  n2 = maxc - jnp.where(case == 2, g, b)
  uh = jnp.asarray(_hue_table())[(case * 256 + n1) * 256 + n2].astype(jnp.int32)
  # (int)((float)(cr / maxc) * 255.0) equals the rational floor for all 2**24 colours
  us = (255 * (maxc - minc)) // jnp.maximum(maxc, 1)
  return jnp.stack([uh, us, maxc], -1)


def hsv_to_rgb(hsv: Array) -> Array:
  """PIL's convert('RGB') of int32 (..., 3) HSV values."""
  h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  # C: p = round(v * (1.0 - fs)), q = round(v * (1.0 - fs * f)), t = round(v * (1.0 -
  # fs * (1.0 - f))) with fs ~ s / 255, f ~ m / 255 in float. The exact rationals never
  # tie (2 v (65025 - s m) is even, 65025 (2n + 1) odd) and the float errors never
  # cross a rounding point: the integer roundings below equal PIL on all 2**24 inputs.
  m = h * 6 % 255
  p = (2 * v * (255 - s) + 255) // 510
  q = (2 * v * (65025 - s * m) + 65025) // 130050
  u = (2 * v * (65025 - s * (255 - m)) + 65025) // 130050
  sector = (h * 6 // 255) % 6
  choices = [jnp.stack(c, -1) for c in ((v, u, p), (q, v, p), (p, v, u),
                                        (p, q, v), (u, p, v), (v, p, q))]
  out = choices[0]
  for k in range(1, 6):
    out = jnp.where((sector == k)[..., None], choices[k], out)
  return jnp.where((s == 0)[..., None], v[..., None], out)


def adjust_hue(img: Array, factor: Array) -> Array:
  """transforms.adjust_hue: RGB -> HSV, hue += int(factor * 255) mod 256, -> RGB."""
  hsv = rgb_to_hsv(img)
  h = (hsv[..., 0] + hue_shift_levels(factor)) & 255
  return hsv_to_rgb(jnp.concatenate([h[..., None], hsv[..., 1:]], -1))


# ------------------------------------------------------------------- blends --


def luma(img: Array) -> Array:
  """PIL's convert('L'): integer ITU-R 601-2 luma of int32 (..., 3) RGB."""
  return (img[..., 0] * 19595 + img[..., 1] * 38470 + img[..., 2] * 7471 + 0x8000) >> 16


def _split12(x: Array) -> Array:
  """x's top 12 significant bits (x - _split12(x) is exact and holds the rest)."""
  return jax.lax.bitcast_convert_type(
      jax.lax.bitcast_convert_type(x, jnp.int32) & jnp.int32(-4096), jnp.float32)


def blend(degenerate: Array, img: Array, alpha: Array) -> Array:
  """Image.blend(degenerate, img, alpha) on uint8 values: float32, truncated, clipped.

  C rounds alpha * d to float before adding in1; XLA:CPU's optimiser fuses
  a * b + c into one FMA (one rounding), which changes the truncation of ~0.05%
  of values. alpha * d is therefore formed from two exact partial products (an
  8-bit d times 12-bit halves of alpha), whose sum rounds once, fused or not.
  """
  alpha = jnp.asarray(alpha, jnp.float32)
  d = (img - degenerate).astype(jnp.float32)
  top = _split12(alpha)
  x = degenerate.astype(jnp.float32) + (d * top + d * (alpha - top))
  return jnp.clip(jnp.floor(x), 0, 255).astype(jnp.int32)


def adjust_brightness(img: Array, factor: Array) -> Array:
  return blend(jnp.zeros_like(img), img, factor)


def adjust_contrast(img: Array, factor: Array) -> Array:
  """Blend with int(mean(L) + 0.5), the rational floor((2 sum + n) / 2n) exactly."""
  lum = luma(img)
  n = lum.size
  mean = (2 * jnp.sum(lum) + n) // (2 * n)
  return blend(jnp.broadcast_to(mean, img.shape), img, factor)


def adjust_saturation(img: Array, factor: Array) -> Array:
  return blend(jnp.broadcast_to(luma(img)[..., None], img.shape), img, factor)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


# ----------------------------------------------------------------- geometry --


def rotation_fixed(angle: Array, height: int, width: int) -> Array:
  """PIL rotate(angle)'s 16.16 fixed-point inverse matrix (a0, a1, a2, a3, a4, a5), int32.

  Image.rotate maps output (x, y) to input (a0 x + a1 y + a2, a3 x + a4 y + a5)
  with a = (cos, sin, ., -sin, cos, .) of -angle about (w / 2, h / 2); affine_fixed
  adds half a pixel to each offset and rounds every entry to 1/65536.
  """
  theta = -jnp.asarray(angle, jnp.float32) * jnp.float32(math.pi / 180.0)
  c, s = jnp.cos(theta) * 65536.0, jnp.sin(theta) * 65536.0
  cx, cy = width / 2.0, height / 2.0
  fix = lambda v: jnp.floor(v + 0.5).astype(jnp.int32)  # noqa: E731
  # a2 = cx + c (0.5 - cx) + s (0.5 - cy): the exact integer 65536 cx kept apart.
  a2 = int(65536 * cx) + fix(c * (0.5 - cx) + s * (0.5 - cy))
  a5 = int(65536 * cy) + fix(-s * (0.5 - cx) + c * (0.5 - cy))
  return jnp.stack([fix(c), fix(s), a2, fix(-s), fix(c), a5])


def rotate_crop_flip(img: Array, angle: Array, top: Array, left: Array, flip: Array,
                     out_h: int, out_w: int) -> Array:
  """crop(rotate(img, angle)) then an optional left-right flip, as one gather (fill 0)."""
  height, width = img.shape[0], img.shape[1]
  a = rotation_fixed(angle, height, width)
  y = top + jnp.arange(out_h, dtype=jnp.int32)[:, None]
  j = jnp.arange(out_w, dtype=jnp.int32)[None, :]
  x = left + jnp.where(flip, out_w - 1 - j, j)
  xin = (a[2] + y * a[1] + x * a[0]) >> 16
  yin = (a[5] + y * a[4] + x * a[3]) >> 16
  inside = (xin >= 0) & (xin < width) & (yin >= 0) & (yin < height)
  pix = img[jnp.clip(yin, 0, height - 1), jnp.clip(xin, 0, width - 1)]
  return jnp.where(inside[..., None], pix, 0)


def crop_flip(img: Array, top: Array, left: Array, flip: Array, out_h: int, out_w: int) -> Array:
  """img[top:top + out_h, left:left + out_w], mirrored left-right where flip."""
  out = jax.lax.dynamic_slice(img, (top, left, 0), (out_h, out_w, img.shape[2]))
  return jnp.where(flip, out[:, ::-1], out)


# -------------------------------------------------------------- float stage --


@functools.lru_cache(maxsize=1)
def _normalized_levels() -> np.ndarray:
  """(256, 3) float32: transforms.to_normalized of every uint8 level, per channel."""
  levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], 3, axis=2)
  return transforms.to_normalized(levels).reshape(256, 3)


def normalize(img: Array) -> Array:
  """transforms.to_normalized (float32 ((x / 255) - mean) / std), channels-last.

  A lookup of the host's own values: XLA's compiled (x / 255 - mean) / std was
  up to 1 ulp (4.8e-7) off numpy's on this machine.
  """
  table = jnp.asarray(_normalized_levels())
  return table[img.astype(jnp.int32), jnp.arange(3)]


def erase(x: Array, on: Array, top: Array, left: Array, h: Array, w: Array) -> Array:
  """RandomErasing's write: x[top:top + h, left:left + w, :] = 0 where on."""
  rows = jnp.arange(x.shape[0])[:, None]
  cols = jnp.arange(x.shape[1])[None, :]
  box = on & (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
  return jnp.where(box[..., None], jnp.float32(0.0), x)
