"""Faces in folders of photos and in videos: decoding and detection overlap the model.

A background thread (media.read_ahead) reads each photo or sampled video
frame, finds its faces, crops and normalises them; the calling thread
gathers the faces of consecutive pictures (across frames and files) into
batches of up to `batch_size` and runs the model, so decoding and detection of
the next pictures overlap the current batch.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from qcs_jax.apps import annotate, faces, media, user_images as images
from qcs_jax.apps.detectors import Detection
from qcs_jax.apps.recognizer import Recognizer
from qcs_jax.data.base import DataError
from qcs_jax.data.video import VideoFrames


def _stderr(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


@dataclasses.dataclass
class _Picture:
  path: str
  frame: int | None
  time: float | None
  image: np.ndarray | None       # kept only for annotation
  detections: list[Detection]
  x: np.ndarray                  # float32 (n, S, S, 3) prepared faces


class _Producer:
  """Everything before the model, run in the background thread: yields _Picture or str problems."""

  def __init__(self, rec: Any, detect: bool, every: int, keep_images: bool):
    self.rec, self.detect, self.every, self.keep_images = rec, detect, every, keep_images

  def picture(self, image: Any, path: str, frame: int | None,
              t: float | None) -> _Picture | str:
    rec = self.rec
    try:
      rgb = images.to_rgb(image)
    except images.ImageError as e:
      return str(e)
    h, w = rgb.shape[:2]
    if min(h, w) < rec.min_face:
      return f"image is {w}x{h} pixels, smaller than --min_face {rec.min_face}: skipped"
    if self.detect:
      dets = list(rec.detector(rgb))
      if not dets:
        return (f"no face found (faces smaller than --min_face {rec.min_face} px are not "
                f"searched; use --no-detect for an already cropped face)")
      crops = [rec.crop(rgb, d) for d in dets]
    else:
      dets, crops = [Detection(faces.Box(0, 0, w, h))], [rgb]
    x = np.zeros((len(crops), rec.img_size, rec.img_size, 3), np.float32)
    for i, c in enumerate(crops):
      rec.prepare(c, out=x[i])
    return _Picture(path, frame, t, rgb if self.keep_images else None, dets, x)

  def photo(self, path: str) -> Iterator[_Picture | str]:
    try:
      image = images.read_image(path)
    except DataError as e:
      yield str(e)
      return
    out = self.picture(image, path, None, None)
    yield f"{path}: {out}" if isinstance(out, str) else out

  def video(self, path: str) -> Iterator[_Picture | str]:
    sampled, missed, first = 0, 0, None
    frames = VideoFrames(path, self.every)
    try:
      for i, t, frame in frames:
        sampled += 1
        out = self.picture(frame, path, i, t)
        if isinstance(out, str):
          missed += 1
          first = first or f"frame {i}: {out}"
        else:
          yield out
    except DataError as e:
      yield str(e)
      return
    if not sampled:
      yield f"{path}: no frames could be read from this video"
    elif missed:
      yield f"{path}: {missed} of {sampled} sampled frames gave no prediction (first: {first})"
    if frames.problem:
      yield frames.problem

  def __call__(self, paths: Sequence[str]) -> Iterator[_Picture | str]:
    problems: list[str] = []
    inputs = media.find_inputs(paths, problems.append)
    yield from problems
    for path in inputs:
      yield from (self.video(path) if media.is_video(path) else self.photo(path))


def predict_paths(paths: Sequence[str], model: Any, detect: bool = True, every: int = 1,
                  margin: float = 0.25, min_face: int = 40, batch_size: int = 16,
                  annotate_dir: str | None = None,
                  on_problem: Callable[[str], None] = _stderr, detector: Any = "auto",
                  read_ahead: int = 8) -> list[dict]:
  """Classifies every face in the photos and videos under `paths`.

  Args:
    paths: files and folders (searched recursively for photos and videos).
    model: a Recognizer, a checkpoint directory / training workdir, or a
      loaded model (checkpoint.LoadedModel); for the last two the Recognizer
      is built from detector, margin, min_face and batch_size.
    detect: find faces; False: each picture is one face.
    every: use every k-th video frame.
    annotate_dir: folder for annotated copies of the pictures (None: none).
    on_problem: receives one message per problem (default: printed on stderr).
    read_ahead: pictures decoded and detected ahead of the model (0: no thread).

  Returns:
    One dict per face, in input order: file, frame (None for photos), time (s,
    None for photos), face (index in its picture, largest first), box [x, y, w,
    h], landmarks, detection_score, label, score, probabilities {class: p}.
  """
  if every < 1:
    raise ValueError(f"--every must be >= 1, got {every}")
  if isinstance(model, Recognizer):
    rec = model
  else:
    if isinstance(model, str) or hasattr(model, "__fspath__"):
      model = Recognizer.load(model).model
    rec = Recognizer(model, detector=detector if detect else "haar", max_batch=batch_size,
                     margin=margin, min_face=min_face)
  annotator = annotate.Annotator(annotate_dir) if annotate_dir else None
  stream = _Producer(rec, detect, every, annotator is not None)(paths)
  if read_ahead > 0:
    stream = media.read_ahead(stream, read_ahead)
  rows: list[dict] = []
  pending: list[_Picture] = []

  def flush() -> None:
    if not pending:
      return
    probs = rec.classify_prepared(np.concatenate([p.x for p in pending]))
    k = 0
    for p in pending:
      pic_rows = []
      for i, d in enumerate(p.detections):
        pic_rows.append({"file": p.path, "frame": p.frame, "time": p.time, "face": i,
                         "box": list(d.box.as_tuple()), "landmarks": d.landmarks,
                         "detection_score": d.score, **rec.result(probs[k])})
        k += 1
      rows.extend(pic_rows)
      if annotator is not None:
        annotator.add(p.image, pic_rows, p.path, p.frame)
        annotator.write_ready()
    pending.clear()

  for item in stream:
    if isinstance(item, str):
      on_problem(item)
      continue
    pending.append(item)
    if sum(len(p.x) for p in pending) >= rec.max_batch:
      flush()
  flush()
  return rows


class BatchedClassifier:
  """Queues face crops and classifies them in batches (kept for callers of the old predict).

  `add(face, row)` prepares the uint8 crop and queues it; when `batch_size`
  faces are queued (or on `flush()`) each queued row gets label, score and
  probabilities, then `on_done(rows)` is called. New code: Recognizer.
  """

  def __init__(self, loaded: Any, batch_size: int = 16,
               on_done: Callable[[list[dict]], None] | None = None):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.rec = Recognizer(loaded, detector="haar", max_batch=batch_size)
    self.batch_size, self.img_size = int(batch_size), self.rec.img_size
    self.class_names, self.on_done = self.rec.class_names, on_done
    self._images = np.zeros((self.batch_size, self.img_size, self.img_size, 3), np.float32)
    self._rows: list[dict] = []

  def add(self, face: np.ndarray, row: dict) -> None:
    self.rec.prepare(face, out=self._images[len(self._rows)])
    self._rows.append(row)
    if len(self._rows) == self.batch_size:
      self.flush()

  def flush(self) -> None:
    n = len(self._rows)
    if not n:
      return
    probs = self.rec.classify_prepared(self._images[:n])
    rows, self._rows = self._rows, []
    for row, p in zip(rows, probs):
      row.update(self.rec.result(p))
    if self.on_done:
      self.on_done(rows)
