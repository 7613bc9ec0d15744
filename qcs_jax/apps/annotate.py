"""Annotated copies of pictures: each face's box and 'label score' drawn on it."""
from __future__ import annotations

import os

import cv2
import numpy as np


class Annotator:
  """Writes annotated copies (boxes + labels) of pictures once all their faces are classified."""

  def __init__(self, directory: str):
    self.directory = directory
    os.makedirs(directory, exist_ok=True)
    self._pending: list[tuple[np.ndarray, list[dict], str]] = []
    self._used: set[str] = set()
    self.written: list[str] = []

  def name_for(self, path: str, frame: int | None) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    base = stem if frame is None else f"{stem}_frame{frame:06d}"
    name, k = f"{base}.jpg", 1
    while name in self._used:
      name, k = f"{base}_{k}.jpg", k + 1
    self._used.add(name)
    return os.path.join(self.directory, name)

  def add(self, image: np.ndarray, rows: list[dict], path: str, frame: int | None) -> None:
    self._pending.append((image, rows, self.name_for(path, frame)))

  def write_ready(self) -> None:
    keep = []
    for image, rows, out in self._pending:
      if all("label" in r for r in rows):
        self.written.append(draw_annotations(image, rows, out))
      else:
        keep.append((image, rows, out))
    self._pending = keep


def draw_annotations(image: np.ndarray, rows: list[dict], path: str) -> str:
  """Saves image with each row's box and 'label score' drawn on it (cv2)."""
  img = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR)
  h, w = img.shape[:2]
  thick = max(1, round(min(h, w) / 300))
  scale = max(0.4, min(h, w) / 700)
  for r in rows:
    x, y, bw, bh = r["box"]
    cv2.rectangle(img, (x, y), (x + bw - 1, y + bh - 1), (0, 255, 0), thick)
    text = f"{r['label']} {r['score']:.2f}"
    s = scale
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, s, thick)
    while tw + 2 > w and s > 0.25:  # shrink the label until it fits the picture
      s *= 0.9
      (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, s, thick)
    tx = max(0, min(x, w - tw - 2))
    ty = y - 4 if y - th - base - 4 >= 0 else min(y + bh + th + 4, h - base)
    cv2.rectangle(img, (tx, ty - th - 2), (tx + tw + 2, ty + base), (0, 255, 0), cv2.FILLED)
    cv2.putText(img, text, (tx + 1, ty), cv2.FONT_HERSHEY_SIMPLEX, s, (0, 0, 0), thick,
                cv2.LINE_AA)
  if not cv2.imwrite(path, img):
    raise OSError(f"cannot write {path}")
  return path
