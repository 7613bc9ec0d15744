"""FERPlus (8 classes, majority vote): the FER2013 CSVs or the FERPlus repo folders."""
from __future__ import annotations

import os
from typing import Sequence
import warnings

import numpy as np

from qcs_jax.data.readers.parsing import (_check_on_missing, _column_index, _fast_rows,
                                         _first_existing, _found, _keep_existing, _norm_split,
                                         _resolve_option_path)
from qcs_jax.data.base import DataError, FERSource, FileListSource, LineOrigins, PixelSource

FERPLUS_CLASSES = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust",
                   "fear", "contempt")
FERPLUS_VOTE_COLUMNS = FERPLUS_CLASSES + ("unknown", "NF")
# Class names shown to users (the vote columns' order, capitalised).
FERPLUS_CLASS_NAMES = tuple(c.capitalize() for c in FERPLUS_CLASSES)
FERPLUS_UNKNOWN = 8  # vote result: no majority, or the 'unknown' column won
FERPLUS_NF = 9       # vote result: the 'NF' (not a face) column won

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
      labels=results[keep], class_names=FERPLUS_CLASS_NAMES, name=f"ferplus/{split}",
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
      labels=results[voted][keep], class_names=FERPLUS_CLASS_NAMES, name=f"ferplus/{split}",
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
