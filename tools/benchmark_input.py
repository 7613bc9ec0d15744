"""Images per second of the training input pipeline, by number of grain workers.

  python tools/benchmark_input.py --workers 0,1,2 --steps 8

Two settings by default, each with QCS quadruplets (4 branches):
- 'rafdb': the RAF-DB augmentation at 224 from 100x100 JPEG files on disk
  (like RAF-DB aligned: decode + resize + flip + colour jitter + erasing);
- 'synthetic': the synthetic recipe at 224 from 112x112 images in memory.
Images are random noise (a worst case for JPEG decoding). Throughput counts
every branch image and excludes start-up (spawning workers, first batch),
which is reported separately; with 0 workers the CPU time per image is
reported too (a figure that does not depend on what else loads the machine).

  python tools/benchmark_input.py --processes 1,2,4 --settings synthetic

runs P processes at once, each building only its part of every global batch
(as in multi-process training), and reports images/s per process and in all.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from qcs_jax.data import pipeline  # pylint: disable=g-import-not-at-top
from qcs_jax.data import transforms
from qcs_jax.data.sources import FileSource, InMemorySource

CLASSES = tuple(f"c{k}" for k in range(7))


def _images(n: int, size: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def make_source(kind: str, n: int, size: int, root: str):
  """n random images of size x size, as JPEG files under root or in memory."""
  labels = np.arange(n) % len(CLASSES)
  images = _images(n, size, seed=0)
  if kind == "memory":
    return InMemorySource(labels=labels, class_names=CLASSES, name="bench/memory",
                          images=images)
  paths = []
  for i, img in enumerate(images):
    p = os.path.join(root, f"train_{i:05d}_aligned.jpg")
    Image.fromarray(img).save(p, quality=95)
    paths.append(p)
  return FileSource(labels=labels, class_names=CLASSES, name="bench/jpeg", paths=paths)


def measure(source, recipe: str, img_size: int, batch_size: int, num_branches: int,
            workers: int, steps: int, part: tuple[int, int] = (0, 1)) -> dict:
  cfg = dict(batch_size=batch_size, workers=workers, on_bad_image="error", anchors="shuffle",
             negatives="random", epoch_fraction=1.0,
             augment=transforms.recipe_augment(recipe, img_size))
  t0 = time.perf_counter()
  it = pipeline.train_batches(source, cfg, img_size, num_branches, seed=0, epoch=0, part=part)
  if len(it) < steps + 1:
    raise SystemExit(f"need {steps + 1} steps, the epoch has {len(it)}: raise --num-images")
  next(it)
  startup = time.perf_counter() - t0
  t1, c1 = time.perf_counter(), time.process_time()
  for _ in range(steps):
    batch = next(it)
  elapsed, cpu = time.perf_counter() - t1, time.process_time() - c1
  it.close()
  rows = batch_size // part[1]
  assert batch["image"].shape == (rows, num_branches, img_size, img_size, 3)
  n = steps * rows * num_branches
  # In-process, CPU seconds measure the cost per image whatever else loads the machine.
  per_cpu_s = n / cpu if workers == 0 else float("nan")
  return dict(images_per_s=n / elapsed, ms_per_batch=1e3 * elapsed / steps, startup_s=startup,
              images_per_cpu_s=per_cpu_s)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
  ap.add_argument("--settings", default="rafdb,synthetic")
  ap.add_argument("--steps", type=int, default=8, help="timed batches per setting")
  ap.add_argument("--batch-size", type=int, default=24, help="anchors per batch")
  ap.add_argument("--num-branches", type=int, default=4)
  ap.add_argument("--img-size", type=int, default=224)
  ap.add_argument("--num-images", type=int, default=2048)
  ap.add_argument("--processes", default="", help="comma-separated process counts")
  ap.add_argument("--part", default="", help=argparse.SUPPRESS)  # "i/P": one such process
  a = ap.parse_args(argv)
  if a.processes or a.part:
    return by_processes(a)
  workers = [int(w) for w in a.workers.split(",")]
  settings = {"rafdb": ("jpeg", 100, "rafdb"), "synthetic": ("memory", 112, "synthetic")}
  print(f"{os.cpu_count()} CPUs; batch {a.batch_size} x {a.num_branches} branches at "
        f"{a.img_size}px; {a.steps} timed batches per setting", flush=True)
  rows = []
  with tempfile.TemporaryDirectory() as root:
    for name in a.settings.split(","):
      kind, size, recipe = settings[name]
      source = make_source(kind, a.num_images, size, root)
      for w in workers:
        r = measure(source, recipe, a.img_size, a.batch_size, a.num_branches, w, a.steps)
        rows.append((name, kind, size, w, r))
        print(f"{name:>9} ({kind} {size}px) workers={w}: {r['images_per_s']:7.1f} images/s, "
              f"{r['ms_per_batch']:7.1f} ms/batch, start-up {r['startup_s']:.1f} s", flush=True)
  print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
  print("\n| setting | source | workers | images/s | ms / batch | start-up (s) | "
        "images / CPU-s |")
  print("|---|---|---|---|---|---|---|")
  for name, kind, size, w, r in rows:
    per_cpu = "" if w else f"{r['images_per_cpu_s']:.1f}"
    print(f"| {name} | {kind} {size}x{size} | {w} | {r['images_per_s']:.1f} | "
          f"{r['ms_per_batch']:.1f} | {r['startup_s']:.1f} | {per_cpu} |")


def by_processes(a) -> None:
  """--processes: P concurrent processes, each decoding its part of every batch."""
  kind, size, recipe = {"rafdb": ("jpeg", 100, "rafdb"),
                        "synthetic": ("memory", 112, "synthetic")}[a.settings.split(",")[0]]
  if a.part:
    i, n = (int(x) for x in a.part.split("/"))
    with tempfile.TemporaryDirectory() as root:
      source = make_source(kind, a.num_images, size, root)
      r = measure(source, recipe, a.img_size, a.batch_size, a.num_branches, 0, a.steps, (i, n))
    print(json.dumps(r))
    return
  print(f"{os.cpu_count()} CPUs; global batch {a.batch_size} x {a.num_branches} branches at "
        f"{a.img_size}px ({a.settings.split(',')[0]}); {a.steps} timed batches; 0 workers")
  print("\n| processes | images/s per process | images/s in all |\n|---|---|---|")
  for n in (int(p) for p in a.processes.split(",")):
    cmd = [sys.executable, __file__, "--settings", a.settings, "--steps", str(a.steps),
           "--batch-size", str(a.batch_size), "--num-branches", str(a.num_branches),
           "--img-size", str(a.img_size), "--num-images", str(a.num_images)]
    procs = [subprocess.Popen(cmd + ["--part", f"{i}/{n}"], stdout=subprocess.PIPE, text=True)
             for i in range(n)]
    rates = [json.loads(p.communicate()[0].strip().splitlines()[-1])["images_per_s"]
             for p in procs]
    print(f"| {n} | {' / '.join(f'{r:.0f}' for r in rates)} | {sum(rates):.0f} |", flush=True)
  print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
  main()
