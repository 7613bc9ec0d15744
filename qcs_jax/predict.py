"""Expression prediction on your own photos and videos.

  python -m qcs_jax.predict --checkpoint runs/rafdb photo.jpg folder/ clip.mp4 \
      [--no-detect] [--format jsonl|csv] [--output FILE] [--annotate DIR] \
      [--every K] [--margin 0.25] [--min_face 40] [--batch_size 16]
  python -m qcs_jax.predict --benchmark [--checkpoint DIR]

Photos (jpg/png/bmp/webp) and videos (mp4/avi/mov/mkv, every K-th frame) are
searched for frontal faces with OpenCV's Haar cascade; each face is cropped to
a margin-padded square like the aligned training faces, resized and
normalised by the eval transform of the model's img_size and classified by the
inference path. --no-detect treats every image (frame) as one cropped face.
One output row per face: file, frame, time (s), face, box (x, y, w, h), label,
score and the probability of every class. Problems (unreadable file, no face,
tiny image) are reported on stderr and skipped; the exit status is non-zero
only when no face at all could be classified.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import sys
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from qcs_jax import runtime
from qcs_jax.apps import faces, throughput
from qcs_jax.data.sources import DataError
# Re-exported: the tests give their models random weights through this module.
from qcs_jax.apps.throughput import benchmark, random_variables  # pylint: disable=unused-import

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv")
FORMATS = ("jsonl", "csv")


def _stderr(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- inputs


def find_inputs(paths: Sequence[str], on_problem: Callable[[str], None] = _stderr) -> list[str]:
  """Files as given, folders expanded (recursively, sorted) to their photos and videos."""
  out = []
  for p in paths:
    if os.path.isdir(p):
      found = []
      for dirpath, dirnames, filenames in os.walk(p):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if not f.startswith(".") and
                  f.lower().endswith(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)]
      if not found:
        on_problem(f"{p}: no photos ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) or videos "
                   f"({'/'.join(e[1:] for e in VIDEO_EXTENSIONS)}) in this folder")
      out += found
    elif os.path.isfile(p):
      out.append(p)
    else:
      on_problem(f"{p}: no such file or folder")
  return out


def is_video(path: str) -> bool:
  return path.lower().endswith(VIDEO_EXTENSIONS)


def read_image(path: str) -> np.ndarray:
  """uint8 RGB (H, W, 3), turned upright by its EXIF orientation; DataError if unreadable."""
  from PIL import Image, ImageOps  # pylint: disable=import-outside-toplevel
  try:
    with Image.open(path) as im:
      im = ImageOps.exif_transpose(im)
      return np.asarray(im.convert("RGB"), np.uint8)
  except FileNotFoundError as e:
    raise DataError(f"{path}: no such file") from e
  except Exception as e:  # PIL raises many types for corrupt data
    raise DataError(f"{path}: cannot read this image ({type(e).__name__}: {e})") from e


def video_frames(path: str, every: int = 1) -> Iterator[tuple[int, float | None, np.ndarray]]:
  """(frame index, time in s, uint8 RGB frame) of every `every`-th frame.

  Raises DataError if the video cannot be opened. The time is index / fps
  (None when the container reports no frame rate).
  """
  import cv2  # pylint: disable=import-outside-toplevel
  if every < 1:
    raise ValueError(f"every must be >= 1, got {every}")
  cap = cv2.VideoCapture(path)
  try:
    if not cap.isOpened():
      raise DataError(f"{path}: cannot open this video (unknown format or codec)")
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    i = 0
    while True:
      if i % every:
        if not cap.grab():
          break
      else:
        ok, frame = cap.read()
        if not ok:
          break
        t = round(i / fps, 4) if fps > 0 else None
        yield i, t, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
      i += 1
  finally:
    cap.release()


# ----------------------------------------------------------------------------- model


def class_names_of(loaded: Any) -> list[str]:
  k = int(loaded.model_cfg.get("num_classes", 7))
  names = list(loaded.class_names or [])
  return names if len(names) == k else [f"class_{i}" for i in range(k)]


class BatchedClassifier:
  """Queues faces and classifies them in fixed-size batches (one compilation).

  `add(image, row)` transforms the uint8 face crop and queues it; when
  `batch_size` faces are queued (or on `flush()`) the batch, padded with zeros
  to batch_size, runs through `loaded.logits` and each queued row gets label,
  score and probabilities. `on_done(rows)` is called after each batch.
  """

  def __init__(self, loaded: Any, batch_size: int = 16,
               on_done: Callable[[list[dict]], None] | None = None):
    from qcs_jax.data import transforms  # pylint: disable=import-outside-toplevel
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.loaded = loaded
    self.batch_size = int(batch_size)
    self.img_size = int(loaded.model_cfg.get("img_size", 224))
    self.transform = transforms.build_transform(None, self.img_size, train=False)
    self.class_names = class_names_of(loaded)
    self.on_done = on_done
    self._images = np.zeros((self.batch_size, self.img_size, self.img_size, 3), np.float32)
    self._rows: list[dict] = []

  def add(self, face: np.ndarray, row: dict) -> None:
    self.transform(face, None, out=self._images[len(self._rows)])
    self._rows.append(row)
    if len(self._rows) == self.batch_size:
      self.flush()

  def flush(self) -> None:
    n = len(self._rows)
    if not n:
      return
    self._images[n:] = 0.0
    logits = np.asarray(self.loaded.logits(self._images), np.float64)[:n]
    z = np.exp(logits - logits.max(-1, keepdims=True))
    probs = z / z.sum(-1, keepdims=True)
    rows, self._rows = self._rows, []
    for row, p in zip(rows, probs):
      k = int(np.argmax(p))
      row.update(label=self.class_names[k], score=round(float(p[k]), 6),
                 probabilities={c: round(float(v), 6) for c, v in zip(self.class_names, p)})
    if self.on_done:
      self.on_done(rows)


# ----------------------------------------------------------------------------- annotation


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
  import cv2  # pylint: disable=import-outside-toplevel
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


# ----------------------------------------------------------------------------- prediction


@dataclasses.dataclass
class _Run:
  """Per-call state of predict_paths."""

  classifier: BatchedClassifier
  annotator: Annotator | None
  detect: bool
  margin: float
  min_face: int
  on_problem: Callable[[str], None]
  rows: list = dataclasses.field(default_factory=list)

  def picture(self, image: np.ndarray, path: str, frame: int | None,
              t: float | None) -> str | None:
    """Queues the faces of one picture; returns a problem description or None."""
    h, w = image.shape[:2]
    if min(h, w) < self.min_face:
      return f"image is {w}x{h} pixels, smaller than --min_face {self.min_face}: skipped"
    if self.detect:
      boxes = faces.detect_faces(image, self.min_face)
      if not boxes:
        return (f"no face found (faces smaller than --min_face {self.min_face} px are not "
                f"searched; use --no-detect for an already cropped face)")
      crops = [faces.face_crop(image, b, self.margin) for b in boxes]
    else:
      boxes, crops = [faces.Box(0, 0, w, h)], [image]
    rows = [{"file": path, "frame": frame, "time": t, "face": i, "box": list(b.as_tuple())}
            for i, b in enumerate(boxes)]
    self.rows += rows
    if self.annotator is not None:
      self.annotator.add(image, rows, path, frame)
    for crop, row in zip(crops, rows):
      self.classifier.add(crop, row)
    return None

  def photo(self, path: str) -> None:
    try:
      image = read_image(path)
    except DataError as e:
      self.on_problem(str(e))
      return
    problem = self.picture(image, path, None, None)
    if problem:
      self.on_problem(f"{path}: {problem}")

  def video(self, path: str, every: int) -> None:
    sampled, missed, first = 0, 0, None
    try:
      for i, t, frame in video_frames(path, every):
        sampled += 1
        problem = self.picture(frame, path, i, t)
        if problem:
          missed += 1
          first = first or f"frame {i}: {problem}"
    except DataError as e:
      self.on_problem(str(e))
      return
    if not sampled:
      self.on_problem(f"{path}: no frames could be read from this video")
    elif missed:
      self.on_problem(f"{path}: {missed} of {sampled} sampled frames gave no prediction "
                      f"(first: {first})")


def predict_paths(paths: Sequence[str], model: Any, detect: bool = True, every: int = 1,
                  margin: float = 0.25, min_face: int = 40, batch_size: int = 16,
                  annotate: str | None = None,
                  on_problem: Callable[[str], None] = _stderr) -> list[dict]:
  """Classifies every face in the photos and videos under `paths`.

  Args:
    paths: files and folders (searched recursively for photos and videos).
    model: a checkpoint directory / training workdir, or a loaded model
      (checkpoint.LoadedModel or anything with .logits, .model_cfg, .class_names).
    detect: find faces with the Haar cascade; False: each picture is one face.
    every: use every k-th video frame.
    margin: crop margin around a detected face, as a fraction of its box side.
    min_face: smallest face side searched (px); smaller pictures are skipped.
    batch_size: faces per model call (fixed: one compilation).
    annotate: folder for annotated copies of the pictures (None: none).
    on_problem: receives one message per problem (default: printed on stderr).

  Returns:
    One dict per face, in input order: file, frame (None for photos), time (s,
    None for photos), face (index in its picture, largest first), box [x, y, w,
    h], label, score, probabilities {class name: p}.
  """
  if isinstance(model, (str, os.PathLike)):
    from qcs_jax.evaluate import load_checkpoint  # pylint: disable=import-outside-toplevel
    model = load_checkpoint(str(model))
  if every < 1:
    raise ValueError(f"--every must be >= 1, got {every}")
  if min_face < 1:
    raise ValueError(f"--min_face must be >= 1, got {min_face}")
  if margin < 0:
    raise ValueError(f"--margin must be >= 0, got {margin}")
  annotator = Annotator(annotate) if annotate else None
  on_done = (lambda rows: annotator.write_ready()) if annotator else None
  run = _Run(BatchedClassifier(model, batch_size, on_done), annotator, detect, margin,
             int(min_face), on_problem)
  for path in find_inputs(paths, on_problem):
    if is_video(path):
      run.video(path, every)
    else:
      run.photo(path)
  run.classifier.flush()
  if annotator:
    annotator.write_ready()
  return run.rows


# ----------------------------------------------------------------------------- output


def format_rows(rows: list[dict], fmt: str, class_names: Sequence[str]) -> str:
  """JSON lines, or CSV: file, frame, time, face, x, y, w, h, label, score, p_<class>..."""
  if fmt == "jsonl":
    return "".join(json.dumps(r) + "\n" for r in rows)
  if fmt != "csv":
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["file", "frame", "time", "face", "x", "y", "w", "h", "label", "score"]
             + [f"p_{c}" for c in class_names])
  blank = lambda v: "" if v is None else v  # noqa: E731
  for r in rows:
    w.writerow([r["file"], blank(r["frame"]), blank(r["time"]), r["face"], *r["box"],
                r["label"], r["score"]] + [r["probabilities"][c] for c in class_names])
  return buf.getvalue()


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(prog="python -m qcs_jax.predict",
                               description=__doc__.split("\n\n")[0])
  ap.add_argument("paths", nargs="*", help="photos, videos and folders of them")
  ap.add_argument("--checkpoint", help="checkpoint dir or training workdir (its best/)")
  ap.add_argument("--no-detect", dest="detect", action="store_false",
                  help="each picture is already a cropped face (no face detection)")
  ap.add_argument("--format", choices=FORMATS, default=None,
                  help="output format (default: csv for a .csv --output, else jsonl)")
  ap.add_argument("--output", help="output file (default: stdout)")
  ap.add_argument("--annotate", metavar="DIR", help="write annotated pictures into DIR")
  ap.add_argument("--every", type=int, default=1, metavar="K", help="every K-th video frame")
  ap.add_argument("--margin", type=float, default=0.25,
                  help="crop margin on each side, fraction of the detected box")
  ap.add_argument("--min_face", type=int, default=40, help="smallest face side in pixels")
  ap.add_argument("--batch_size", type=int, default=16, help="faces per model call")
  ap.add_argument("--benchmark", action="store_true",
                  help="measure inference images/s at batch 1 and 64 (the paper's QCS with "
                       "random weights, or --checkpoint) and exit")
  ap.add_argument("--benchmark_batch_sizes", default="1,64")
  ap.add_argument("--benchmark_seconds", type=float, default=5.0)
  args = ap.parse_args(argv)
  if not args.benchmark:
    if not args.checkpoint:
      ap.error("--checkpoint is required")
    if not args.paths:
      ap.error("give at least one photo, video or folder")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  if args.benchmark:
    sizes = [int(s) for s in args.benchmark_batch_sizes.split(",") if s]
    throughput.print_benchmark(args.checkpoint, sizes, args.benchmark_seconds)
    return 0
  from qcs_jax.evaluate import load_checkpoint  # pylint: disable=import-outside-toplevel
  from qcs_jax.checkpoint import CheckpointError  # pylint: disable=import-outside-toplevel
  try:
    loaded = load_checkpoint(args.checkpoint)
  except (CheckpointError, OSError) as e:
    _stderr(f"error: {e}")
    return 2
  problems = []

  def report(msg: str) -> None:
    problems.append(msg)
    _stderr(msg)

  rows = predict_paths(args.paths, loaded, args.detect, args.every, args.margin,
                       args.min_face, args.batch_size, args.annotate, report)
  fmt = args.format or ("csv" if (args.output or "").lower().endswith(".csv") else "jsonl")
  text = format_rows(rows, fmt, class_names_of(loaded))
  if args.output:
    with open(args.output, "w", newline="") as f:
      f.write(text)
  else:
    sys.stdout.write(text)
  files = len({r["file"] for r in rows})
  _stderr(f"{len(rows)} faces classified in {files} files; {len(problems)} problems"
          + (f"; wrote {args.output}" if args.output else ""))
  if not rows:
    _stderr("error: nothing could be classified")
    return 1
  return 0


def run() -> None:
  """Console script `qcs-predict`."""
  runtime.set_cpu_xla_defaults()
  sys.exit(main())


if __name__ == "__main__":
  run()
