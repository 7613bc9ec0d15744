"""Random-access data sources of face images with integer labels.

Every source is a grain ``RandomAccessDataSource``: ``len(source)`` and
``source[i] -> {'image': uint8 (H, W, 3) RGB, 'label': int32, 'index': int}``.
Images are always decoded to RGB, never BGR.

Readers (each validates its files on open and returns a FERSource; none prints):
``rafdb``, ``ferplus``, ``affectnet``, ``image_folder``, ``csv_manifest``;
``open_split(data_cfg, split)`` dispatches on ``data_cfg.name`` and
``validate_for_training(source)`` checks a training split for the sampler.
"""
from __future__ import annotations

import csv
import dataclasses
import itertools
import os
from typing import Any, Iterator, Sequence
import warnings

import numpy as np
from PIL import Image


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
# Readers of the public data sets and of generic layouts.
# ---------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
RAFDB_CLASSES = ("Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral")
FERPLUS_CLASSES = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust",
                   "fear", "contempt")
FERPLUS_VOTE_COLUMNS = FERPLUS_CLASSES + ("unknown", "NF")
FERPLUS_UNKNOWN = 8  # vote result: no majority, or the 'unknown' column won
FERPLUS_NF = 9       # vote result: the 'NF' (not a face) column won
AFFECTNET_CLASSES = ("Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger",
                     "Contempt")
AFFECTNET_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width",
                     "face_height", "facial_landmarks", "expression", "valence", "arousal")
DATASET_NAMES = ("rafdb", "ferplus", "affectnet7", "affectnet8", "folder", "csv", "synthetic")
ON_MISSING = ("error", "drop")
_SHOW = 5  # how many bad items an error message lists


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


# --- small helpers ----------------------------------------------------------

def _found(path: str) -> str:
  """What is actually at `path`, for 'expected X, found Y' messages."""
  if not os.path.exists(path):
    return f"{path} does not exist"
  if not os.path.isdir(path):
    return f"{path} is a file, not a folder"
  names = sorted(os.listdir(path))
  if not names:
    return f"{path} is empty"
  more = f", ... ({len(names)} entries)" if len(names) > 8 else ""
  return f"{path} contains: {', '.join(names[:8])}{more}"


def _norm_split(split: str, allowed: Sequence[str], what: str,
                aliases: dict[str, str] | None = None) -> str:
  s = (aliases or {}).get(str(split).lower(), str(split).lower())
  if s not in allowed:
    raise DataError(f"{what}: unknown split {split!r}; valid: {', '.join(allowed)}")
  return s


def _check_on_missing(on_missing: str) -> None:
  if on_missing not in ON_MISSING:
    raise DataError(f"on_missing must be one of {ON_MISSING}, got {on_missing!r}")


def _first_existing(candidates: Sequence[str]) -> str | None:
  for c in candidates:
    if os.path.isfile(c):
      return c
  return None


def _keep_existing(what: str, resolved: Sequence[str | None], expected: Sequence[str],
                   origins: Sequence[str], on_missing: str, hint: str) -> tuple[np.ndarray, str]:
  """Indices of items whose image was found; DataError (or a note) naming the missing ones."""
  missing = [i for i, p in enumerate(resolved) if p is None]
  keep = np.asarray([i for i, p in enumerate(resolved) if p is not None], dtype=np.int64)
  if not missing:
    return keep, ""
  shown = "\n".join(f"  {origins[i]}: {expected[i]}" for i in missing[:_SHOW])
  more = f"\n  ... and {len(missing) - _SHOW} more" if len(missing) > _SHOW else ""
  msg = (f"{what}: {len(missing)} of {len(resolved)} listed images are missing:\n"
         f"{shown}{more}\n{hint}")
  if on_missing == "error" or len(missing) == len(resolved):
    raise DataError(msg + ("\n(on_missing='drop', config data.on_missing, skips them)"
                           if on_missing == "error" else ""))
  return keep, f"dropped {len(missing)} missing images (first: {origins[missing[0]]})"


def _open_csv(path: str) -> Iterator[tuple[int, list[str]]]:
  """(line number, fields) for every non-empty row of a CSV file."""
  try:
    f = open(path, newline="", encoding="utf-8-sig")
  except OSError as e:
    raise DataError(f"cannot read {path}: {e}") from e
  with f:
    reader = csv.reader(f)
    line = 1
    try:
      for row in reader:
        if row and any(c.strip() for c in row):
          yield line, row
        line = reader.line_num + 1
    except csv.Error as e:
      raise DataError(f"{path} line {line}: malformed CSV: {e}") from e
    except UnicodeDecodeError as e:
      raise DataError(f"{path} near line {line}: not UTF-8 text: {e}") from e


def _fast_rows(path: str) -> Iterator[tuple[int, list[str]]]:
  """Like _open_csv for files without multi-line fields (FER2013 pixels, AffectNet lists).

  Plain lines are split on commas (many times faster than the csv module on 300 MB
  of pixels); only lines holding a quote go through the csv module.
  """
  try:
    f = open(path, newline="", encoding="utf-8-sig")
  except OSError as e:
    raise DataError(f"cannot read {path}: {e}") from e
  with f:
    n = 0
    try:
      for n, line in enumerate(f, start=1):
        row = _split_line(path, n, line)
        if len(row) > 1 or row[0].strip():
          yield n, row
    except UnicodeDecodeError as e:
      raise DataError(f"{path} after line {n}: not UTF-8 text: {e}") from e


def _split_line(path: str, n: int, line: str) -> list[str]:
  """The fields of one CSV line ([''] if it is blank)."""
  if '"' not in line:
    row = line.split(",")  # no strip of the whole (9 KB) line: only of its last field
    row[-1] = row[-1].rstrip("\r\n")
    return row
  try:
    return next(csv.reader([line], strict=True), None) or [""]
  except csv.Error as e:
    raise DataError(f"{path} line {n}: malformed CSV: {e}") from e


def _column_index(header: Sequence[str], required: Sequence[str], path: str) -> dict[str, int]:
  """Column positions by (case-insensitive) name; DataError listing what is missing."""
  pos = {h.strip().lower(): i for i, h in enumerate(header)}
  missing = [c for c in required if c.lower() not in pos]
  if missing:
    raise DataError(f"{path}: missing column(s) {missing}; expected columns {list(required)}, "
                    f"found {[h.strip() for h in header]}")
  return {c: pos[c.lower()] for c in required}


def _resolve_option_path(path: str, root: str) -> str:
  """A path option as given, or relative to the data root if that is where it exists."""
  if os.path.isabs(path) or os.path.exists(path) or not root:
    return path
  under_root = os.path.join(root, path)
  return under_root if os.path.exists(under_root) else path


def _read_lines(path: str) -> list[str]:
  try:
    with open(path, encoding="utf-8-sig") as f:
      return f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"cannot read list file {path}: {e}") from e


def _parse_int(value: str, where: str, what: str) -> int:
  try:
    return int(value.strip())
  except ValueError:
    raise DataError(f"{where}: {what} {value.strip()!r} is not an integer") from None


# --- RAF-DB -------------------------------------------------------------------

# The official name (sic) first, then the corrected spelling some copies use.
_RAFDB_LABEL_FILES = ("list_patition_label.txt", "list_partition_label.txt")


def _rafdb_base(root: str) -> tuple[str, str]:
  """(basic/ folder, label file) of an official RAF-DB download at root or root/basic."""
  for base in (os.path.join(root, "basic"), root):
    for fn in _RAFDB_LABEL_FILES:
      p = os.path.join(base, "EmoLabel", fn)
      if os.path.isfile(p):
        return base, p
  raise DataError(
      f"RAF-DB: no label file found. Expected the official layout "
      f"{os.path.join(root, 'basic', 'EmoLabel', _RAFDB_LABEL_FILES[0])} (or root pointing at "
      f"basic/ itself), or pass a QCS-style list file (data.list_train / data.list_test); "
      f"found: {_found(root)}")


def _read_list_file(path: str, num_classes: int) -> tuple[list[str], list[int], list[int]]:
  """QCS-style list: lines '<relative path> <label 0..K-1>' -> (paths, labels, line numbers)."""
  paths, labels, lines = [], [], []
  for n, raw in enumerate(_read_lines(path), start=1):
    line = raw.strip()
    if not line or line.startswith("#"):
      continue
    parts = line.rsplit(None, 1)
    if len(parts) != 2:
      raise DataError(f"{path} line {n}: expected '<image path> <label>', got {raw!r}")
    label = _parse_int(parts[1], f"{path} line {n}", "label")
    if not 0 <= label < num_classes:
      raise DataError(f"{path} line {n}: label {label} is outside 0..{num_classes - 1}")
    paths.append(parts[0])
    labels.append(label)
    lines.append(n)
  return paths, labels, lines


def rafdb(root: str, split: str, variant: str = "aligned", list_file: str | None = None,
          on_missing: str = "error") -> FileListSource:
  """RAF-DB basic (7 classes) from the official download or a QCS-style list file.

  Official: root/basic/EmoLabel/list_patition_label.txt (root may also be basic/),
  labels 1..7 -> 0..6, split from the train_/test_ name prefix, images
  basic/Image/aligned/<stem>_aligned.jpg or basic/Image/original/<name>.
  List file: '<path relative to root> <label 0..6>' per line; the file is the split.
  """
  split = _norm_split(split, ("train", "test"), "RAF-DB")
  _check_on_missing(on_missing)
  name = f"rafdb/{split}"
  k = len(RAFDB_CLASSES)
  if list_file:
    list_path = _resolve_option_path(list_file, root)
    if not os.path.isfile(list_path):
      raise DataError(f"RAF-DB: list file {list_file} not found (also looked under root {root})")
    rel, labels, lines = _read_list_file(list_path, k)
    expected = [p if os.path.isabs(p) else os.path.join(root, p) for p in rel]
    resolved = [e if os.path.isfile(e) else None for e in expected]
    hint = (f"paths in a list file are resolved against data root {root!r}; "
            f"found: {_found(root)}")
    notes = f"list {list_path}"
  else:
    if variant not in ("aligned", "original"):
      raise DataError(f"RAF-DB: variant must be 'aligned' or 'original', got {variant!r}")
    base, list_path = _rafdb_base(root)
    image_dir = os.path.join(base, "Image", variant)
    rel, labels, lines, expected, resolved = [], [], [], [], []
    for n, raw in enumerate(_read_lines(list_path), start=1):
      parts = raw.split()
      if not parts:
        continue
      if len(parts) != 2:
        raise DataError(f"{list_path} line {n}: expected '<image name> <label 1..7>', got {raw!r}")
      fname, lab = parts
      label = _parse_int(lab, f"{list_path} line {n}", "label")
      if not 1 <= label <= k:
        raise DataError(f"{list_path} line {n}: label {label} is outside 1..{k}")
      prefix = fname.split("_", 1)[0]
      if prefix not in ("train", "test"):
        raise DataError(f"{list_path} line {n}: image name {fname!r} starts with neither "
                        f"'train_' nor 'test_'")
      if prefix != split:
        continue
      stem = os.path.splitext(fname)[0]
      if variant == "aligned":
        # Official name first; some re-distributions keep the original file name.
        cands = [os.path.join(image_dir, f"{stem}_aligned.jpg"), os.path.join(image_dir, fname)]
      else:
        cands = [os.path.join(image_dir, fname)]
      rel.append(fname)
      labels.append(label - 1)
      lines.append(n)
      expected.append(cands[0])
      resolved.append(_first_existing(cands))
    pattern = "<stem>_aligned.jpg" if variant == "aligned" else "<name>"
    hint = (f"expected layout (variant {variant!r}): {os.path.join(image_dir, pattern)}; "
            f"found: {_found(image_dir)}; {_found(os.path.join(base, 'Image'))}")
    notes = f"{variant} images"
  if not labels:
    raise DataError(f"RAF-DB: {list_path} lists no {split} images")
  origins = LineOrigins(list_path, lines)
  keep, dropped = _keep_existing(f"RAF-DB {split} ({list_path})", resolved, expected, origins,
                                 on_missing, hint)
  return FileListSource(
      labels=np.asarray(labels)[keep], class_names=RAFDB_CLASSES, name=name,
      paths=[resolved[i] for i in keep], origins=origins.take(keep),
      notes="; ".join(x for x in (notes, dropped) if x))


# --- FERPlus ------------------------------------------------------------------

_FER_USAGE = {"training": "train", "publictest": "valid", "privatetest": "test"}
_FER_FOLDERS = {"train": "FER2013Train", "valid": "FER2013Valid", "test": "FER2013Test"}
_SPLIT_ALIASES = {"val": "valid", "validation": "valid"}


def ferplus_majority_vote(votes: np.ndarray) -> np.ndarray:
  """FERPlus 'majority' labels from (N, 10) vote counts in FERPLUS_VOTE_COLUMNS order.

  All ten columns (8 emotions, 'unknown', 'NF') take part as equals: every count
  <= 1 is zeroed (single votes are outliers); if the largest remaining count is
  more than half of the remaining total, the result is its column (0..7 an
  emotion, FERPLUS_UNKNOWN if 'unknown' won, FERPLUS_NF if 'NF' won); otherwise
  (a tie, no majority, or no votes left) the result is FERPLUS_UNKNOWN. Callers
  keep results < 8. A tie for the top can never exceed half, so argmax is unique.
  """
  v = np.asarray(votes, dtype=np.float64)
  if v.ndim != 2 or v.shape[1] != len(FERPLUS_VOTE_COLUMNS):
    raise DataError(f"FERPlus votes must be (N, {len(FERPLUS_VOTE_COLUMNS)}), got {v.shape}")
  v = np.where(v <= 1.0, 0.0, v)
  top = v.max(axis=1)
  majority = top > 0.5 * v.sum(axis=1)
  return np.where(majority, v.argmax(axis=1), FERPLUS_UNKNOWN).astype(np.int64)


def _parse_votes(fields: Sequence[str], where: str) -> list[float]:
  out = []
  for c, f in zip(FERPLUS_VOTE_COLUMNS, fields):
    try:
      x = float(f)
    except ValueError:
      raise DataError(f"{where}: vote count {c}={f.strip()!r} is not a number") from None
    if not np.isfinite(x) or x < 0:
      raise DataError(f"{where}: vote count {c}={f.strip()!r} must be >= 0")
    out.append(x)
  return out


def _vote_notes(results: np.ndarray, extra: str = "") -> str:
  n_unknown = int(np.sum(results == FERPLUS_UNKNOWN))
  n_nf = int(np.sum(results == FERPLUS_NF))
  return ", ".join(x for x in (extra, f"dropped {n_unknown} unknown (no majority)",
                               f"{n_nf} not-a-face") if x)


def _parse_pixels(text: str, where: str) -> np.ndarray:
  """2,304 space-separated ints 0..255 -> uint8 (48, 48); DataError naming `where`."""
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # numpy warns (not raises) on a partial parse
    try:
      px = np.fromstring(text, dtype=np.int64, sep=" ")
    except (ValueError, DeprecationWarning):
      raise DataError(f"{where}: pixels column holds something other than "
                      f"space-separated integers") from None
  if px.size != 48 * 48:
    raise DataError(f"{where}: pixels column has {px.size} values, expected 2304 (48x48)")
  if px.min() < 0 or px.max() > 255:
    raise DataError(f"{where}: pixel values must be in 0..255, found {px.min()}..{px.max()}")
  return px.astype(np.uint8).reshape(48, 48)


def _ferplus_csv(fer_csv: str, new_csv: str, split: str) -> PixelSource:
  """fer2013.csv pixels + fer2013new.csv votes, rows lined up 1:1."""
  for p in (fer_csv, new_csv):
    if not os.path.isfile(p):
      raise DataError(f"FERPlus: {p} not found; the CSV layout needs fer2013.csv (pixels) and "
                      f"fer2013new.csv (FERPlus votes) side by side")
  old_rows, new_rows = _fast_rows(fer_csv), _fast_rows(new_csv)
  try:
    _, old_head = next(old_rows)
    _, new_head = next(new_rows)
  except StopIteration:
    raise DataError(f"FERPlus: {fer_csv} or {new_csv} is empty") from None
  oc = _column_index(old_head, ("pixels", "Usage"), fer_csv)
  nc = _column_index(new_head, ("Usage", "Image name") + FERPLUS_VOTE_COLUMNS, new_csv)
  vote_cols = [nc[c] for c in FERPLUS_VOTE_COLUMNS]
  n_old = n_new = n_noname = 0
  images, votes, origins = [], [], []
  while True:
    old, new = next(old_rows, None), next(new_rows, None)
    if old is None or new is None:
      n_old += old is not None
      n_new += new is not None
      n_old += sum(1 for _ in old_rows)
      n_new += sum(1 for _ in new_rows)
      if n_old != n_new:
        raise DataError(f"FERPlus: {fer_csv} has {n_old} data rows but {new_csv} has {n_new}; "
                        f"the two files must line up row by row (same FER2013 release)")
      break
    n_old += 1
    n_new += 1
    (lo, ro), (ln, rn) = old, new
    if len(ro) <= max(oc.values()) or len(rn) <= max(nc.values()):
      bad, line = (fer_csv, lo) if len(ro) <= max(oc.values()) else (new_csv, ln)
      raise DataError(f"{bad} line {line}: too few columns")
    usage_old, usage_new = ro[oc["Usage"]].strip(), rn[nc["Usage"]].strip()
    if usage_old.lower() != usage_new.lower():
      raise DataError(f"FERPlus: row {n_old} disagrees: {fer_csv} line {lo} is {usage_old!r} "
                      f"but {new_csv} line {ln} is {usage_new!r}; the files do not line up")
    if usage_old.lower() not in _FER_USAGE:
      raise DataError(f"{fer_csv} line {lo}: Usage {usage_old!r} is not one of Training, "
                      f"PublicTest, PrivateTest")
    if _FER_USAGE[usage_old.lower()] != split:
      continue
    if not rn[nc["Image name"]].strip():
      n_noname += 1  # FERPlus dropped this image
      continue
    votes.append(_parse_votes([rn[i] for i in vote_cols], f"{new_csv} line {ln}"))
    images.append(_parse_pixels(ro[oc["pixels"]], f"{fer_csv} line {lo}"))
    origins.append(lo)
  if not votes:
    raise DataError(f"FERPlus: no {split} rows in {new_csv}")
  results = ferplus_majority_vote(np.asarray(votes))
  keep = np.flatnonzero(results < len(FERPLUS_CLASSES))
  gray = np.stack(images)[keep] if keep.size else np.zeros((0, 48, 48), np.uint8)
  return PixelSource(
      labels=results[keep], class_names=FERPLUS_CLASSES, name=f"ferplus/{split}",
      images=np.repeat(gray[..., None], 3, axis=-1),
      origins=LineOrigins(fer_csv, np.asarray(origins)[keep]),
      notes=_vote_notes(results, f"dropped {n_noname} without image name"))


def _ferplus_folder(folder: str, split: str, on_missing: str) -> FileListSource:
  """FERPlus repo folder: label.csv rows 'name, face box, 10 vote counts' and the PNGs."""
  label_csv = os.path.join(folder, "label.csv")
  if not os.path.isfile(label_csv):
    raise DataError(f"FERPlus: {label_csv} not found; expected {folder}/label.csv next to the "
                    f"PNGs; found: {_found(folder)}")
  names, votes, lines = [], [], []
  for n, row in _fast_rows(label_csv):
    if len(row) != 2 + len(FERPLUS_VOTE_COLUMNS):
      raise DataError(f"{label_csv} line {n}: expected 12 fields (image name, face box, "
                      f"{len(FERPLUS_VOTE_COLUMNS)} vote counts), got {len(row)}")
    if n == 1 and not row[2].strip().replace(".", "", 1).isdigit():
      continue  # a header row
    votes.append(_parse_votes(row[2:], f"{label_csv} line {n}"))
    names.append(row[0].strip())
    lines.append(n)
  if not votes:
    raise DataError(f"FERPlus: {label_csv} has no rows")
  results = ferplus_majority_vote(np.asarray(votes))
  voted = np.flatnonzero(results < len(FERPLUS_CLASSES))
  expected = [os.path.join(folder, names[i]) for i in voted]
  resolved = [e if os.path.isfile(e) else None for e in expected]
  origins = LineOrigins(label_csv, np.asarray(lines)[voted])
  keep, dropped = _keep_existing(f"FERPlus {split} ({label_csv})", resolved, expected, origins,
                                 on_missing, f"expected the PNGs next to label.csv; found: "
                                 f"{_found(folder)}")
  return FileListSource(
      labels=results[voted][keep], class_names=FERPLUS_CLASSES, name=f"ferplus/{split}",
      paths=[resolved[i] for i in keep], origins=origins.take(keep),
      notes="; ".join(x for x in (_vote_notes(results), dropped) if x))


def ferplus(root: str, split: str, fer2013_csv: str | None = None,
            labels_csv: str | None = None, on_missing: str = "error") -> FERSource:
  """FERPlus (8 classes, majority vote) from the FER2013 CSVs or the FERPlus repo folders.

  CSV layout: root/fer2013.csv (or root/fer2013/fer2013.csv, or `fer2013_csv`) with
  root/fer2013new.csv (or next to fer2013.csv, or `labels_csv`) -> an in-memory
  source of 48x48 grey faces replicated to RGB. Folder layout:
  root/FER2013{Train,Valid,Test}/label.csv + PNGs (root may also be the repo, with
  data/). split: 'train' | 'valid' (PublicTest) | 'test' (PrivateTest).
  """
  split = _norm_split(split, ("train", "valid", "test"), "FERPlus", _SPLIT_ALIASES)
  _check_on_missing(on_missing)
  fer_cands = ([_resolve_option_path(fer2013_csv, root)] if fer2013_csv else
               [os.path.join(root, "fer2013.csv"), os.path.join(root, "fer2013", "fer2013.csv")])
  fer_csv = _first_existing(fer_cands)
  if fer2013_csv or labels_csv or fer_csv:
    fer_csv = fer_csv or fer_cands[0]
    if labels_csv:
      new_csv = _resolve_option_path(labels_csv, root)
    else:
      new_csv = _first_existing([os.path.join(root, "fer2013new.csv"),
                                 os.path.join(os.path.dirname(fer_csv), "fer2013new.csv")])
      new_csv = new_csv or os.path.join(root, "fer2013new.csv")
    return _ferplus_csv(fer_csv, new_csv, split)
  for base in (root, os.path.join(root, "data")):
    folder = os.path.join(base, _FER_FOLDERS[split])
    if os.path.isdir(folder):
      return _ferplus_folder(folder, split, on_missing)
  raise DataError(
      f"FERPlus: found neither layout under {root}: expected root/fer2013.csv + "
      f"root/fer2013new.csv, or root/{_FER_FOLDERS[split]}/label.csv with its PNGs "
      f"(FERPlus repo, also under root/data/); found: {_found(root)}")


# --- AffectNet ----------------------------------------------------------------

def affectnet(root: str, split: str, num_classes: int = 7,
              on_missing: str = "error") -> FileListSource:
  """AffectNet-7/8 from Manually_Annotated_file_lists/{training,validation}.csv.

  Keeps expression 0..num_classes-1; images under root/Manually_Annotated_Images/
  <subDirectory_filePath> (or root/<subDirectory_filePath>). 'test' = validation.csv.
  A file without the header row is read in the official column order.
  """
  split = _norm_split(split, ("train", "test"), f"AffectNet-{num_classes}",
                      {"valid": "test", "val": "test", "validation": "test"})
  _check_on_missing(on_missing)
  if num_classes not in (7, 8):
    raise DataError(f"AffectNet: num_classes must be 7 or 8, got {num_classes}")
  fn = "training.csv" if split == "train" else "validation.csv"
  cands = [os.path.join(root, "Manually_Annotated_file_lists", fn), os.path.join(root, fn)]
  path = _first_existing(cands)
  if path is None:
    raise DataError(f"AffectNet: {cands[0]} not found (nor {cands[1]}); found: {_found(root)}")
  rows = _fast_rows(path)
  first = next(rows, None)
  if first is None:
    raise DataError(f"AffectNet: {path} is empty")
  if any(f.strip().lower() == "expression" for f in first[1]):
    col = _column_index(first[1], ("subDirectory_filePath", "expression"), path)
    body: Iterator = rows
  else:  # headerless (some copies of validation.csv): official order
    col = {"subDirectory_filePath": 0, "expression": AFFECTNET_COLUMNS.index("expression")}
    body = itertools.chain([first], rows)
  # Prefixes joined by '+' (os.path.join costs seconds over 400k rows).
  image_bases = [os.path.join(root, "Manually_Annotated_Images", ""), os.path.join(root, "")]
  rel, labels, lines, resolved = [], [], [], []
  path_col, expr_col = col["subDirectory_filePath"], col["expression"]
  n_other = 0
  for n, row in body:
    if len(row) <= max(col.values()):
      raise DataError(f"{path} line {n}: too few columns ({len(row)}); expected "
                      f"{', '.join(AFFECTNET_COLUMNS)}")
    expr = _parse_int(row[expr_col], f"{path} line {n}", "expression")
    if not 0 <= expr <= 10:
      raise DataError(f"{path} line {n}: expression {expr} is outside 0..10")
    if expr >= num_classes:
      n_other += 1
      continue
    p = row[path_col].strip()
    found = None
    for j, base in enumerate(image_bases):
      c = base + p
      if os.path.isfile(c):
        found = c
        if j:  # try the base that worked first next time
          image_bases.insert(0, image_bases.pop(j))
        break
    rel.append(p)
    labels.append(expr)
    lines.append(n)
    resolved.append(found)
  if not labels:
    raise DataError(f"AffectNet: {path} has no rows with expression 0..{num_classes - 1}")
  origins = LineOrigins(path, lines)
  hint = (f"expected images under {os.path.join(root, 'Manually_Annotated_Images')}/"
          f"<subDirectory_filePath> (or {root}/<subDirectory_filePath>); "
          f"found: {_found(os.path.join(root, 'Manually_Annotated_Images'))}")
  expected = [os.path.join(root, "Manually_Annotated_Images", p) if f is None else f
              for p, f in zip(rel, resolved)] if None in resolved else resolved
  keep, dropped = _keep_existing(f"AffectNet {split} ({path})", resolved, expected, origins,
                                 on_missing, hint)
  notes = f"dropped {n_other} rows with expression >= {num_classes}"
  return FileListSource(
      labels=np.asarray(labels)[keep], class_names=AFFECTNET_CLASSES[:num_classes],
      name=f"affectnet{num_classes}/{split}", paths=[resolved[i] for i in keep],
      origins=origins.take(keep), notes="; ".join(x for x in (notes, dropped) if x))


# --- generic layouts ------------------------------------------------------------

def _is_image(fn: str) -> bool:
  return fn.lower().endswith(IMAGE_EXTENSIONS) and not fn.startswith(".")


def folder_class_names(root: str, split: str) -> tuple[str, ...]:
  """Sorted class sub-folder names of root/<split>; DataError explaining the layout."""
  d = os.path.join(root, split)
  layout = (f"expected layout: {os.path.join(root, '<split>', '<class_name>', '<image>')} "
            f"with images {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}")
  if not os.path.isdir(d):
    raise DataError(f"image folder: {d} does not exist; {layout}; found: {_found(root)}")
  classes = sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))
  if not classes:
    loose = sum(1 for e in os.scandir(d) if e.is_file() and _is_image(e.name))
    extra = f" (it holds {loose} images directly: move them into class folders)" if loose else ""
    raise DataError(f"image folder: {d} has no class sub-folders{extra}; {layout}")
  return tuple(classes)


def image_folder(root: str, split: str,
                 class_names: Sequence[str] | None = None) -> FileListSource:
  """root/<split>/<class_name>/**/*.{jpg,jpeg,png,bmp,webp}.

  Classes are the sorted sub-folder names, or `class_names` (which fixes the
  order and may list classes this split lacks; a folder not in it is an error).
  """
  found = folder_class_names(root, split)
  if class_names:
    class_names = tuple(class_names)
    unknown = [c for c in found if c not in class_names]
    if unknown:
      raise DataError(f"image folder: {os.path.join(root, split)} has class folder(s) {unknown} "
                      f"not in class_names {list(class_names)}")
  else:
    class_names = found
  paths, labels = [], []
  for c in found:
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, split, c)):
      dirnames[:] = sorted(x for x in dirnames if not x.startswith("."))
      for fn in sorted(filenames):
        if _is_image(fn):
          paths.append(os.path.join(dirpath, fn))
          labels.append(class_names.index(c))
  if not paths:
    raise DataError(f"image folder: no images ({'/'.join(IMAGE_EXTENSIONS)}) under "
                    f"{os.path.join(root, split)}/<class_name>/")
  return FileListSource(labels=np.asarray(labels), class_names=class_names,
                        name=f"folder/{split}", paths=paths)


def csv_manifest(path: str, split: str, class_names: Sequence[str] | None = None,
                 on_missing: str = "error") -> FileListSource:
  """A CSV with columns path,label,split (label: class index or class name).

  Relative paths are resolved against the CSV's folder. Without class_names,
  classes come from the whole file (all splits, so indices agree between splits):
  integer labels -> names '0'..'K-1'; name labels -> the sorted distinct names.
  """
  _check_on_missing(on_missing)
  if not os.path.isfile(path):
    raise DataError(f"CSV manifest {path} not found")
  rows = _open_csv(path)
  head = next(rows, None)
  if head is None:
    raise DataError(f"CSV manifest {path} is empty")
  col = _column_index(head[1], ("path", "label", "split"), path)
  entries = []
  for n, row in rows:
    if len(row) <= max(col.values()):
      raise DataError(f"{path} line {n}: expected columns path,label,split, got {row}")
    entries.append((n, row[col["path"]].strip(), row[col["label"]].strip(),
                    row[col["split"]].strip()))
  if not entries:
    raise DataError(f"CSV manifest {path} has no rows")
  is_int = [e[2].lstrip("-").isdigit() for e in entries]
  if class_names:
    class_names = tuple(class_names)
    lookup = {c: i for i, c in enumerate(class_names)}
  elif all(is_int):
    class_names = tuple(str(i) for i in range(max(int(e[2]) for e in entries) + 1))
    lookup = {}
  elif not any(is_int):
    class_names = tuple(sorted({e[2] for e in entries}))
    lookup = {c: i for i, c in enumerate(class_names)}
  else:
    a = entries[is_int.index(True)]
    b = entries[is_int.index(False)]
    raise DataError(f"{path}: labels mix class indices (line {a[0]}: {a[2]!r}) and class names "
                    f"(line {b[0]}: {b[2]!r}); use one kind, or set class_names")
  base = os.path.dirname(os.path.abspath(path))
  labels, lines, expected = [], [], []
  for (n, p, lab, s), integer in zip(entries, is_int):
    if s != split:
      continue
    if lab in lookup:
      label = lookup[lab]
    elif integer:
      label = int(lab)
    else:
      raise DataError(f"{path} line {n}: label {lab!r} is not one of {list(class_names)}")
    if not 0 <= label < len(class_names):
      raise DataError(f"{path} line {n}: label {label} is outside 0..{len(class_names) - 1}")
    labels.append(label)
    lines.append(n)
    expected.append(p if os.path.isabs(p) else os.path.join(base, p))
  if not labels:
    splits = sorted({e[3] for e in entries})
    raise DataError(f"CSV manifest {path}: no rows with split {split!r}; found splits {splits}")
  origins = LineOrigins(path, lines)
  resolved = [e if os.path.isfile(e) else None for e in expected]
  keep, dropped = _keep_existing(f"CSV manifest {path} ({split})", resolved, expected, origins,
                                 on_missing, f"relative paths are resolved against {base}")
  return FileListSource(labels=np.asarray(labels)[keep], class_names=class_names,
                        name=f"csv/{split}", paths=[resolved[i] for i in keep],
                        origins=origins.take(keep), notes=dropped)


# --- dispatch and checks ----------------------------------------------------------

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
  if name == "csv":
    csv_path = get("csv", "") or ""
    if not csv_path:
      raise DataError("data.name='csv' needs data.csv (path of a path,label,split manifest)")
    return csv_manifest(_resolve_option_path(csv_path, root), split,
                        _class_names_option(get("class_names", None)), on_missing)
  if not root:
    raise DataError(f"data.root is empty: set it to the {name} download folder")
  if name == "rafdb":
    return rafdb(root, split, get("rafdb_variant", "aligned") or "aligned",
                 get(f"list_{split}", None) or None, on_missing)
  if name == "ferplus":
    return ferplus(root, split, get("fer2013_csv", None) or None,
                   get("ferplus_labels", None) or None, on_missing)
  if name in ("affectnet7", "affectnet8"):
    return affectnet(root, split, int(name[-1]), on_missing)
  class_names = _class_names_option(get("class_names", None))
  train_split = get("train_split", "train") or "train"
  if class_names is None and split != train_split:
    # Index classes as the training split does, even if this split lacks some.
    class_names = folder_class_names(root, train_split)
  return image_folder(root, split, class_names)


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
