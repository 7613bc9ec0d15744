"""The source types: random-access face images with integer labels.

Every source is a grain ``RandomAccessDataSource``: ``len(source)`` and
``source[i] -> {'image': uint8 (H, W, 3) RGB, 'label': int32, 'index': int}``.
Images are always decoded to RGB, never BGR. The readers in
``qcs_jax.data.readers`` build these; ``qcs_jax.data.sources`` dispatches to them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Sequence

import numpy as np

# decode_rgb: an image file -> uint8 (H, W, 3) RGB, or one DataError line naming the file
# (decompression bombs, empty, truncated, CMYK, 16-bit, alpha: see qcs_jax.data.images).
from qcs_jax.data.errors import DataError
from qcs_jax.data.images import decode_rgb


@dataclasses.dataclass
class FERSource:
  """Base: labels and class names; subclasses say how image i is read."""

  labels: np.ndarray                  # int32 (N,)
  class_names: tuple[str, ...]
  name: str                           # e.g. 'rafdb/train'

  def __post_init__(self):
    self.labels = np.asarray(self.labels, dtype=np.int32)
    k = len(self.class_names)
    bad = np.flatnonzero((self.labels < 0) | (self.labels >= k))
    if bad.size:
      i = int(bad[0])
      raise DataError(f"{self.name}: label {int(self.labels[i])} of item {i} "
                      f"({self.describe(i)}) is outside 0..{k - 1}")

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  def load_image(self, i: int) -> np.ndarray:
    raise NotImplementedError

  def describe(self, i: int) -> str:
    """Where item i comes from (file path, CSV line), for error messages."""
    return f"item {i}"

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    return {"image": self.load_image(i), "label": self.labels[i], "index": i}

  def fingerprint(self) -> str:
    """A digest that changes whenever an image or label of this split may have changed.

    The image cache (qcs_jax.data.image_cache) is keyed by it; a source type
    without one can only be used with data.augment_on='host'.
    """
    raise NotImplementedError(f"{self.name}: {type(self).__name__} has no fingerprint(), so "
                              "its images cannot be cached; use data.augment_on='host'")

  def _digest(self, *parts: bytes) -> str:
    h = hashlib.blake2b(digest_size=20)
    h.update(type(self).__name__.encode())
    h.update(np.ascontiguousarray(self.labels, dtype=np.int32).tobytes())
    for p in parts:
      h.update(len(p).to_bytes(8, "little"))
      h.update(p)
    return h.hexdigest()

  def class_counts(self) -> np.ndarray:
    return np.bincount(self.labels, minlength=self.num_classes)

  def summary(self) -> str:
    counts = self.class_counts()
    rows = ", ".join(f"{n}={c}" for n, c in zip(self.class_names, counts))
    return f"{self.name}: {len(self)} images ({rows})"


@dataclasses.dataclass
class InMemorySource(FERSource):
  """Images held in one uint8 array (N, H, W, 3): FER2013 pixels, synthetic faces."""

  images: np.ndarray | None = None

  def __post_init__(self):
    super().__post_init__()
    if self.images is None or self.images.ndim != 4 or self.images.shape[-1] != 3:
      raise DataError(f"{self.name}: images must be uint8 (N, H, W, 3), got "
                      f"{None if self.images is None else self.images.shape}")
    if len(self.images) != len(self.labels):
      raise DataError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")

  def load_image(self, i: int) -> np.ndarray:
    return self.images[i]

  def fingerprint(self) -> str:
    """The labels and every pixel (a synthetic split's content, whatever drew it)."""
    images = np.ascontiguousarray(self.images)
    return self._digest(str((images.dtype.str, images.shape)).encode(), memoryview(images))


@dataclasses.dataclass
class FileSource(FERSource):
  """Images as files on disk, decoded on access (in the pipeline's workers)."""

  paths: Sequence[str] = ()
  origins: Sequence[str] | None = None  # e.g. 'list.txt line 12' per item

  def __post_init__(self):
    if len(self.paths) != len(self.labels):
      raise DataError(f"{self.name}: {len(self.paths)} paths but {len(self.labels)} labels")
    super().__post_init__()

  def describe(self, i: int) -> str:
    where = f" ({self.origins[i]})" if self.origins else ""
    return f"{self.paths[i]}{where}"

  def fingerprint(self) -> str:
    """The labels and each file's path, size and mtime_ns (a missing file counts too).

    Stats every file, reads none.
    """
    rows = []
    for p in self.paths:
      try:
        st = os.stat(p)
        rows.append(f"{p}\0{st.st_size}\0{st.st_mtime_ns}")
      except OSError as e:
        rows.append(f"{p}\0{type(e).__name__}")
    return self._digest("\n".join(rows).encode("utf-8", "surrogateescape"))

  def load_image(self, i: int) -> np.ndarray:
    try:
      return decode_rgb(self.paths[i])
    except DataError as e:
      if self.origins:
        raise DataError(f"{e} [{self.origins[i]}]") from e
      raise


# ---------------------------------------------------------------------------
# Source types the readers build.
# ---------------------------------------------------------------------------

class LineOrigins(Sequence[str]):
  """'file line n' per item, stored as one int array (cheap for 280k items and to pickle)."""

  def __init__(self, file: str, lines: Sequence[int]):
    self.file = file
    self.lines = np.asarray(lines, dtype=np.int64)

  def __len__(self) -> int:
    return int(self.lines.shape[0])

  def __getitem__(self, i):
    if isinstance(i, slice):
      return LineOrigins(self.file, self.lines[i])
    return f"{self.file} line {int(self.lines[i])}"

  def take(self, idx: np.ndarray) -> "LineOrigins":
    return LineOrigins(self.file, self.lines[idx])


@dataclasses.dataclass
class FileListSource(FileSource):
  """A FileSource whose summary also says what the reader dropped or chose."""

  notes: str = ""

  def summary(self) -> str:
    s = super().summary()
    return f"{s}; {self.notes}" if self.notes else s


@dataclasses.dataclass
class PixelSource(InMemorySource):
  """An InMemorySource read from a CSV of pixels: describes items by CSV line."""

  origins: Sequence[str] | None = None
  notes: str = ""

  def describe(self, i: int) -> str:
    return self.origins[i] if self.origins else f"item {i}"

  def summary(self) -> str:
    s = super().summary()
    return f"{s}; {self.notes}" if self.notes else s
