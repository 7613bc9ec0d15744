"""One preprocessing module for training, evaluation and prediction.

The operations re-implement torchvision's transforms on PIL images with the
same parameter semantics (torchvision itself is not a dependency):

- ``resize``: PIL bilinear (with PIL's antialiasing), as torchvision's PIL path
  calls ``img.resize((w, h), Image.BILINEAR)``; an int is the shorter side.
- ``rotate``: nearest neighbour, no expansion, black fill (RandomRotation).
- ``random_crop`` / ``center_crop``: torchvision's offsets and rounding.
- ``hflip``: mirror left-right with probability 0.5.
- colour jitter: brightness, contrast, saturation through PIL's ImageEnhance
  and hue through PIL's uint8 'HSV' mode, applied in a random order.
- ``to_normalized``: ToTensor (x / 255) then Normalize (ImageNet mean/std),
  in float32 and channels-last.
- ``random_erase``: RandomErasing after normalisation (10 attempts, a
  log-uniform aspect ratio, value 0).

A train transform applies: resize -> rotate -> random crop -> h-flip ->
colour jitter -> normalise -> random erasing. An eval transform applies:
resize -> centre crop -> normalise. Every random draw comes from the
``np.random.Generator`` the caller passes, so the result is a pure function of
(image, generator state).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageEnhance

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
ERASE_RATIO = (0.3, 3.3)
ERASE_ATTEMPTS = 10

Size = int | Sequence[int]


# ----------------------------------------------------------------- geometry --


def resized_shape(height: int, width: int, size: Size) -> tuple[int, int]:
  """(h, w) after torchvision's Resize(size): an int sets the shorter side."""
  if isinstance(size, (int, np.integer)):
    size = (int(size),)
  size = tuple(int(s) for s in size)
  if len(size) == 2:
    return size
  if len(size) != 1 or size[0] <= 0:
    raise ValueError(f"resize size must be a positive int or (h, w), got {size}")
  short, long = (width, height) if width <= height else (height, width)
  new_short, new_long = size[0], int(size[0] * long / short)
  return (new_long, new_short) if width <= height else (new_short, new_long)


def resize(img: Image.Image, size: Size) -> Image.Image:
  """torchvision Resize on a PIL image (bilinear, PIL antialiasing)."""
  h, w = resized_shape(img.height, img.width, size)
  if (h, w) == (img.height, img.width):
    return img
  return img.resize((w, h), Image.BILINEAR)


def rotate(img: Image.Image, angle: float) -> Image.Image:
  """RandomRotation's rotate: counter-clockwise degrees, nearest, no expand, fill 0."""
  fill = (0,) * len(img.getbands())
  return img.rotate(angle, resample=Image.NEAREST, expand=False, center=None,
                    fillcolor=fill if len(fill) > 1 else 0)


def crop(img: Image.Image, top: int, left: int, height: int, width: int) -> Image.Image:
  return img.crop((left, top, left + width, top + height))


def center_crop_offsets(height: int, width: int, crop_h: int, crop_w: int) -> tuple[int, int]:
  """(top, left) of torchvision's CenterCrop (Python round, i.e. half to even)."""
  return int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))


def center_crop(img: Image.Image, size: Size) -> Image.Image:
  """torchvision CenterCrop, including its zero padding of images smaller than the crop."""
  th, tw = (int(size), int(size)) if isinstance(size, (int, np.integer)) else map(int, size)
  if th > img.height or tw > img.width:
    pad_l = (tw - img.width) // 2 if tw > img.width else 0
    pad_t = (th - img.height) // 2 if th > img.height else 0
    pad_r = (tw - img.width + 1) // 2 if tw > img.width else 0
    pad_b = (th - img.height + 1) // 2 if th > img.height else 0
    padded = Image.new(img.mode, (img.width + pad_l + pad_r, img.height + pad_t + pad_b))
    padded.paste(img, (pad_l, pad_t))
    img = padded
    if (th, tw) == (img.height, img.width):
      return img
  top, left = center_crop_offsets(img.height, img.width, th, tw)
  return crop(img, top, left, th, tw)


def random_crop_offsets(rng: np.random.Generator, height: int, width: int,
                        crop_h: int, crop_w: int) -> tuple[int, int]:
  """RandomCrop's (top, left), uniform over all valid positions."""
  if height < crop_h or width < crop_w:
    raise ValueError(f"random crop {(crop_h, crop_w)} is larger than the image {(height, width)}")
  if (height, width) == (crop_h, crop_w):
    return 0, 0
  return int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))


def hflip(img: Image.Image) -> Image.Image:
  return img.transpose(Image.FLIP_LEFT_RIGHT)


# ------------------------------------------------------------------- colour --


def adjust_brightness(img: Image.Image, factor: float) -> Image.Image:
  return ImageEnhance.Brightness(img).enhance(factor)


def adjust_contrast(img: Image.Image, factor: float) -> Image.Image:
  """Blend with the mean of the grayscale image (PIL ImageEnhance.Contrast)."""
  return ImageEnhance.Contrast(img).enhance(factor)


def adjust_saturation(img: Image.Image, factor: float) -> Image.Image:
  return ImageEnhance.Color(img).enhance(factor)


def adjust_hue(img: Image.Image, factor: float) -> Image.Image:
  """Shift hue by factor (in [-0.5, 0.5] turns) in PIL's uint8 HSV space.

  As torchvision: the shift is int(factor * 255) wrapped modulo 256 (the uint8
  overflow torchvision relies on), and the round trip through HSV is lossy
  even at factor 0 (ColorJitter skips the op when hue is 0).
  """
  if not -0.5 <= factor <= 0.5:
    raise ValueError(f"hue factor {factor} is not in [-0.5, 0.5]")
  if img.mode in ("L", "1", "I", "F"):
    return img
  h, s, v = img.convert("HSV").split()
  shift = np.uint8(int(factor * 255) % 256)
  np_h = np.array(h, dtype=np.uint8)
  np_h += shift  # uint8 arithmetic wraps around the hue circle
  h = Image.fromarray(np_h, "L")
  return Image.merge("HSV", (h, s, v)).convert(img.mode)


def _jitter_range(value: float, name: str, center: float, lo: float, hi: float,
                  clip_zero: bool) -> tuple[float, float] | None:
  """ColorJitter's parameter check: value -> [center - value, center + value]."""
  value = float(value)
  if value < 0:
    raise ValueError(f"colour jitter {name} must be >= 0, got {value}")
  r = (center - value, center + value)
  if clip_zero:
    r = (max(r[0], 0.0), r[1])
  if not lo <= r[0] <= r[1] <= hi:
    raise ValueError(f"colour jitter {name} range {r} is outside [{lo}, {hi}]")
  return None if r[0] == r[1] == center else r


@dataclasses.dataclass(frozen=True)
class ColorJitter:
  """torchvision ColorJitter: four random factors, ops in a random permutation."""

  brightness: tuple[float, float] | None
  contrast: tuple[float, float] | None
  saturation: tuple[float, float] | None
  hue: tuple[float, float] | None

  @classmethod
  def from_values(cls, b: float = 0.0, c: float = 0.0, s: float = 0.0,
                  h: float = 0.0) -> "ColorJitter":
    inf = float("inf")
    return cls(_jitter_range(b, "brightness", 1.0, 0.0, inf, True),
               _jitter_range(c, "contrast", 1.0, 0.0, inf, True),
               _jitter_range(s, "saturation", 1.0, 0.0, inf, True),
               _jitter_range(h, "hue", 0.0, -0.5, 0.5, False))

  @property
  def active(self) -> bool:
    return any(r is not None for r in (self.brightness, self.contrast, self.saturation, self.hue))

  def params(self, rng: np.random.Generator) -> tuple[np.ndarray, list[float | None]]:
    """(order of the four ops, factor per op or None where the op is off)."""
    order = rng.permutation(4)
    factors = [None if r is None else float(rng.uniform(r[0], r[1]))
               for r in (self.brightness, self.contrast, self.saturation, self.hue)]
    return order, factors

  def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
    order, factors = self.params(rng)
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    for k in order:
      if factors[k] is not None:
        img = ops[k](img, factors[k])
    return img


# ------------------------------------------------------------- float stage --


@functools.lru_cache(maxsize=16)
def _row_constants(width: int) -> tuple[np.ndarray, np.ndarray]:
  return np.tile(IMAGENET_MEAN, width), np.tile(IMAGENET_STD, width)


def to_normalized(image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
  """ToTensor + Normalize in float32, channels-last: ((x / 255) - mean) / std.

  The same float32 operations as torchvision, on (H, W*3) rows: broadcasting
  over a last axis of 3 is several times slower in numpy.
  """
  h, w, c = image.shape
  if out is None:
    out = np.empty((h, w, c), dtype=np.float32)
  elif out.shape != (h, w, c) or out.dtype != np.float32 or not out.flags.c_contiguous:
    raise ValueError(f"out must be a C-contiguous float32 array of shape {(h, w, c)}, got "
                     f"{out.dtype} {out.shape}")
  mean, std = _row_constants(w)
  rows_in = np.ascontiguousarray(image).reshape(h, w * c)
  rows = out.reshape(h, w * c)  # a view: out must be C-contiguous
  np.divide(rows_in, np.float32(255.0), out=rows, dtype=np.float32)
  rows -= mean
  rows /= std
  return out


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"image must be uint8, got {image.dtype}")
  if image.ndim == 2:
    image = np.repeat(image[:, :, None], 3, axis=2)
  elif image.ndim == 3 and image.shape[2] == 1:
    image = np.repeat(image, 3, axis=2)
  if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
    raise ValueError(f"image must be (H, W, 3) RGB, got shape {image.shape}")
  return image


def normalize(image: np.ndarray) -> np.ndarray:
  """uint8 (H, W, 3) RGB (or grayscale) -> float32 normalised (H, W, 3), no resizing."""
  return to_normalized(_as_rgb_uint8(image))


def erase_params(rng: np.random.Generator, height: int, width: int,
                 scale: Sequence[float], ratio: Sequence[float] = ERASE_RATIO
                 ) -> tuple[int, int, int, int] | None:
  """RandomErasing.get_params: (top, left, h, w) of the box, None if 10 attempts fail."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(ERASE_ATTEMPTS):
    erase_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    h = int(round(math.sqrt(erase_area * aspect)))
    w = int(round(math.sqrt(erase_area / aspect)))
    if not (h < height and w < width):
      continue
    top = int(rng.integers(0, height - h + 1))
    left = int(rng.integers(0, width - w + 1))
    return top, left, h, w
  return None


def random_erase(x: np.ndarray, rng: np.random.Generator, p: float,
                 scale: Sequence[float], ratio: Sequence[float] = ERASE_RATIO,
                 value: float = 0.0) -> np.ndarray:
  """RandomErasing on a normalised (H, W, C) array, in place; returns x."""
  if rng.random() < p:
    box = erase_params(rng, x.shape[0], x.shape[1], scale, ratio)
    if box is not None:
      top, left, h, w = box
      x[top:top + h, left:left + w, :] = value
  return x


# ------------------------------------------------------------------ recipes --


@dataclasses.dataclass(frozen=True)
class Augment:
  """The augmentation fields of config.data.augment (see module docstring).

  resize: 0 = resize straight to (img_size, img_size); r > 0 = resize to (r, r)
    (the released QCS scripts resize to a square), or to shorter side r when
    keep_aspect; an explicit (h, w) is also accepted.
  rotate: maximum rotation in degrees (0 = off). crop: random crop of img_size
    at train time, centre crop at test time (after resize). hflip: p = 0.5.
  jitter: (brightness, contrast, saturation, hue) or () for none.
  erase_scale: RandomErasing scale range or () for none; erase_p its probability.
  """

  resize: int | tuple[int, int] = 0
  keep_aspect: bool = False
  rotate: float = 0.0
  crop: bool = False
  hflip: bool = False
  jitter: tuple[float, ...] = ()
  erase_scale: tuple[float, ...] = ()
  erase_p: float = 0.5

  @classmethod
  def from_cfg(cls, cfg: Mapping[str, Any] | Any | None) -> "Augment":
    if cfg is None:
      return cls()
    if not isinstance(cfg, Mapping):
      cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - names)
    if unknown:
      raise ValueError(f"unknown augment field(s) {unknown}; known: {sorted(names)}")
    kw = dict(cfg)
    for key in ("jitter", "erase_scale"):
      if key in kw:
        kw[key] = tuple(float(v) for v in (kw[key] or ()))
    if isinstance(kw.get("resize"), (list, tuple)):
      kw["resize"] = tuple(int(v) for v in kw["resize"])
    return cls(**kw)


_JITTER = (0.2, 0.2, 0.2, 0.1)


def recipe_augment(name: str, img_size: int = 224) -> dict[str, Any]:
  """The augment dict of a released training script (sizes scaled to img_size).

  The transforms differ per script, not only per data set (docs/DATA_AND_TRAINING.md,
  tests/fixtures/released_recipes.json): 'rafdb' = both RAF-DB scripts, 'ferplus'
  = main_QCS_ferplus.py (resize 232), 'ferplus_dcs' = main_DCS_ferplus.py (resize
  234), 'affectnet' = both AffectNet-7 scripts and main_QCS_affectnet-8.py,
  'affectnet8_dcs' = main_DCS_affectnet-8.py (resize 224, h-flip and erasing
  only). Resize sizes are given for 224 and scaled by img_size / 224.
  """
  def px(n: int) -> int:
    return int(round(n * img_size / 224))

  def square_crop(resize: int, rotate: float, erase_lo: float) -> dict[str, Any]:
    return dict(resize=px(resize), rotate=rotate, crop=True, hflip=True, jitter=_JITTER,
                erase_scale=(erase_lo, 0.1), erase_p=0.5)

  recipes = {
      "rafdb": dict(resize=0, rotate=0.0, crop=False, hflip=True, jitter=_JITTER,
                    erase_scale=(0.02, 0.1), erase_p=0.5),
      "ferplus": square_crop(232, 10.0, 0.02),
      "ferplus_dcs": square_crop(234, 10.0, 0.02),
      "affectnet": square_crop(236, 12.0, 0.03),
      "affectnet8_dcs": dict(resize=0, rotate=0.0, crop=False, hflip=True, jitter=(),
                             erase_scale=(0.02, 0.1), erase_p=0.5),
      "synthetic": dict(resize=0, rotate=0.0, crop=False, hflip=True,
                        jitter=(0.1, 0.1, 0.1, 0.0), erase_scale=(0.02, 0.06), erase_p=0.5),
  }
  aliases = {"affectnet7": "affectnet", "affectnet8": "affectnet"}
  key = aliases.get(name, name)
  if key not in recipes:
    raise ValueError(f"unknown augmentation recipe {name!r}; known: {sorted(recipes)}")
  return dict(recipes[key])


class Transform:
  """(uint8 HWC image, rng) -> float32 (img_size, img_size, 3) normalised."""

  def __init__(self, augment: Augment, img_size: int, train: bool):
    self.augment = augment
    self.img_size = int(img_size)
    self.train = bool(train)
    a = augment
    if a.resize == 0 or a.resize == (0, 0):
      self._resize: Size = (self.img_size, self.img_size)
    elif isinstance(a.resize, tuple):
      self._resize = a.resize
    else:
      self._resize = int(a.resize) if a.keep_aspect else (int(a.resize), int(a.resize))
    if a.keep_aspect and not a.crop:
      raise ValueError("augment.keep_aspect needs crop=True to produce a square image")
    if not a.crop and self._resize != (self.img_size, self.img_size):
      raise ValueError(f"augment.resize={a.resize} without crop gives {self._resize}, "
                       f"not img_size {self.img_size}: set crop=True or resize=0")
    smallest = min(np.atleast_1d(self._resize))
    if a.crop and smallest < self.img_size:
      raise ValueError(f"augment.resize={a.resize} is smaller than the {self.img_size} crop")
    if len(a.jitter) not in (0, 4):
      raise ValueError(f"augment.jitter must be (b, c, s, h) or (), got {a.jitter}")
    if len(a.erase_scale) not in (0, 2) or (a.erase_scale and not
                                            0 <= a.erase_scale[0] <= a.erase_scale[1] <= 1):
      raise ValueError(f"augment.erase_scale must be (lo, hi) in [0, 1] or (), got {a.erase_scale}")
    if not 0 <= a.erase_p <= 1:
      raise ValueError(f"augment.erase_p must be in [0, 1], got {a.erase_p}")
    self._jitter = ColorJitter.from_values(*a.jitter) if a.jitter else None

  def __repr__(self) -> str:
    return f"Transform({self.augment}, img_size={self.img_size}, train={self.train})"

  @property
  def resize_size(self) -> Size:
    """The Resize this transform starts with: (h, w), or the shorter side (keep_aspect)."""
    return self._resize

  def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None,
               out: np.ndarray | None = None) -> np.ndarray:
    """Transforms one image; writes into out (float32 (S, S, 3)) when given."""
    img = Image.fromarray(_as_rgb_uint8(image), "RGB")
    img = resize(img, self._resize)
    a, s = self.augment, self.img_size
    if self.train:
      if rng is None:
        raise ValueError("a train transform needs an np.random.Generator")
      if a.rotate:
        img = rotate(img, float(rng.uniform(-a.rotate, a.rotate)))
      if a.crop:
        top, left = random_crop_offsets(rng, img.height, img.width, s, s)
        img = crop(img, top, left, s, s)
      if a.hflip and rng.random() < 0.5:
        img = hflip(img)
      if self._jitter is not None and self._jitter.active:
        img = self._jitter(img, rng)
    elif a.crop:
      img = center_crop(img, s)
    if img.size != (s, s):
      raise ValueError(f"transform produced {img.size[::-1]}, expected {(s, s)}")
    x = to_normalized(np.asarray(img), out)
    if self.train and a.erase_scale:
      random_erase(x, rng, a.erase_p, a.erase_scale)
    return x


def build_transform(augment_cfg: Mapping[str, Any] | Any | None, img_size: int,
                    train: bool) -> Transform:
  """The train (random) or eval (deterministic) transform of an augment config."""
  return Transform(Augment.from_cfg(augment_cfg), img_size, train)
