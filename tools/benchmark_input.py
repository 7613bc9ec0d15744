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

  python tools/benchmark_input.py --compare --workers 0,2 --rounds 3

host CPU time per training image, data.augment_on='host' (decode + torchvision
transforms, float32 batches) against 'device' (uint8 gathered from the image
cache), interleaved round by round in one run on the 'rafdb' setting; CPU
seconds are the process's and its live worker processes' (psutil), counted
from the first batch on. It also times the cache build (serial, 2 threads,
2 processes), CPU and wall seconds per image.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from qcs_jax.bench.workload import process_tree_cpu_s
from qcs_jax.data import image_cache, pipeline  # pylint: disable=g-import-not-at-top
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


cpu_seconds = process_tree_cpu_s


def measure(source, recipe: str, img_size: int, batch_size: int, num_branches: int,
            workers: int, steps: int, part: tuple[int, int] = (0, 1), augment_on: str = "host",
            cache_dir: str = "") -> dict:
  cfg = dict(batch_size=batch_size, workers=workers, on_bad_image="error", anchors="shuffle",
             negatives="random", epoch_fraction=1.0,
             augment=transforms.recipe_augment(recipe, img_size), augment_on=augment_on,
             cache_dir=cache_dir)
  t0 = time.perf_counter()
  it = pipeline.train_batches(source, cfg, img_size, num_branches, seed=0, epoch=0, part=part)
  if len(it) < steps + 1:
    raise SystemExit(f"need {steps + 1} steps, the epoch has {len(it)}: raise --num-images")
  next(it)
  startup = time.perf_counter() - t0
  t1, c1 = time.perf_counter(), cpu_seconds()
  for _ in range(steps):
    batch = next(it)
  elapsed, cpu = time.perf_counter() - t1, cpu_seconds() - c1
  it.close()
  rows = batch_size // part[1]
  assert batch["image"].shape[:2] == (rows, num_branches)
  n = steps * rows * num_branches
  # CPU seconds (of the process and its workers) measure the cost per image whatever
  # else loads the machine; images/s depends on that load.
  return dict(images_per_s=n / elapsed, ms_per_batch=1e3 * elapsed / steps, startup_s=startup,
              images_per_cpu_s=n / cpu, cpu_ms_per_image=1e3 * cpu / n)


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
  ap.add_argument("--compare", action="store_true",
                  help="augment_on host vs device, interleaved (rafdb setting)")
  ap.add_argument("--rounds", type=int, default=3, help="--compare: rounds of each mode")
  a = ap.parse_args(argv)
  if a.compare:
    return compare(a)
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


def cache_build_cost(source, img_size: int, root: str) -> list[tuple[str, float, float]]:
  """(how, CPU ms per image, wall ms per image) of building the rafdb train cache afresh."""
  lay = image_cache.layout(transforms.recipe_augment("rafdb", img_size), img_size, True)
  rows = []
  for how, workers, parallel in (("serial", 0, "threads"), ("2 threads", 2, "threads"),
                                 ("2 processes", 2, "processes")):
    c0, w0 = time.process_time(), time.perf_counter()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    image_cache.ensure_cache(source, lay, os.path.join(root, f"build-{workers}-{parallel}"),
                             workers=workers, parallel=parallel, progress=False)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the pool's processes, joined
    cpu = (time.process_time() - c0 + (r1.ru_utime - r0.ru_utime)
           + (r1.ru_stime - r0.ru_stime))
    rows.append((how, 1e3 * cpu / len(source), 1e3 * (time.perf_counter() - w0) / len(source)))
  return rows


def compare(a) -> None:
  """--compare: CPU time per training image, host transforms vs uint8 from the cache."""
  workers = [int(w) for w in a.workers.split(",")]
  print(f"{os.cpu_count()} CPUs; rafdb recipe, batch {a.batch_size} x {a.num_branches} "
        f"branches at {a.img_size}px from {a.num_images} 100x100 JPEG files; {a.steps} timed "
        f"batches per run; {a.rounds} interleaved rounds", flush=True)
  results: dict[tuple[str, int], list[dict]] = {}
  with tempfile.TemporaryDirectory() as root:
    source = make_source("jpeg", a.num_images, 100, root)
    build = cache_build_cost(source, a.img_size, root)
    cache_dir = os.path.join(root, "build-0-threads")
    for r in range(a.rounds):
      for w in workers:
        for mode in ("host", "device"):
          m = measure(source, "rafdb", a.img_size, a.batch_size, a.num_branches, w, a.steps,
                      augment_on=mode, cache_dir=cache_dir)
          results.setdefault((mode, w), []).append(m)
          print(f"round {r + 1} {mode:>6} workers={w}: {m['cpu_ms_per_image']:.3f} CPU-ms/image, "
                f"{m['images_per_s']:.0f} images/s", flush=True)
  print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
  print("\n| augment_on | workers | CPU ms / image (median) | images / CPU-s | images/s "
        "(median) |\n|---|---|---|---|---|")
  for (mode, w), ms in results.items():
    cpu = float(np.median([m["cpu_ms_per_image"] for m in ms]))
    rate = float(np.median([m["images_per_s"] for m in ms]))
    print(f"| {mode} | {w} | {cpu:.3f} | {1e3 / cpu:.0f} | {rate:.0f} |")
  print("\n| cache build | CPU ms / image | wall ms / image |\n|---|---|---|")
  for how, cpu, wall in build:
    print(f"| {how} | {cpu:.3f} | {wall:.3f} |")


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
