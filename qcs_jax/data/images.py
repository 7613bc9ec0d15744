"""Safe image decoding for training, evaluation and prediction.

`decode_rgb(path)` returns uint8 (H, W, 3) RGB or raises one `DataError` line
naming the file: missing, a directory, empty (0 bytes), not an image (names
the first bytes), a decompression bomb (more than `MAX_PIXELS` pixels, refused
from the header before any pixel memory is allocated), truncated, or corrupt.
Every PIL mode becomes RGB properly: CMYK through its ICC profile when it has
one, 16-bit grey scaled (not clipped) to 8 bits, palette and alpha images
composited onto white, the first frame of an animation.
"""
from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from qcs_jax.data.errors import DataError

# PIL's own warning threshold (about 0.25 GiB as RGB): no face photo comes near it.
MAX_PIXELS = 89_478_485
BACKGROUND = (255, 255, 255)  # what transparent pixels become
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_GREY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_SIGNATURES = ((b"\x89PNG", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"),
               (b"BM", "BMP"), (b"RIFF", "RIFF/WebP"), (b"II*\0", "TIFF"), (b"MM\0*", "TIFF"))


def _head(path: str, n: int = 8) -> bytes:
  with open(path, "rb") as f:
    return f.read(n)


def _check_file(path: str) -> None:
  try:
    st = os.stat(path)
  except FileNotFoundError:
    raise DataError(f"missing image file: {path}") from None
  except OSError as e:
    raise DataError(f"cannot read image {path}: {e.strerror or e}") from None
  if os.path.isdir(path):
    raise DataError(f"{path}: is a directory, not an image")
  if st.st_size == 0:
    raise DataError(f"{path}: empty file (0 bytes), not an image")


def _check_pixels(path: str, size: tuple[int, int], max_pixels: int) -> None:
  w, h = size
  if w <= 0 or h <= 0:
    raise DataError(f"{path}: image declares size {w}x{h}")
  if w * h > max_pixels:
    raise DataError(f"{path}: decompression bomb refused before decoding: {w}x{h} = "
                    f"{w * h} pixels, over the {max_pixels}-pixel limit")


def open_image(path: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
  """Opens and fully decodes an image file, checked as the module docstring says.

  The returned image is loaded and detached from the file (close() not needed).
  """
  path = os.fspath(path)
  _check_file(path)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels decides
    warnings.simplefilter("ignore", UserWarning)  # PIL's per-tag TIFF/EXIF complaints
    try:
      im = Image.open(path)
    except UnidentifiedImageError:
      head = _head(path)
      kind = next((k for sig, k in _SIGNATURES if head.startswith(sig)), None)
      if kind:
        raise DataError(f"{path}: corrupt {kind} file (its header cannot be read)") from None
      raise DataError(f"{path}: not an image (starts with {head!r})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
      raise DataError(f"{path}: decompression bomb refused before decoding: {e}") from None
    except Exception as e:  # PIL raises many types for corrupt headers
      if "truncat" in str(e).lower():
        raise DataError(f"{path}: truncated image ({e})") from None
      raise DataError(f"{path}: corrupt image header ({type(e).__name__}: {e})") from None
    try:
      with im:
        _check_pixels(path, im.size, max_pixels)
        try:
          im.seek(0)
          im.load()
        except OSError as e:
          if "truncat" in str(e).lower() or "broken data stream" in str(e):
            raise DataError(f"{path}: truncated image ({e})") from None
          raise DataError(f"{path}: corrupt image data ({e})") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
          raise DataError(f"{path}: decompression bomb refused: {e}") from None
        except (SyntaxError, ValueError, EOFError, IndexError, TypeError,
                MemoryError) as e:
          raise DataError(f"{path}: corrupt image data ({type(e).__name__}: {e})") from None
        return im.copy()
    except DataError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def _composite(im: Image.Image) -> Image.Image:
  rgba = im.convert("RGBA")
  back = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
  return Image.alpha_composite(back, rgba).convert("RGB")


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
  icc = im.info.get("icc_profile")
  if icc:
    try:
      # ImageCms needs Pillow's optional littlecms build: asked for only by ICC profiles.
      from PIL import ImageCms  # pylint: disable=import-outside-toplevel
      src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
      dst = ImageCms.createProfile("sRGB")
      return ImageCms.profileToProfile(im, src, dst, outputMode="RGB")
    except Exception:  # pylint: disable=broad-except  # a broken profile: plain formula
      pass
  return im.convert("RGB")


def to_rgb(im: Image.Image, path: str = "image") -> np.ndarray:
  """Any PIL image -> uint8 (H, W, 3) RGB (see the module docstring for each mode)."""
  mode = im.mode
  if mode == "RGB":
    rgb = im
  elif mode in _GREY16_MODES:
    grey = np.asarray(im).astype(np.int64)
    grey = (np.clip(grey, 0, 65535) * 255 + 32767) // 65535
    return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1)
  elif mode == "F":
    f = np.nan_to_num(np.asarray(im, np.float64))
    f = f * 255.0 if f.size and f.min() >= 0.0 and f.max() <= 1.0 else f
    return np.repeat(np.clip(np.rint(f), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
  elif mode in _ALPHA_MODES or (mode == "P" and "transparency" in im.info):
    rgb = _composite(im)
  elif mode == "CMYK":
    rgb = _cmyk_to_rgb(im)
  else:
    try:
      rgb = im.convert("RGB")
    except (ValueError, OSError) as e:
      raise DataError(f"{path}: image mode {mode} cannot be converted to RGB ({e})") from None
  return np.asarray(rgb, dtype=np.uint8)


def decode_rgb(path: str, max_pixels: int = MAX_PIXELS, exif_transpose: bool = False
               ) -> np.ndarray:
  """An image file as uint8 (H, W, 3) RGB, or one DataError line naming the file.

  exif_transpose turns camera photos upright by their EXIF orientation
  (prediction on users' photos); data sets are read as stored.
  """
  im = open_image(path, max_pixels)
  if exif_transpose:
    try:
      im = ImageOps.exif_transpose(im)
    except Exception:  # pylint: disable=broad-except  # a broken EXIF block: as stored
      pass
  return to_rgb(im, os.fspath(path))
