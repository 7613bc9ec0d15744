"""RAF-DB basic (7 classes): the official download or a QCS-style list file."""
from __future__ import annotations

import os

import numpy as np

from qcs_jax.data.readers.parsing import (_check_on_missing, _first_existing, _found,
                                         _keep_existing, _norm_split, _parse_int, _read_lines,
                                         _resolve_option_path)
from qcs_jax.data.base import DataError, FileListSource, LineOrigins

RAFDB_CLASSES = ("Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral")

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
