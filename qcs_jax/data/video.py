"""Video frames that say when decoding stopped early (for `predict` on users' videos).

OpenCV's ``read()`` simply returns False both at the end of a video and at a
frame it cannot decode, so a damaged file looks like a short one.
`VideoFrames` compares the frames it read with the count the container
declares and, when decoding stopped early, leaves one line naming the file
and the frame in ``problem`` (the frames before it are still yielded).
"""
from __future__ import annotations

import os
from typing import Iterator

import cv2
import numpy as np

from qcs_jax.data.base import DataError

# Containers that estimate their frame count (from duration x fps) may overstate it a little.
_SLACK_FRACTION = 0.02
_SLACK_FRAMES = 2


class VideoFrames:
  """Iterates (frame index, time in s or None, uint8 RGB frame) of every `every`-th frame.

  Raises DataError (naming the file) when the video cannot be opened at all.
  After iteration: ``frames_read``, ``declared`` (container's frame count, 0 if
  unknown) and ``problem`` (None, or one line naming the file and frame).
  """

  def __init__(self, path: str, every: int = 1):
    if every < 1:
      raise ValueError(f"every must be >= 1, got {every}")
    self.path, self.every = os.fspath(path), every
    self.frames_read = 0
    self.declared = 0
    self.problem: str | None = None

  def __iter__(self) -> Iterator[tuple[int, float | None, np.ndarray]]:
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # no per-packet ffmpeg noise
    if not os.path.isfile(self.path):
      raise DataError(f"{self.path}: no such video file")
    if os.path.getsize(self.path) == 0:
      raise DataError(f"{self.path}: empty file (0 bytes), not a video")
    cap = cv2.VideoCapture(self.path)
    try:
      if not cap.isOpened():
        raise DataError(f"{self.path}: cannot open this video (unknown format or codec, "
                        "or a damaged header)")
      fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
      self.declared = max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0))
      i = 0
      while True:
        wanted = i % self.every == 0
        ok, frame = cap.read() if wanted else (cap.grab(), None)
        if not ok:
          break
        self.frames_read = i + 1
        if wanted:
          t = round(i / fps, 4) if fps > 0 else None
          yield i, t, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        i += 1
      self.problem = self._stopped_early(i)
    finally:
      cap.release()

  def _stopped_early(self, stopped_at: int) -> str | None:
    slack = max(_SLACK_FRAMES, int(_SLACK_FRACTION * self.declared))
    if self.declared and stopped_at < self.declared - slack:
      return (f"{self.path}: frame {stopped_at} of {self.declared} could not be decoded; "
              f"the remaining {self.declared - stopped_at} frames were skipped (damaged or "
              "truncated file)")
    return None
