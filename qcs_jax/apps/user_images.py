"""Any image a user hands the Recognizer -> uint8 (H, W, 3) RGB, or a clear refusal.

Accepted: a path (str / os.PathLike), a PIL image, or a numpy array.
- Files and PIL images are turned upright by their EXIF orientation (phone
  photos store the pixels sideways plus an orientation tag).
- 16-bit greyscale files ('I;16', 'I') are scaled 65535 -> 255 (PIL's own
  convert('RGB') would clip them to white); palette, CMYK, LA, RGBA: converted.
- Arrays: (H, W) and (H, W, 1) greyscale, (H, W, 3) RGB, (H, W, 4) RGBA (alpha
  dropped); `bgr=True` reads the channels as OpenCV's BGR / BGRA. dtypes: uint8;
  uint16 (scaled by 255/65535); other integers whose values lie in 0..255;
  floats in [0, 1] (scaled by 255). Anything else raises ImageError naming
  what was wrong (channels-first arrays get a hint).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import ImageOps

from qcs_jax.data import images as data_images
from qcs_jax.data.errors import DataError


class ImageError(DataError):
  """An image the Recognizer cannot use: says what it is and what is accepted."""


_ACCEPTED = "uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) arrays, PIL images or file paths"


def read_image(path: str | os.PathLike) -> np.ndarray:
  """A photo file -> uint8 RGB (H, W, 3), upright by its EXIF orientation.

  Decoded by qcs_jax.data.images (the one hardened decoder: pixel limit before
  decoding, CMYK, 16-bit, alpha onto white); raises ImageError naming the file.
  """
  try:
    return data_images.decode_rgb(os.fspath(path), exif_transpose=True)
  except DataError as e:
    raise ImageError(str(e)) from None


def pil_to_rgb(im: Any, where: str = "PIL image") -> np.ndarray:
  """A PIL image -> uint8 RGB (H, W, 3): EXIF-upright, then data.images.to_rgb's rules."""
  try:
    im = ImageOps.exif_transpose(im)
  except Exception:  # pylint: disable=broad-except  # a broken EXIF block: as stored
    pass
  try:
    return data_images.to_rgb(im, where)
  except DataError as e:
    raise ImageError(str(e)) from None


def array_to_rgb(image: np.ndarray, bgr: bool = False, where: str = "image") -> np.ndarray:
  """A numpy image -> C-contiguous uint8 RGB (H, W, 3); see the module docstring."""
  a = np.asarray(image)
  if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
    raise ImageError(f"{where}: shape {a.shape} looks channels-first; pass (H, W, C), "
                     f"e.g. image.transpose(1, 2, 0)")
  if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (1, 3, 4)):
    raise ImageError(f"{where}: shape {a.shape} is not an image; expected {_ACCEPTED}")
  if a.shape[0] == 0 or a.shape[1] == 0:
    raise ImageError(f"{where}: empty image of shape {a.shape}")
  a = _to_uint8(a, where)
  if a.ndim == 2 or a.shape[-1] == 1:
    return np.ascontiguousarray(np.repeat(a.reshape(a.shape[:2])[..., None], 3, axis=-1))
  a = a[..., :3]  # RGBA / BGRA: alpha dropped
  if bgr:
    a = a[..., ::-1]
  return np.ascontiguousarray(a)


def _to_uint8(a: np.ndarray, where: str) -> np.ndarray:
  if a.dtype == np.uint8:
    return a
  if a.dtype == np.uint16:
    return np.round(a.astype(np.float32) * np.float32(255.0 / 65535.0)).astype(np.uint8)
  if a.dtype == np.bool_:
    raise ImageError(f"{where}: boolean arrays are masks, not images; expected {_ACCEPTED}")
  if np.issubdtype(a.dtype, np.integer):
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi > 255:
      raise ImageError(f"{where}: {a.dtype} values span {lo}..{hi}, outside 0..255; pass "
                       f"uint8, or uint16 for 16-bit images")
    return a.astype(np.uint8)
  if np.issubdtype(a.dtype, np.floating):
    if not np.isfinite(a).all():
      raise ImageError(f"{where}: {a.dtype} image holds NaN or infinite values")
    lo, hi = float(a.min()), float(a.max())
    if lo < 0.0 or hi > 1.0:
      raise ImageError(f"{where}: {a.dtype} values span {lo:.4g}..{hi:.4g}; float images must "
                       f"lie in [0, 1] (or pass uint8 0..255)")
    return np.round(a.astype(np.float32) * np.float32(255.0)).astype(np.uint8)
  raise ImageError(f"{where}: dtype {a.dtype} is not an image type; expected {_ACCEPTED}")


def to_rgb(image: Any, bgr: bool = False) -> np.ndarray:
  """Path, PIL image or array -> uint8 RGB (H, W, 3). `bgr` applies to arrays only."""
  if isinstance(image, (str, os.PathLike)):
    return read_image(image)
  if hasattr(image, "mode") and hasattr(image, "getexif"):  # a PIL image, without importing PIL
    return pil_to_rgb(image)
  if isinstance(image, np.ndarray) or hasattr(image, "__array__"):
    return array_to_rgb(np.asarray(image), bgr=bgr)
  raise ImageError(f"cannot use a {type(image).__name__} as an image; expected {_ACCEPTED}")
