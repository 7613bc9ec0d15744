"""Generic layouts: class sub-folders of images, or a path,label,split CSV manifest."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from qcs_jax.data.readers.parsing import (_check_on_missing, _column_index, _found,
                                         _keep_existing, _open_csv)
from qcs_jax.data.base import DataError, FileListSource, LineOrigins

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


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
