"""Face detectors on the real photos scikit-image ships: faces found, false boxes, ms/image.

  python tools/bench_detectors.py [--detectors blazeface,blazeface_short,haar] [--repeats 3]

Photos: astronaut and camera (one face each, boxes marked by hand below);
scikit-image's LFW subset (100 face and 100 non-face 25x25 crops, upscaled 4x
and laid out 5 x 5 on grey mosaics: 4 of faces, 4 of non-faces); and 17
photos without a person (cat, coffee, rocket, coins, text, ...). A face counts
as found when a box overlaps its marked box with IoU >= 0.3; every other box
is a false box.
"""
import argparse
import os
import time

import cv2
import numpy as np
import skimage.data

from qcs_jax.apps import detectors

# (x0, y0, x1, y1) of the faces, marked by hand.
HAND_MARKED = {"astronaut": [(170, 60, 275, 175)], "camera": [(180, 95, 262, 195)]}
NO_FACES = ("chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "coins", "page",
            "text", "brick", "grass", "gravel", "cell", "moon", "colorwheel", "logo",
            "clock", "immunohistochemistry")


def rgb(a: np.ndarray) -> np.ndarray:
  a = np.asarray(a)
  if a.dtype != np.uint8:
    a = np.round(np.clip(a, 0, 1) * 255).astype(np.uint8) if a.dtype.kind == "f" else (
        a.astype(np.uint8))
  return np.repeat(a[..., None], 3, -1) if a.ndim == 2 else a[..., :3]


def mosaics(crops: np.ndarray, face: bool) -> list[tuple[str, np.ndarray, list]]:
  """25 crops per 750x750 picture, each upscaled to 100x100 in a 150 px cell."""
  out = []
  for m in range(len(crops) // 25):
    canvas = np.full((750, 750, 3), 128, np.uint8)
    boxes = []
    for k in range(25):
      r, c = divmod(k, 5)
      big = cv2.resize(rgb(crops[m * 25 + k]), (100, 100), interpolation=cv2.INTER_CUBIC)
      x, y = c * 150 + 25, r * 150 + 25
      canvas[y:y + 100, x:x + 100] = big
      boxes.append((x, y, x + 100, y + 100))
    out.append((f"lfw_{'faces' if face else 'nonfaces'}_{m}", canvas, boxes if face else []))
  return out


def photo_set() -> list[tuple[str, np.ndarray, list]]:
  photos = [(n, rgb(getattr(skimage.data, n)()), HAND_MARKED[n]) for n in HAND_MARKED]
  lfw = skimage.data.lfw_subset()  # 100 faces, then 100 non-faces
  photos += mosaics(lfw[:100], True) + mosaics(lfw[100:], False)
  photos += [(n, rgb(getattr(skimage.data, n)()), []) for n in NO_FACES]
  return photos


def iou(a, b) -> float:
  x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
  inter = max(0, x1 - x0) * max(0, y1 - y0)
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union else 0.0


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--detectors", default="blazeface,blazeface:2,blazeface_short,haar",
                  help="names; name:N also searches an N x N grid of tiles")
  ap.add_argument("--repeats", type=int, default=3, help="timing runs per picture (best kept)")
  ap.add_argument("--min_face", type=int, default=20)
  args = ap.parse_args()
  photos = photo_set()
  n_faces = sum(len(b) for _, _, b in photos)
  print(f"{len(photos)} pictures, {n_faces} marked faces; {os.cpu_count()} CPU cores, "
        f"load average {os.getloadavg()[0]:.1f} at start")
  for name in args.detectors.split(","):
    base, _, tiles = name.partition(":")
    det = detectors.get_detector(base, min_face=args.min_face, tiles=int(tiles or 0))
    found = false = 0
    times, groups = [], {}
    for pname, img, marked in photos:
      best = float("inf")
      for _ in range(args.repeats):
        t0 = time.perf_counter()
        boxes = det(img)
        best = min(best, time.perf_counter() - t0)
      times.append(best)
      hits = set()
      for d in boxes:
        b = (d.box.x, d.box.y, d.box.x + d.box.w, d.box.y + d.box.h)
        match = [i for i, m in enumerate(marked) if iou(b, m) >= 0.3]
        if match:
          hits.add(match[0])
        else:
          false += 1
      found += len(hits)
      g = groups.setdefault(pname.rsplit("_", 1)[0] if pname.startswith("lfw") else (
          "hand-marked" if marked else "no person"), [0, 0, 0])
      g[0] += len(hits)
      g[1] += len(marked)
      g[2] += len(boxes) - len(hits)
    per = ", ".join(f"{k} {v[0]}/{v[1]} found, {v[2]} false" for k, v in groups.items())
    print(f"{name:16s} faces found {found}/{n_faces}, false boxes {false}, "
          f"{1000 * np.median(times):.1f} ms/picture median ({per})")
  print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
  main()
