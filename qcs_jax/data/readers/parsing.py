"""Helpers shared by the data-set readers: CSV / list parsing and missing-file checks."""
from __future__ import annotations

import csv
import os
from typing import Iterator, Sequence

import numpy as np

from qcs_jax.data.base import DataError

ON_MISSING = ("error", "drop")
_SHOW = 5  # how many bad items an error message lists


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
