"""AffectNet-7/8 from the official Manually_Annotated file lists."""
from __future__ import annotations

import itertools
import os
from typing import Iterator

import numpy as np

from qcs_jax.data.readers.parsing import (_check_on_missing, _column_index, _fast_rows,
                                         _first_existing, _found, _keep_existing, _norm_split,
                                         _parse_int)
from qcs_jax.data.base import DataError, FileListSource, LineOrigins

AFFECTNET_CLASSES = ("Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger",
                     "Contempt")
AFFECTNET_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width",
                     "face_height", "facial_landmarks", "expression", "valence", "arousal")


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
