"""Rendering of the synthetic faces: drawing parameters (``sample_factors``) -> uint8 RGB.

Vectorised numpy over batches with anti-aliased signed distances; small features
(eyes, brows, glasses, mouth, nose) are drawn on per-image patches gathered from
the batch. Split from synthetic.py, which decides *what* to draw.
"""
from __future__ import annotations

import concurrent.futures
import math
import os
from typing import Sequence

import numpy as np

NUM_CLASSES = 7  # the 7-bin code of a nuisance's driving variable (synthetic.NUM_CLASSES)

_SKIN = np.array([(1.00, 0.87, 0.77), (0.96, 0.78, 0.64), (0.86, 0.65, 0.48),
                  (0.68, 0.47, 0.33), (0.47, 0.31, 0.21), (0.32, 0.21, 0.15)], np.float32)
_HAIR = np.array([(0.08, 0.07, 0.07), (0.32, 0.19, 0.10), (0.86, 0.72, 0.42),
                  (0.62, 0.26, 0.10), (0.66, 0.66, 0.68)], np.float32)
_IRIS = np.array([(0.35, 0.20, 0.10), (0.25, 0.45, 0.75), (0.30, 0.55, 0.30),
                  (0.15, 0.10, 0.08)], np.float32)
NUM_IRIS = len(_IRIS)
_BATCH = 32  # fixed render batch: pixel noise is keyed by batch number, so keep it constant


def confound_code(u: np.ndarray) -> np.ndarray:
  """The class a nuisance's driving variable points to (equals the label where confounded)."""
  return np.minimum((np.asarray(u) * NUM_CLASSES).astype(np.int64), NUM_CLASSES - 1)


def _hsv_to_rgb(h, s, v) -> np.ndarray:
  """Vectorised HSV -> RGB, all in [0, 1]; returns (..., 3)."""
  h = np.asarray(h, np.float32) % 1.0
  i = np.floor(h * 6).astype(np.int64) % 6
  f = h * 6 - np.floor(h * 6)
  p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
  table = np.stack([np.stack(c, -1) for c in
                    [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]], 0)
  return np.take_along_axis(table, i[None, ..., None], 0)[0].astype(np.float32)


def _palette(colours: np.ndarray, u: np.ndarray) -> np.ndarray:
  """Linear interpolation along a palette, u in [0, 1]."""
  x = np.clip(u, 0, 1) * (len(colours) - 1)
  i = np.minimum(x.astype(np.int64), len(colours) - 2)
  w = (x - i)[:, None].astype(np.float32)
  return colours[i] * (1 - w) + colours[i + 1] * w


def _aa(d, k):
  """Anti-aliased coverage of d < 0 (d in face units, k pixels per unit); overwrites d."""
  d *= -k
  d += 0.5
  return np.clip(d, 0.0, 1.0, out=d)


def _ellipse(x, y, a, b):
  """Approximate signed distance to an axis-aligned ellipse (good near its edge, even if thin)."""
  ia, ib = 1.0 / a, 1.0 / b
  xa, yb = x * ia, y * ib
  g = xa * xa + yb * yb - 1.0
  xa *= ia
  yb *= ib
  grad = np.sqrt(xa * xa + yb * yb)
  grad *= 2.0
  grad += 1e-6
  g /= grad
  return g


def _round(x, y, a, b):
  """Cheaper signed distance for roundish ellipses (exact along the shorter axis)."""
  xa = x * (1.0 / a)
  xa *= xa
  yb = y * (1.0 / b)
  yb *= yb
  xa += yb
  np.sqrt(xa, out=xa)
  xa -= 1.0
  xa *= np.minimum(a, b)
  return xa


def _capsule(x, y, ax, ay, bx, by, th, arch=0.0):
  """Distance to a thick segment A-B (optionally bowed upwards by ``arch`` mid-way)."""
  dx, dy = bx - ax, by - ay
  inv = 1.0 / (dx * dx + dy * dy + 1e-9)
  px, py = x - ax, y - ay
  t = px * (dx * inv) + py * (dy * inv)
  np.clip(t, 0.0, 1.0, out=t)
  px -= t * dx
  py -= t * dy
  if np.any(arch):
    py += (arch * 4.0) * t * (1.0 - t)
  px *= px
  py *= py
  px += py
  np.sqrt(px, out=px)
  px -= th
  return px


def _blend(img, alpha, colour):
  """Alpha-composites a colour (3,B,1,1 or 3,B,H,W) over a planar img (3,B,H,W) in place."""
  tmp = colour - img
  tmp *= alpha
  img += tmp


def _rgb(c) -> np.ndarray:
  """A constant colour as (3, 1, 1, 1) for planar images."""
  return np.asarray(c, np.float32).reshape(3, 1, 1, 1)


def _planar(c: np.ndarray) -> np.ndarray:
  """Per-image colours (B, 3) as (3, B, 1, 1)."""
  return np.ascontiguousarray(np.asarray(c, np.float32).T)[:, :, None, None]


class _Batch:
  """Per-batch geometry: face frames, and the pixel windows and patches that features need."""

  def __init__(self, f: dict[str, np.ndarray], size: int):
    self.s = size
    col = lambda k: np.asarray(f[k], np.float32)[:, None, None]
    self.p = {k: col(k) for k in f if np.ndim(f[k]) == 1}
    self.cos, self.sin = np.cos(self.p["angle"]), np.sin(self.p["angle"])
    self.k = self.p["radius"] * size  # pixels per face unit
    self.inv_rs = 1.0 / self.k       # face units per pixel

  def frame(self, xs, ys, sel=slice(None)):
    """Face coordinates (u right, v down, face radius 1) of pixel indices xs (B,1,W), ys (B,H,1)."""
    p = self.p
    dx = xs + 0.5 - p["cx"][sel] * self.s
    dy = ys + 0.5 - p["cy"][sel] * self.s
    ci, si = self.cos[sel] * self.inv_rs[sel], self.sin[sel] * self.inv_rs[sel]
    u = ci * dx + si * dy
    v = ci * dy - si * dx
    return u, v

  def _corners(self, u0, u1, v0, v1, sel):
    p, c, s = self.p, self.cos[sel, 0, 0], self.sin[sel, 0, 0]
    cu = np.array([u0, u1, u0, u1], np.float32)[None]
    cv = np.array([v0, v0, v1, v1], np.float32)[None]
    r = p["radius"][sel, 0, 0, None]
    x = (p["cx"][sel, 0, 0, None] + r * (c[:, None] * cu - s[:, None] * cv)) * self.s
    y = (p["cy"][sel, 0, 0, None] + r * (s[:, None] * cu + c[:, None] * cv)) * self.s
    return x, y

  def window(self, u0, u1, v0, v1, sel=slice(None)):
    """Row and column slices covering the face-frame box [u0,u1]x[v0,v1] in every image."""
    x, y = self._corners(u0, u1, v0, v1, sel)
    clip = lambda a: int(min(max(a, 0), self.s))
    ys = slice(clip(math.floor(y.min()) - 1), clip(math.ceil(y.max()) + 1))
    xs = slice(clip(math.floor(x.min()) - 1), clip(math.ceil(x.max()) + 1))
    return ys, xs

  def patch(self, u0, u1, v0, v1):
    """Per-image pixel rows (B,PH) and cols (B,PW) of a rectangle covering a face-frame box."""
    x, y = self._corners(u0, u1, v0, v1, slice(None))
    ph = min(self.s, int(math.ceil((y.max(1) - y.min(1)).max())) + 3)
    pw = min(self.s, int(math.ceil((x.max(1) - x.min(1)).max())) + 3)
    y0 = np.clip(np.floor(y.min(1)).astype(np.int64) - 1, 0, self.s - ph)
    x0 = np.clip(np.floor(x.min(1)).astype(np.int64) - 1, 0, self.s - pw)
    return y0[:, None] + np.arange(ph), x0[:, None] + np.arange(pw)


def _gather(img, rows, cols):
  """Patches (3,B,PH,PW) of a planar image and their flat indices, to write them back."""
  b, s = img.shape[1], img.shape[2]
  flat = ((np.arange(b)[:, None, None] * s + rows[:, :, None]) * s + cols[:, None, :])
  return flat, np.take(img.reshape(3, -1), flat, axis=1)


def _draw_background(bt: _Batch, f) -> np.ndarray:
  """Solid, linear gradient, stripes or texture, from separable terms (cheap per pixel)."""
  p, s = bt.p, bt.s
  base = _planar(_hsv_to_rgb(f["background_u"], f["bg_sat"], f["bg_val"]))
  g = (np.arange(s, dtype=np.float32) + 0.5) / s - 0.5
  xs, ys = g[None, None, :], g[None, :, None]
  ca, sa = np.cos(p["bg_angle"]), np.sin(p["bg_angle"])
  kind = p["bg_kind"]
  w = p["bg_freq"] * np.float32(2 * np.pi)
  grad, stripe, tex = ((kind == c) * np.float32(a) for c, a in ((1, 0.6), (2, 0.12), (3, 0.1)))
  # sin(w (x ca + y sa) + phase) = sin(a) cos(b) + cos(a) sin(b): (B,1,S) x (B,S,1) products
  ax, by = w * ca * xs, w * sa * ys + p["bg_phase"]
  m = (1.0 + grad * ca * xs) + grad * sa * ys
  m += (stripe * np.sin(ax)) * np.cos(by)
  m += (stripe * np.cos(ax)) * np.sin(by)
  m += (tex * np.sin(3.1 * w * xs + p["bg_phase"])) * np.sin(2.3 * w * ys)
  m += (tex * np.cos(1.3 * w * xs)) * np.cos(1.7 * w * ys + p["bg_phase"])
  img = base * m
  assert img.dtype == np.float32, img.dtype
  return img


def _draw_head(img, bt: _Batch, f, skin, hair):
  """Long hair at the back, neck, shoulders, face with ears, hair on top (on image windows)."""
  p, s = bt.p, bt.s
  ar = np.arange(s, dtype=np.float32)
  u, v = bt.frame(ar[None, None, :], ar[None, :, None])
  style = p["hair_style"][:, 0, 0]
  fa = p["face_a"]

  def region(box, sel=slice(None)):
    ys, xs = bt.window(*box, sel=sel)
    if isinstance(sel, slice):
      return img[:, :, ys, xs], u[:, ys, xs], v[:, ys, xs], (ys, xs)
    return img[:, sel, ys, xs], u[sel, ys, xs], v[sel, ys, xs], (ys, xs)

  long = np.flatnonzero(style == 1)
  if long.size:
    sub, uu, vv, (ys, xs) = region((-1.0, 1.0, -1.17, float(p["hair_len"].max())), long)
    d = np.maximum(np.abs(uu) - 0.98, np.maximum(vv - p["hair_len"][long], -vv))
    d = np.minimum(_round(uu, vv + 0.05, 1.0, 1.12), d)
    _blend(sub, _aa(d, bt.k[long]), hair[:, long] * 0.85)
    img[:, long, ys, xs] = sub
  view, uu, vv, _ = region((-0.3, 0.3, 0.3, 1.6))
  d = np.maximum(np.abs(uu) - 0.3, np.maximum(0.3 - vv, vv - 1.6))
  _blend(view, _aa(d, bt.k), skin * 0.78)
  clothes = _planar(_hsv_to_rgb(f["clothes_h"], np.full_like(f["clothes_h"], 0.5), f["clothes_v"]))
  view, uu, vv, _ = region((-1.9, 1.9, 1.27, 2.97))
  _blend(view, _aa(_round(uu, vv - 2.12, 1.9, 0.85), bt.k), clothes)
  # face (narrower jaw) and ears as one shape, shaded darker towards its rim
  view, uu, vv, _ = region((-0.97, 0.97, -1.0, 1.0))
  ue = uu * (1.0 + 0.2 * np.maximum(vv, 0.0))
  d = np.minimum(_round(ue, vv, fa, 1.0), _round(np.abs(uu) - 0.975 * fa, vv - 0.05, 0.13, 0.2))
  ue *= 1.0 / fa
  ue *= ue
  ue += vv * vv
  ue *= ue
  shade = np.clip(1.0 - 0.2 * ue, 0.7, 1.0)
  _blend(view, _aa(d, bt.k), skin * shade)
  bun = style == 2
  top = -1.45 if bun.any() else -1.17
  view, uu, vv, _ = region((-0.97, 0.97, top, 0.0))
  d = np.maximum(_round(uu, vv + 0.06, fa + 0.1, 1.1),
                 vv - p["hairline"] - 0.45 * (uu * (1.0 / fa)) ** 2)
  if bun.any():
    d_bun = np.sqrt(uu * uu + (vv + 1.1) ** 2) - 0.32 + np.float32(10.0) * (~bun)[:, None, None]
    d = np.minimum(d, d_bun)
  _blend(view, _aa(d, bt.k), hair)


def _draw_eye_side(img, bt: _Batch, side: float, skin, hair, iris):
  """Eye, brow and glasses of one side, on a patch (side -1 = image left, +1 = right)."""
  p, k = bt.p, bt.k
  u0, u1 = (-0.86, 0.02) if side < 0 else (-0.02, 0.86)
  rows, cols = bt.patch(u0, u1, -0.72, 0.12)
  flat, pim = _gather(img, rows, cols)
  u, v = bt.frame(cols[:, None, :].astype(np.float32), rows[:, :, None].astype(np.float32))
  eu = u * side if side > 0 else -u
  mine = (eu > 0).astype(np.float32)  # each patch draws its own half only: no double blending
  ey = -0.08
  dark = _rgb([0.12, 0.08, 0.07])
  # eye white, iris, pupil, catch-light, lid line
  eh = np.maximum(0.09 * p["eye_o"], 0.004)
  d_eye = _ellipse(eu - 0.33, v - ey, 0.15, eh)
  a_eye = _aa(d_eye.copy(), k)
  a_eye *= mine
  _blend(pim, a_eye, _rgb([0.96, 0.96, 0.93]))
  iu, iv = eu - (0.33 + side * p["gaze_x"]), v - (ey + p["gaze_y"])
  ri = np.sqrt(iu * iu + iv * iv)
  _blend(pim, _aa(ri - 0.072, k) * a_eye, iris)
  _blend(pim, _aa(ri - 0.032, k) * a_eye, dark)
  iu += 0.02
  iv += 0.022
  _blend(pim, _aa(np.sqrt(iu * iu + iv * iv) - 0.016, k) * a_eye, _rgb([1.0, 1.0, 1.0]))
  lw = np.maximum(0.014, 0.55 / k)
  np.abs(d_eye, out=d_eye)
  d_eye -= lw * np.where(v < ey, 1.8, 1.0)
  _blend(pim, _aa(d_eye, k) * mine, dark)
  # brow: inner end at eu=0.15, outer at 0.52; brow_a > 0 lifts the inner end
  by = -0.34 - 0.11 * p["brow_h"]
  tilt = 0.075 * p["brow_a"]
  d_brow = _capsule(eu, v, 0.15, by - tilt, 0.52, by + tilt + 0.02, p["brow_th"], p["brow_arch"])
  _blend(pim, _aa(d_brow, k) * mine, np.minimum(hair * 0.6 + 0.04, skin * 0.5))  # darker than skin
  # glasses (only on the images that wear them): lens tint, rim, bridge, arm
  g = np.flatnonzero(p["glasses"][:, 0, 0] > 0)
  if g.size:
    kg, eg, vg, mg = k[g], eu[g], v[g], mine[g]
    sub = pim[:, g]
    d_lens = _ellipse(eg - 0.33, vg - ey, 0.2, 0.16)
    _blend(sub, _aa(d_lens.copy(), kg) * (mg * 0.15), _rgb([0.7, 0.85, 1.0]))
    np.abs(d_lens, out=d_lens)
    d_lens -= 0.022
    d_rim = np.minimum(d_lens, _capsule(eg, vg, -0.01, ey - 0.05, 0.135, ey - 0.06, 0.018))
    d_rim = np.minimum(d_rim, _capsule(eg, vg, 0.52, ey - 0.03, 0.82, ey - 0.05, 0.018))
    _blend(sub, _aa(d_rim, kg) * mg, p["frame_v"][g] * _rgb([1.0, 0.9, 0.8]))
    pim[:, g] = sub
  img.reshape(3, -1)[:, flat] = pim


def _draw_mouth_nose(img, bt: _Batch, skin):
  """Nose, wrinkles and mouth on a patch."""
  p, k = bt.p, bt.k
  rows, cols = bt.patch(-0.39, 0.39, -0.05, 0.88)
  flat, pim = _gather(img, rows, cols)
  u, v = bt.frame(cols[:, None, :].astype(np.float32), rows[:, :, None].astype(np.float32))
  au = np.abs(u)
  # nose: ridge, base, and disgust/anger wrinkles
  _blend(pim, _aa(_capsule(u, v, 0.0, -0.02, 0.03, 0.24, 0.02), k) * 0.3, skin * 0.6)
  _blend(pim, _aa(_capsule(au, v, 0.0, 0.275, 0.075, 0.26, 0.02), k) * 0.55, skin * 0.55)
  w = np.flatnonzero(p["wrinkle"][:, 0, 0] > 0.02)
  if w.size:
    aw, vw = au[w], v[w]
    d_wr = np.minimum(_capsule(aw, vw, 0.05, -0.03, 0.13, 0.04, 0.012),
                      _capsule(aw, vw, 0.06, 0.03, 0.13, 0.09, 0.012))
    sub = pim[:, w]
    _blend(sub, _aa(d_wr, k[w]) * (0.65 * p["wrinkle"][w]), skin[:, w] * 0.55)
    pim[:, w] = sub
  # mouth: centre line y(u), opening between y_up and y_lo
  mw = 0.16 + 0.16 * p["mouth_w"]
  x = u * (1.0 / mw)
  x2 = x * x
  yline = p["mouth_y"] - 0.11 * p["mouth_c"] * (x2 - 0.3) - 0.07 * p["mouth_s"] * x
  g = (0.19 * p["mouth_o"]) * np.sqrt(np.clip(1.0 - x2, 0.0, 1.0))
  y_up, y_lo = yline - 0.45 * g, yline + g
  d_open = np.maximum(np.maximum(y_up - v, v - y_lo), au - mw)
  lips = skin * 0.5 + _rgb([0.42, 0.12, 0.12])
  lipw = np.maximum(0.028, 0.6 / k)
  _blend(pim, _aa(d_open - lipw, k), lips)
  a_in = _aa(d_open, k)
  _blend(pim, a_in, _rgb([0.28, 0.05, 0.06]))
  # teeth show in stretched open mouths (smile, fear), not in a round surprised O
  teeth = np.minimum(0.05, 0.4 * (y_lo - y_up)) * np.clip((p["mouth_w"] - 0.6) * 3.0, 0.0, 1.0)
  _blend(pim, a_in * _aa(v - y_up - teeth, k), _rgb([0.96, 0.95, 0.9]))
  img.reshape(3, -1)[:, flat] = pim


def _render_batch(f: dict[str, np.ndarray], s: int, noise_seed: Sequence[int]) -> np.ndarray:
  """One batch of faces as uint8 (B, S, S, 3)."""
  bt = _Batch(f, s)
  skin, hair, iris = _planar(f["skin_rgb"]), _planar(f["hair_rgb"]), _planar(f["iris_rgb"])
  img = _draw_background(bt, f)
  _draw_head(img, bt, f, skin, hair)
  for side in (-1.0, 1.0):
    _draw_eye_side(img, bt, side, skin, hair, iris)
  _draw_mouth_nose(img, bt, skin)
  p = bt.p
  g = (np.arange(s, dtype=np.float32) + 0.5) / s - 0.5
  amp = p["gain"] * p["light_amp"] * 255.0
  light = (p["gain"] * 255.0 + amp * np.cos(p["light_dir"]) * g[None, None, :]) \
      + amp * np.sin(p["light_dir"]) * g[None, :, None]
  img *= light
  rng = np.random.default_rng(list(noise_seed))
  noise = rng.standard_normal(img.shape[1:], dtype=np.float32)
  noise *= p["noise_sd"] * 255.0
  noise += 0.5
  img += noise
  np.clip(img, 0.0, 255.0, out=img)
  return img.transpose(1, 2, 3, 0).astype(np.uint8)


def render_faces(factors: dict[str, np.ndarray], image_size: int, noise_seed: Sequence[int],
                 batch: int = _BATCH, threads: int | None = None) -> np.ndarray:
  """Draws the faces described by ``factors`` as uint8 (N, S, S, 3) RGB.

  Batches are independent (pixel noise is keyed by ``noise_seed`` and the batch number), so
  they render on a few threads: numpy releases the GIL inside its loops.
  """
  n = len(factors["cx"])
  s = int(image_size)
  out = np.empty((n, s, s, 3), np.uint8)
  hair_k = confound_code(factors["hair_u"])
  extra = {
      "hair_style": (hair_k % 3).astype(np.float64),
      "glasses": factors["glasses"].astype(np.float64),
      "skin_rgb": _palette(_SKIN, factors["skin_u"]),
      "hair_rgb": _HAIR[hair_k % len(_HAIR)],
      "iris_rgb": _IRIS[factors["iris"]],
  }
  starts = list(range(0, n, batch))

  def work(bi: int) -> None:
    sl = slice(starts[bi], min(n, starts[bi] + batch))
    f = {key: val[sl] for key, val in factors.items()}
    f.update({key: val[sl] for key, val in extra.items()})
    out[sl] = _render_batch(f, s, (*noise_seed, bi))

  threads = min(4, os.cpu_count() or 1) if threads is None else threads
  if threads <= 1 or len(starts) == 1:
    for bi in range(len(starts)):
      work(bi)
  else:
    with concurrent.futures.ThreadPoolExecutor(threads) as ex:
      list(ex.map(work, range(len(starts))))
  return out
