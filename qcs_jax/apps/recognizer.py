"""Recognizer: faces and their expressions in an image, in one call.

  from qcs_jax import Recognizer
  rec = Recognizer.load("runs/qcs_rafdb")      # checkpoint dir or training workdir
  faces = rec.predict(image)                   # RGB uint8 array (bgr=True: OpenCV), PIL, path
  # [{"box": (x, y, w, h), "label": "Happiness", "score": 0.93,
  #   "probabilities": {...}, "landmarks": {"right_eye": (x, y), ...} | None,
  #   "detection_score": 0.94 | None}, ...]      largest face first
  rec.predict_faces(crops)                     # already-cropped faces, any size

Faces found by a detector with eye keypoints (BlazeFace) are eye-aligned like
the training faces (faces.aligned_crop); Haar boxes get the margin-padded
square crop. Every crop goes through the model's eval transform (resize to
img_size, ImageNet normalisation). The model runs on batches padded to a
power of two (1, 2, 4, ... max_batch), so a process compiles only the batch
sizes it meets, and JAX's persistent compilation cache (on by default,
runtime.enable_compilation_cache) makes a fresh process load them from disk.

The modules that import JAX (the model folder's loader, the compiled
programs) are imported by `_jax_side()` after `load` has started reading the
weights in a thread, so the read overlaps JAX's import (measured in
docs/BENCHMARKS.md, "Prediction start-up").
"""
from __future__ import annotations

import concurrent.futures
import os
import threading
from typing import Any, Iterable, Sequence

import numpy as np

from qcs_jax import runtime
from qcs_jax.apps import detectors, faces, user_images as images
from qcs_jax.data import transforms
from qcs_jax.model_files import weights_cache
from qcs_jax.model_files.locate import model_folder

Row = dict[str, Any]


def class_names_of(loaded: Any) -> list[str]:
  """The model's class names, or class_0.. when its checkpoint has none (or a wrong count)."""
  k = int(loaded.model_cfg.get("num_classes", 7))
  names = list(getattr(loaded, "class_names", None) or [])
  return names if len(names) == k else [f"class_{i}" for i in range(k)]


def softmax(logits: np.ndarray) -> np.ndarray:
  z = np.asarray(logits, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _jax_side() -> tuple[Any, Any]:
  """(model_dir, compiled_programs): they import JAX, so not at module top (see above)."""
  from qcs_jax.apps import compiled_programs  # pylint: disable=import-outside-toplevel
  from qcs_jax.model_files import model_dir  # pylint: disable=import-outside-toplevel
  return model_dir, compiled_programs


def bucket(n: int, max_batch: int) -> int:
  """The padded batch size for n faces: the next power of two, at most max_batch."""
  b = 1
  while b < n and b < max_batch:
    b *= 2
  return min(b, max_batch)


class Recognizer:
  """A loaded expression model plus a face detector; see the module docstring.

  Args:
    model: a checkpoint.LoadedModel (or anything with .logits(x), .model_cfg,
      .class_names).
    detector: 'auto' (BlazeFace if installed, else Haar), 'blazeface',
      'blazeface_short', 'haar', or a callable rgb -> [detectors.Detection].
    max_batch: most faces per model call.
    margin: crop margin (fraction of the box side) for faces without eye keypoints.
    min_face: smallest face side (px) reported; smaller images are refused.
    align: eye-align faces that have eye keypoints (False: margin crops for all).
    score_threshold: BlazeFace's minimum face score.
    tiles: BlazeFace also searches an n x n grid of overlapping tiles (smaller
      faces in large photos, n*n more detector passes; 0: the whole image only).
  """

  def __init__(self, model: Any, detector: Any = "auto", max_batch: int = 16,
               margin: float = 0.25, min_face: int = 40, align: bool = True,
               score_threshold: float = 0.5, tiles: int = 0):
    if max_batch < 1:
      raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if margin < 0:
      raise ValueError(f"margin must be >= 0, got {margin}")
    if min_face < 1:
      raise ValueError(f"min_face must be >= 1, got {min_face}")
    self.model = model
    self.img_size = int(model.model_cfg.get("img_size", 224))
    self.class_names = class_names_of(model)
    self.max_batch, self.margin, self.min_face, self.align = (
        int(max_batch), float(margin), int(min_face), bool(align))
    self.detector = (detector if callable(detector) else
                     detectors.get_detector(detector, self.min_face, score_threshold, tiles))
    self.detector_name = getattr(self.detector, "name", type(self.detector).__name__)
    self._transform = transforms.build_transform(None, self.img_size, train=False)
    self._lock = threading.Lock()
    self._unchecked: str | None = None  # checkpoint dir whose shapes were not checked
    self._program_dir: str | None = None  # where exported inference programs are kept
    self._programs: dict[int, Any] = {}
    self._pending: concurrent.futures.Future | None = None  # batch-1 program being loaded

  @classmethod
  def load(cls, path: str | os.PathLike, *, cache: bool | str = True,
           **kwargs: Any) -> "Recognizer":
    """A checkpoint directory or training workdir -> Recognizer (kwargs: see the class).

    cache: where compiled programs are kept (JAX's persistent compilation cache
    and the saved inference executables, compiled_programs.py): True (the per-user
    default, runtime.default_cache_dir), a folder, or False (neither).
    """
    directory = model_folder(path)
    # Start-up in parallel: the weights are read (or their uncompressed copy in the
    # cache mapped) while JAX is imported, and a saved batch-1 executable is loaded
    # while the detector is built.
    arrays = weights_cache.start(directory, runtime.cache_dir_for(cache))
    model_dir, compiled_programs = _jax_side()
    cache_dir = runtime.enable_compilation_cache(cache)
    # The shape check traces the whole model (a second at paper size): it runs only
    # if the model fails to run (classify_prepared), to explain why.
    loaded = model_dir.load_model(directory, check_shapes=False, arrays=arrays.result())
    pending = None
    if cache_dir:  # compiled programs (compiled_programs.py), beside JAX's compilation cache
      program_dir = os.path.join(cache_dir, "qcs_jax_programs")
      size = int(loaded.model_cfg.get("img_size", 224))
      pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qcs_program")
      pending = pool.submit(compiled_programs.load_compiled, loaded, 1, size, program_dir)
      pool.shutdown(wait=False)
    rec = cls(loaded, **kwargs)
    rec._unchecked = directory
    if cache_dir:
      rec._program_dir = program_dir
      rec._pending = pending
    return rec

  # --------------------------------------------------------------------------- model

  def prepare(self, crop: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 RGB face crop -> float32 (img_size, img_size, 3), the model's input."""
    return self._transform(crop, None, out=out)

  def classify_prepared(self, x: np.ndarray) -> np.ndarray:
    """float32 (N, S, S, 3) prepared faces -> probabilities (N, K), in padded batches."""
    n, out = len(x), []
    for i in range(0, n, self.max_batch):
      part = x[i:i + self.max_batch]
      b = bucket(len(part), self.max_batch)
      if b != len(part):
        part = np.concatenate([part, np.zeros((b - len(part),) + part.shape[1:], part.dtype)])
      with self._lock:
        logits = np.asarray(self._logits(part))
      out.append(softmax(logits)[:min(self.max_batch, n - i)])
    return np.concatenate(out) if out else np.zeros((0, len(self.class_names)))

  def _run(self, x: np.ndarray) -> Any:
    m = self.model
    model_dir, compiled_programs = _jax_side()
    if self._program_dir is None or not isinstance(m, model_dir.LoadedModel):
      return m.logits(x)
    b = len(x)
    if b == 1 and self._pending is not None:  # loaded in the background by load()
      found, self._pending = self._pending.result(), None
      if found is not None:
        self._programs[1] = found
    if b not in self._programs:
      self._programs[b] = compiled_programs.compiled_infer(m, b, self.img_size, self._program_dir)
    return self._programs[b](m.variables, np.asarray(x, np.float32))

  def _logits(self, x: np.ndarray) -> Any:
    if self._unchecked is None:
      return self._run(x)
    try:
      out = self._run(x)
    except Exception:  # a model that does not fit its variables: say which ones
      _jax_side()[0].check_variables(self.model, self._unchecked)
      raise
    self._unchecked = None
    return out

  def classify(self, crops: Sequence[np.ndarray]) -> np.ndarray:
    """uint8 RGB crops (any sizes) -> probabilities (N, K)."""
    x = np.zeros((len(crops), self.img_size, self.img_size, 3), np.float32)
    for i, c in enumerate(crops):
      self.prepare(c, out=x[i])
    return self.classify_prepared(x)

  def result(self, p: np.ndarray) -> Row:
    """One face's probabilities -> {label, score, probabilities}."""
    k = int(np.argmax(p))
    return {"label": self.class_names[k], "score": round(float(p[k]), 6),
            "probabilities": {c: round(float(v), 6) for c, v in zip(self.class_names, p)}}

  def warmup(self, batch_sizes: Iterable[int] = (1,)) -> None:
    """Compiles (or loads from the cache) the model at these padded batch sizes."""
    for b in batch_sizes:
      self.classify_prepared(np.zeros((b, self.img_size, self.img_size, 3), np.float32))

  # --------------------------------------------------------------------------- faces

  def detect(self, image: Any, bgr: bool = False) -> tuple[np.ndarray, list]:
    """(the image as uint8 RGB, its detections, largest first)."""
    rgb = images.to_rgb(image, bgr=bgr)
    h, w = rgb.shape[:2]
    if min(h, w) < self.min_face:
      raise images.ImageError(f"image is {w}x{h} pixels, smaller than min_face "
                              f"{self.min_face}")
    return rgb, list(self.detector(rgb))

  def crop(self, rgb: np.ndarray, det: detectors.Detection) -> np.ndarray:
    """The crop the model sees: eye-aligned if the detection has eyes, else a margin square."""
    marks = det.landmarks or {}
    if self.align and "right_eye" in marks and "left_eye" in marks:
      return faces.aligned_crop(rgb, marks["right_eye"], marks["left_eye"])
    return faces.face_crop(rgb, det.box, self.margin)

  @staticmethod
  def face_row(det: detectors.Detection) -> Row:
    return {"box": det.box.as_tuple(), "landmarks": det.landmarks,
            "detection_score": det.score}

  def predict(self, image: Any, bgr: bool = False) -> list[Row]:
    """Every face in one image with its expression; [] when no face is found.

    image: uint8 (H, W[, 1|3|4]) array (RGB, or BGR with bgr=True), other
    dtypes as in images.array_to_rgb, a PIL image, or a file path. Raises
    images.ImageError (a ValueError) for images it cannot use.
    """
    rgb, dets = self.detect(image, bgr=bgr)
    if not dets:
      return []
    probs = self.classify([self.crop(rgb, d) for d in dets])
    return [{**self.face_row(d), **self.result(p)} for d, p in zip(dets, probs)]

  def predict_faces(self, crops: Any, bgr: bool = False) -> list[Row]:
    """Already-cropped faces (one image or a sequence, any sizes) -> [{label, score,
    probabilities}], one per face.

    Each crop is resized to img_size and normalised as in evaluation.
    """
    single = isinstance(crops, (str, os.PathLike)) or (
        isinstance(crops, np.ndarray) and crops.ndim in (2, 3)) or hasattr(crops, "getexif")
    items = [crops] if single else list(crops)
    rgbs = []
    for i, c in enumerate(items):
      try:
        rgbs.append(images.to_rgb(c, bgr=bgr))
      except images.ImageError as e:
        raise images.ImageError(f"crop {i}: {e}") from e
    return [self.result(p) for p in self.classify(rgbs)]
