"""Random-access data sources of face images with integer labels.

Every source is a grain ``RandomAccessDataSource``: ``len(source)`` and
``source[i] -> {'image': uint8 (H, W, 3) RGB, 'label': int32, 'index': int}``.
Images are always decoded to RGB, never BGR.

This module holds the source types and the dispatch; the readers (each validates
its files on open and returns a FERSource; none prints) live in
``qcs_jax.data.readers``: ``rafdb``, ``ferplus``, ``affectnet``, ``image_folder``,
``csv_manifest`` (re-exported here, as are their class-name constants);
``open_split(data_cfg, split)`` dispatches on ``data_cfg.name`` and
``validate_for_training(source)`` checks a training split for the sampler.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Sequence, TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # the lazy re-exports below, for type checkers
  # pylint: disable=g-bad-import-order,unused-import
  from qcs_jax.data.readers.affectnet import AFFECTNET_CLASSES, AFFECTNET_COLUMNS, affectnet
  from qcs_jax.data.readers.common import ON_MISSING, _fast_rows
  from qcs_jax.data.readers.ferplus import (FERPLUS_CLASSES, FERPLUS_NF, FERPLUS_UNKNOWN,
                                            FERPLUS_VOTE_COLUMNS, ferplus,
                                            ferplus_majority_vote)
  from qcs_jax.data.readers.generic import (IMAGE_EXTENSIONS, csv_manifest, folder_class_names,
                                            image_folder)
  from qcs_jax.data.readers.rafdb import RAFDB_CLASSES, rafdb


class DataError(ValueError):
  """Bad input: names the file, line, key or value that is wrong."""


def decode_rgb(path: str) -> np.ndarray:
  """Reads an image file as uint8 (H, W, 3) RGB; a clear DataError if it cannot."""
  try:
    with Image.open(path) as im:
      im.load()
      return np.asarray(im.convert("RGB"), dtype=np.uint8)
  except FileNotFoundError as e:
    raise DataError(f"missing image file: {path}") from e
  except Exception as e:  # PIL raises many types for corrupt data
    raise DataError(f"corrupt or unreadable image {path}: {e}") from e


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


# --- dispatch and checks ----------------------------------------------------------

DATASET_NAMES = ("rafdb", "ferplus", "affectnet7", "affectnet8", "folder", "csv", "synthetic")


def _class_names_option(value: Any) -> tuple[str, ...] | None:
  """class_names from a config: a sequence, or one comma-separated string (CLI flags)."""
  if value is None:
    return None
  if isinstance(value, str):
    names = tuple(c.strip() for c in value.split(",") if c.strip())
  else:
    names = tuple(str(c) for c in value)
  return names or None


def open_split(data_cfg: Any, split: str) -> FERSource:
  """Opens split ('train', 'test', ...) of the data set config.data names.

  Options read from data_cfg (with defaults): root, rafdb_variant ('aligned'),
  list_<split> (QCS list file for RAF-DB), fer2013_csv / ferplus_labels (paths of
  fer2013.csv / fer2013new.csv), csv (manifest path), class_names, on_missing
  ('error' | 'drop': listed images absent at open time), train_split.
  """
  get = data_cfg.get
  name = get("name", None)
  root = str(get("root", "") or "")
  on_missing = get("on_missing", "error") or "error"
  if name not in DATASET_NAMES:
    raise DataError(f"unknown data set data.name={name!r}; valid: {', '.join(DATASET_NAMES)}")
  if name == "synthetic":
    from qcs_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    return synthetic.make_synthetic_split(get("synthetic", None), split)
  # The readers import this module's types: imported here, not at the top (no cycle).
  # pylint: disable=g-import-not-at-top
  from qcs_jax.data.readers import affectnet, ferplus, generic, rafdb
  from qcs_jax.data.readers.common import _resolve_option_path
  if name == "csv":
    csv_path = get("csv", "") or ""
    if not csv_path:
      raise DataError("data.name='csv' needs data.csv (path of a path,label,split manifest)")
    return generic.csv_manifest(_resolve_option_path(csv_path, root), split,
                                _class_names_option(get("class_names", None)), on_missing)
  if not root:
    raise DataError(f"data.root is empty: set it to the {name} download folder")
  if name == "rafdb":
    return rafdb.rafdb(root, split, get("rafdb_variant", "aligned") or "aligned",
                       get(f"list_{split}", None) or None, on_missing)
  if name == "ferplus":
    return ferplus.ferplus(root, split, get("fer2013_csv", None) or None,
                           get("ferplus_labels", None) or None, on_missing)
  if name in ("affectnet7", "affectnet8"):
    return affectnet.affectnet(root, split, int(name[-1]), on_missing)
  class_names = _class_names_option(get("class_names", None))
  train_split = get("train_split", "train") or "train"
  if class_names is None and split != train_split:
    # Index classes as the training split does, even if this split lacks some.
    class_names = generic.folder_class_names(root, train_split)
  return generic.image_folder(root, split, class_names)


def validate_for_training(source: FERSource) -> list[str]:
  """Checks a training split for the branch sampler: warnings to print, DataError if unusable."""
  counts = source.class_counts()
  if len(source) == 0:
    raise DataError(f"{source.name}: the training split is empty")
  if source.num_classes < 2:
    raise DataError(f"{source.name}: training needs at least 2 classes (negatives come from "
                    f"other classes), got {list(source.class_names)}")
  empty = [n for n, c in zip(source.class_names, counts) if c == 0]
  if empty:
    raise DataError(f"{source.name}: no training images of class(es) {empty}; every class "
                    f"needs images (negatives are drawn per class). {source.summary()}")
  return [f"{source.name}: class {n!r} has a single training image; the sampler reuses it as "
          f"its own positive" for n, c in zip(source.class_names, counts) if c == 1]


# --- lazy re-exports of the readers (their modules import this one) -------------

_READER_EXPORTS: dict[str, str] = {
    "ON_MISSING": "common", "_fast_rows": "common",
    "RAFDB_CLASSES": "rafdb", "rafdb": "rafdb",
    "FERPLUS_CLASSES": "ferplus", "FERPLUS_VOTE_COLUMNS": "ferplus",
    "FERPLUS_UNKNOWN": "ferplus", "FERPLUS_NF": "ferplus",
    "ferplus_majority_vote": "ferplus", "ferplus": "ferplus",
    "AFFECTNET_CLASSES": "affectnet", "AFFECTNET_COLUMNS": "affectnet",
    "affectnet": "affectnet",
    "IMAGE_EXTENSIONS": "generic", "folder_class_names": "generic",
    "image_folder": "generic", "csv_manifest": "generic",
}


def __getattr__(name: str) -> Any:
  """`sources.rafdb` etc.: the reader API, imported on first use (PEP 562)."""
  module = _READER_EXPORTS.get(name)
  if module is None:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(f"qcs_jax.data.readers.{module}"), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_READER_EXPORTS))
