"""qcs-predict: expressions in your own photos and videos (a thin CLI over qcs_jax.Recognizer).

  qcs-predict --checkpoint runs/rafdb_qcs photo.jpg folder/ clip.mp4 \
      [--detector auto|blazeface|blazeface_short|haar] [--detector_tiles N] \
      [--no-detect] [--no-align] \
      [--format jsonl|csv] [--output FILE] [--annotate DIR] [--every K] \
      [--margin 0.25] [--min_face 40] [--batch_size 16] [--no-cache]
  qcs-predict --benchmark [--checkpoint DIR]

Photos (jpg/png/bmp/webp/tif, turned upright by their EXIF orientation) and
videos (mp4/avi/mov/mkv/webm, every K-th frame) are searched for faces with
BlazeFace (--detector auto, when its model file is installed; else OpenCV's
Haar cascade). Faces with eye keypoints are eye-aligned like the training
faces, others cropped to a margin-padded square; each crop is resized and
normalised by the eval transform of the model's img_size and classified.
--no-detect treats every image (frame) as one cropped face. Decoding and
detection run in a background thread while the model classifies batches of
faces gathered across frames. Compiled programs are kept in JAX's persistent
cache (~/.cache/qcs_jax/xla; --no-cache or QCS_JAX_CACHE_DIR=0 turn it off).
One output row per face: file, frame, time (s), face, box (x, y, w, h), label,
score and the probability of every class (jsonl rows also carry landmarks and
the detector's score). Problems (unreadable file, no face, tiny image) are
reported on stderr and skipped; the exit status is non-zero only when no face
at all could be classified.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from typing import Sequence

from qcs_jax import runtime
from qcs_jax.apps import detectors
from qcs_jax.apps.predict_files import predict_paths
from qcs_jax.apps.recognizer import Recognizer
from qcs_jax.model_files.locate import CheckpointError

FORMATS = ("jsonl", "csv")


def _stderr(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)




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
  ap = argparse.ArgumentParser(prog="qcs-predict",
                               description=__doc__.split("\n\n")[0])
  ap.add_argument("paths", nargs="*", help="photos, videos and folders of them")
  ap.add_argument("--checkpoint", help="checkpoint dir or training workdir (its best/)")
  ap.add_argument("--detector", choices=detectors.DETECTORS, default="auto",
                  help="face detector (auto: BlazeFace if installed, else Haar)")
  ap.add_argument("--detector_tiles", type=int, default=0, metavar="N",
                  help="BlazeFace also searches an N x N grid of tiles (small faces in "
                       "large photos; N*N more detector passes)")
  ap.add_argument("--no-detect", dest="detect", action="store_false",
                  help="each picture is already a cropped face (no face detection)")
  ap.add_argument("--no-align", dest="align", action="store_false",
                  help="margin-padded box crops instead of eye-aligned crops")
  ap.add_argument("--format", choices=FORMATS, default=None,
                  help="output format (default: csv for a .csv --output, else jsonl)")
  ap.add_argument("--output", help="output file (default: stdout)")
  ap.add_argument("--annotate", metavar="DIR", help="write annotated pictures into DIR")
  ap.add_argument("--every", type=int, default=1, metavar="K", help="every K-th video frame")
  ap.add_argument("--margin", type=float, default=0.25,
                  help="crop margin on each side, fraction of the detected box (Haar)")
  ap.add_argument("--min_face", type=int, default=40, help="smallest face side in pixels")
  ap.add_argument("--batch_size", type=int, default=16, help="most faces per model call")
  ap.add_argument("--no-cache", dest="cache", action="store_false",
                  help="do not use JAX's persistent compilation cache")
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
  for name, low in (("every", 1), ("min_face", 1), ("batch_size", 1), ("detector_tiles", 0)):
    if getattr(args, name) < low:
      ap.error(f"--{name} must be >= {low}, got {getattr(args, name)}")
  if args.margin < 0:
    ap.error(f"--margin must be >= 0, got {args.margin}")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  if args.benchmark:
    if args.cache:
      runtime.enable_compilation_cache()
    # throughput imports JAX, which the prediction path below must not import before
    # Recognizer.load has started reading the weights (see apps/recognizer.py).
    from qcs_jax.apps import throughput  # pylint: disable=import-outside-toplevel
    sizes = [int(s) for s in args.benchmark_batch_sizes.split(",") if s]
    throughput.print_benchmark(args.checkpoint, sizes, args.benchmark_seconds)
    return 0
  # Nothing here may import JAX before Recognizer.load: it starts reading the
  # weights in a thread first, so the read overlaps JAX's import (docs/BENCHMARKS.md).
  try:
    rec = Recognizer.load(args.checkpoint, cache=args.cache,
                          detector=args.detector if args.detect else "haar",
                          max_batch=args.batch_size, margin=args.margin,
                          min_face=args.min_face, align=args.align,
                          tiles=args.detector_tiles)
  except (ValueError, detectors.DetectorUnavailable, OSError) as e:
    if isinstance(e, ValueError) and not isinstance(e, CheckpointError):
      raise
    _stderr(f"error: {e}")
    return 2
  problems = []

  def report(msg: str) -> None:
    problems.append(msg)
    _stderr(msg)

  rows = predict_paths(args.paths, rec, args.detect, args.every, annotate_dir=args.annotate,
                       on_problem=report)
  fmt = args.format or ("csv" if (args.output or "").lower().endswith(".csv") else "jsonl")
  text = format_rows(rows, fmt, rec.class_names)
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
  code = main()
  # Every result is written and closed by now: leave without Python's and XLA's
  # teardown (freeing the weights, the runtime's thread pools; docs/BENCHMARKS.md).
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


if __name__ == "__main__":
  run()
