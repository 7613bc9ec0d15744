"""Prediction speed: cold / warm start-to-first-result, ms per photo, video frames/s.

  python tools/time_predict.py --checkpoint DIR [--checkpoint DIR2] [--runs 3] \
      [--compare_pythonpath /other/checkout]

For each checkpoint: the wall time of `python -m qcs_jax.cli.predict --checkpoint
DIR astronaut.jpg` in a fresh process with an empty compilation cache (cold)
and again with the cache it left (warm); then, in this process,
Recognizer.predict on that photo (one face) and predict_paths on a generated
video (120 frames, 640x480, the astronaut panning; every frame) with and
without the read-ahead thread. --compare_pythonpath times another checkout's
predict (e.g. before these changes) interleaved with the cold runs.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np
import skimage.data
from PIL import Image


def write_inputs(folder: str) -> tuple[str, str]:
  photo = os.path.join(folder, "astronaut.jpg")
  Image.fromarray(skimage.data.astronaut()).save(photo, quality=95)
  video = os.path.join(folder, "pan.avi")
  big = cv2.resize(cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR), (900, 900))
  out = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (640, 480))
  for i in range(120):
    x = int(130 + 100 * np.sin(i / 12))
    out.write(np.ascontiguousarray(big[60:540, x:x + 640]))
  out.release()
  return photo, video


def run_cli(checkpoint: str, photo: str, cache: str, pythonpath: str) -> float:
  env = dict(os.environ, QCS_JAX_CACHE_DIR=cache, PYTHONPATH=pythonpath)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  t0 = time.perf_counter()
  subprocess.run([sys.executable, "-m", "qcs_jax.cli.predict", "--checkpoint", checkpoint, photo],
                 env=env, check=True, capture_output=True, cwd=pythonpath)
  return time.perf_counter() - t0


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--checkpoint", action="append", required=True)
  ap.add_argument("--runs", type=int, default=3)
  ap.add_argument("--compare_pythonpath", default=None)
  ap.add_argument("--photos", type=int, default=20, help="timed in-process predictions")
  ap.add_argument("--no_video", dest="video", action="store_false", help="skip the video")
  args = ap.parse_args()
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  tmp = tempfile.mkdtemp(prefix="qcs_time_")
  photo, video = write_inputs(tmp)
  load = lambda: f"load {os.getloadavg()[0]:.1f}"  # noqa: E731
  print(f"{os.cpu_count()} CPU cores; {load()} at start")
  for ck in args.checkpoint:
    cold, warm, other = [], [], []
    for r in range(args.runs):
      cache = os.path.join(tmp, f"cache_{os.path.basename(ck)}_{r}")
      cold.append(run_cli(ck, photo, cache, here))
      warm.append(run_cli(ck, photo, cache, here))
      if args.compare_pythonpath:
        other.append(run_cli(ck, photo, os.path.join(tmp, "unused"), args.compare_pythonpath))
    def med(v: list) -> str:
      return f"{statistics.median(v):.2f} s (runs {', '.join(f'{x:.1f}' for x in v)})"
    print(f"{ck}: predict one photo, fresh process: cold cache {med(cold)}, warm {med(warm)}"
          + (f"; --compare_pythonpath {med(other)}" if other else "") + f"; {load()}")
    from qcs_jax import Recognizer  # pylint: disable=import-outside-toplevel
    from qcs_jax.apps import predict_files as batch  # pylint: disable=import-outside-toplevel
    rec = Recognizer.load(ck, cache=os.path.join(tmp, "inproc"))
    image = np.asarray(Image.open(photo))
    rec.predict(image)
    t_all, t_det, t_model = [], [], []
    x = np.zeros((1, rec.img_size, rec.img_size, 3), np.float32)
    for _ in range(args.photos):  # interleaved: the model alone at batch 1, for the ratio
      t0 = time.perf_counter()
      rec.detect(image)
      t1 = time.perf_counter()
      rec.predict(image)
      t2 = time.perf_counter()
      rec.classify_prepared(x)
      t_model.append(time.perf_counter() - t2)
      t_all.append(t2 - t1)
      t_det.append(t1 - t0)
    ms = lambda v: 1000 * statistics.median(v)  # noqa: E731
    print(f"  Recognizer.predict(one photo, one face): {ms(t_all):.0f} ms median (detection "
          f"{ms(t_det):.0f} ms; the model alone at batch 1: {ms(t_model):.0f} ms), "
          f"{1 / statistics.median(t_all):.1f} photos/s; {load()}")
    if not args.video:
      continue
    rec.warmup([1, 2, 4, 8, 16, rec.max_batch])  # compiles excluded from the rates below
    fps: dict[int, list] = {8: [], 0: []}
    for ahead in (8, 0, 8, 0):  # interleaved
      t0 = time.perf_counter()
      rows = batch.predict_paths([video], rec, read_ahead=ahead, on_problem=lambda m: None)
      fps[ahead].append(len({r["frame"] for r in rows}) / (time.perf_counter() - t0))
    print(f"  video 640x480, 120 frames, a face in each: "
          f"{', '.join(f'{v:.1f}' for v in fps[8])} frames/s with the read-ahead thread, "
          f"{', '.join(f'{v:.1f}' for v in fps[0])} without (batches of {rec.max_batch}); "
          f"{load()}")


if __name__ == "__main__":
  main()
