"""Face crops: Haar detection, margin-padded square crops, eye-aligned crops.

The training data sets hold aligned faces: roughly square crops from the
forehead to the chin. A Haar box covers the eyebrows to the mouth, so a crop
adds `margin` of the box size on every side (0.25: a square 1.5x the box),
centred on the box; parts outside the image are filled with black.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import cv2
import numpy as np

CASCADE = "haarcascade_frontalface_default.xml"


@dataclasses.dataclass(frozen=True)
class Box:
  """A face box in pixels of the full image: left x, top y, width w, height h."""

  x: int
  y: int
  w: int
  h: int

  def as_tuple(self) -> tuple[int, int, int, int]:
    return (self.x, self.y, self.w, self.h)


@functools.lru_cache(maxsize=None)
def _cascade(path: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"face detector model {path} not found (opencv-python(-headless) "
                            f"ships it under cv2.data.haarcascades)")
  clf = cv2.CascadeClassifier(path)
  if clf.empty():
    raise ValueError(f"OpenCV could not load the face detector {path}")
  return clf


def cascade_path() -> str:
  return os.path.join(cv2.data.haarcascades, CASCADE)


def detect_faces(image: np.ndarray, min_face: int = 40, scale_factor: float = 1.1,
                 min_neighbors: int = 5) -> list[Box]:
  """Frontal faces in a uint8 RGB (H, W, 3) or grayscale image, largest first.

  min_face: the smallest face side in pixels that is searched for.
  """
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"detect_faces expects a uint8 image, got {image.dtype}")
  gray = image if image.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(image),
                                                    cv2.COLOR_RGB2GRAY)
  gray = cv2.equalizeHist(gray)
  found = _cascade(cascade_path()).detectMultiScale(
      gray, scaleFactor=scale_factor, minNeighbors=min_neighbors,
      minSize=(int(min_face), int(min_face)))
  boxes = [Box(*(int(v) for v in b)) for b in np.reshape(found, (-1, 4))]
  return sorted(boxes, key=lambda b: (-b.w * b.h, b.x, b.y))


def square_crop_box(box: Box, margin: float) -> Box:
  """The square around `box` with `margin` x its longer side added on each side."""
  if margin < 0:
    raise ValueError(f"margin must be >= 0, got {margin}")
  side = int(round(max(box.w, box.h) * (1.0 + 2.0 * margin)))
  cx, cy = box.x + box.w / 2.0, box.y + box.h / 2.0
  return Box(int(round(cx - side / 2.0)), int(round(cy - side / 2.0)), side, side)


def crop(image: np.ndarray, box: Box) -> np.ndarray:
  """image[box] with the parts outside the image filled with zeros (black)."""
  h, w = image.shape[:2]
  out = np.zeros((box.h, box.w) + image.shape[2:], image.dtype)
  x0, y0 = max(box.x, 0), max(box.y, 0)
  x1, y1 = min(box.x + box.w, w), min(box.y + box.h, h)
  if x1 > x0 and y1 > y0:
    out[y0 - box.y:y1 - box.y, x0 - box.x:x1 - box.x] = image[y0:y1, x0:x1]
  return out


def face_crop(image: np.ndarray, box: Box, margin: float = 0.25) -> np.ndarray:
  """The square, margin-padded crop of a detected face (uint8, side x side)."""
  return crop(image, square_crop_box(box, margin))


# ----------------------------------------------------------------------------- alignment
# Aligned training faces (RAF-DB's 100x100 "aligned" set and the like) are
# similarity-aligned on facial landmarks: eyes level, at a fixed height and
# distance. ALIGN_EYE_Y / ALIGN_EYE_DISTANCE place the eye centres as the common
# 5-point face template does (112x112 crops: eyes at y 51.6, x 38.3 and 73.5),
# a tight forehead-to-chin square; they are fractions of the output side.
ALIGN_EYE_Y = 0.46
ALIGN_EYE_DISTANCE = 0.315


def eye_alignment(right_eye: tuple[float, float], left_eye: tuple[float, float], side: int,
                  eye_y: float = ALIGN_EYE_Y, eye_distance: float = ALIGN_EYE_DISTANCE
                  ) -> np.ndarray:
  """The 2x3 similarity that maps the subject's right eye to (0.5 - d/2, eye_y) x side and
  the left eye to (0.5 + d/2, eye_y) x side: eyes level, centred, d x side apart."""
  r, l = np.asarray(right_eye, np.float64), np.asarray(left_eye, np.float64)
  d = l - r
  dist = float(np.hypot(*d))
  if dist < 1e-6:
    raise ValueError(f"eyes at the same point {tuple(r)}: cannot align")
  s = eye_distance * side / dist
  c, si = d / dist
  rot = s * np.array([[c, si], [-si, c]])
  centre = (r + l) / 2.0
  t = np.array([0.5 * side, eye_y * side]) - rot @ centre
  return np.concatenate([rot, t[:, None]], axis=1)


def aligned_crop(image: np.ndarray, right_eye: tuple[float, float],
                 left_eye: tuple[float, float], max_side: int = 448) -> np.ndarray:
  """The eye-aligned square face crop (uint8), black outside the image.

  Its side is the face's own resolution (eye distance / ALIGN_EYE_DISTANCE),
  at most max_side and at least 16 px, so the model's resize to img_size
  (PIL bilinear with antialiasing, as in training) does the scaling.
  """
  dist = float(np.hypot(*(np.asarray(left_eye, float) - np.asarray(right_eye, float))))
  side = int(np.clip(round(dist / ALIGN_EYE_DISTANCE), 16, max_side))
  m = eye_alignment(right_eye, left_eye, side)
  return cv2.warpAffine(np.ascontiguousarray(image), m, (side, side), flags=cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
