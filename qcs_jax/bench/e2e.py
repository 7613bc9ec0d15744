"""End-to-end training throughput: a recipe's real input pipeline feeding the train step.

  python tools/benchmark_e2e.py --recipe rafdb --batch 24 --steps 20 --augment_on device
  python tools/benchmark_e2e.py --recipe synthetic --steps 40 --augment_on host,device

For a file-based recipe (rafdb) a JPEG data set in RAF-DB's official layout is
written to local disk first (100x100 aligned faces' size, smooth random images),
so the pipeline decodes real files; the synthetic recipe renders its faces in
memory. The model starts from random weights (no backbone file needed). Measured
after compilation and warm-up: training images/s, the share of the wall time the
loop spent waiting for the next batch (``input_wait``: > a few % means the host
does not keep up), the host's CPU seconds per training image (this process and
its grain workers), compile time, XLA's FLOPs per step and, on a GPU, MFU.
Several ``--augment_on`` values run interleaved, step by step, in one process.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from PIL import Image
from tqdm import tqdm

from qcs_jax import recipes as config_lib, runtime
from qcs_jax.bench.workload import gpu_peak, machine_line, process_tree_cpu_s
from qcs_jax.data import pipeline, sources
from qcs_jax.data.readers.rafdb import RAFDB_CLASSES
from qcs_jax.data.transforms import Augment
from qcs_jax.models import NUM_BRANCHES, build_model
from qcs_jax.training import optim
from qcs_jax.training.state import create_state, init_variables, make_mesh
from qcs_jax.training.step import make_train_step, shard_batch


def write_rafdb(root: str, num_train: int, num_test: int, size: int = 100,
                seed: int = 0) -> str:
  """A RAF-DB 'basic' folder of smooth random JPEGs (quality 95); returns root."""
  base = os.path.join(root, "basic")
  images = os.path.join(base, "Image", "aligned")
  os.makedirs(images, exist_ok=True)
  os.makedirs(os.path.join(base, "EmoLabel"), exist_ok=True)
  rng = np.random.default_rng(seed)
  lines = []
  names = [f"train_{i + 1:05d}" for i in range(num_train)]
  names += [f"test_{i + 1:04d}" for i in range(num_test)]
  for i, stem in enumerate(tqdm(names, desc="writing JPEGs", unit="image")):
    small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
    img.save(os.path.join(images, f"{stem}_aligned.jpg"), quality=95)
    lines.append(f"{stem}.jpg {i % len(RAFDB_CLASSES) + 1}")
  with open(os.path.join(base, "EmoLabel", "list_patition_label.txt"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return root


def recipe_config(recipe: str, root: str, batch: int, dtype: str, width: str,
                  workers: int) -> ml_collections.ConfigDict:
  """The recipe's config with this benchmark's data root, batch, dtype and width."""
  cfg = config_lib.recipe("qcs", recipe) if recipe != "synthetic" else config_lib.synthetic("qcs")
  cfg.data.batch_size = batch
  cfg.data.workers = workers
  if cfg.data.name != "synthetic":
    cfg.data.root = root
  cfg.model.dtype = dtype
  if width == "small":
    cfg.model.update(stage_channels=(16, 32, 64), embed_dim=64, num_heads=2)
  return cfg


class Contender:
  """One augment_on setting: its pipeline, compiled step and counters."""

  def __init__(self, cfg, augment_on: str, source, mesh, variables, tx, model, steps: int):
    self.name = augment_on
    self.cfg = cfg.copy_and_resolve_references()
    self.cfg.data.augment_on = augment_on
    self.mesh = mesh
    self.nb = NUM_BRANCHES[cfg.model.name]
    device = augment_on == "device"
    augment = Augment.from_cfg(cfg.data.augment) if device else None
    self.step = make_train_step(model, tx, mesh, augment=augment, img_size=cfg.model.img_size)
    self.state = create_state(variables, tx, jax.random.PRNGKey(0), mesh)
    epochs = -(-(steps + 2) // pipeline.steps_per_epoch(
        pipeline.make_sampler(source, cfg.data, self.nb, 0), cfg.data.batch_size))
    self.batches = pipeline.train_batches(source, self.cfg.data, cfg.model.img_size, self.nb,
                                          0, 0, num_epochs=epochs)
    self.wait = self.busy = 0.0
    self.images = 0
    self.compile_s = float("nan")
    self.flops = float("nan")

  def _args(self, batch: dict) -> tuple:
    args = [shard_batch(batch["image"], self.mesh), shard_batch(batch["label"], self.mesh)]
    if self.name == "device":
      args += [shard_batch(batch["epoch"], self.mesh), shard_batch(batch["position"], self.mesh)]
    return tuple(args)

  def compile(self) -> None:
    batch = next(self.batches)
    t0 = time.perf_counter()
    compiled = self.step.lower(self.state, *self._args(batch)).compile()
    self.compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    self.flops = float((cost or {}).get("flops", float("nan")))
    self.state, m = self.step(self.state, *self._args(batch))
    jax.block_until_ready(m)
    runtime.release_free_memory()

  def run(self, n: int, timed: bool) -> None:
    """n steps, two in flight; counts the time spent waiting for batches."""
    t0 = time.perf_counter()
    wait, last = 0.0, None
    for _ in range(n):
      w0 = time.perf_counter()
      batch = next(self.batches)
      wait += time.perf_counter() - w0
      self.state, m = self.step(self.state, *self._args(batch))
      if last is not None:
        jax.block_until_ready(last)
      last = m
    jax.block_until_ready(last)
    if timed:
      self.busy += time.perf_counter() - t0
      self.wait += wait
      self.images += n * batch["label"].size * jax.process_count()

  def row(self) -> dict[str, Any]:
    per_s = self.images / self.busy if self.busy else float("nan")
    steps_per_s = per_s / (self.cfg.data.batch_size * self.nb)
    out = {"augment_on": self.name, "images_per_s": per_s,
           "input_wait": self.wait / self.busy if self.busy else float("nan"),
           "compile_s": self.compile_s, "flops_per_step": self.flops,
           "batch": self.cfg.data.batch_size, "dtype": self.cfg.model.dtype}
    peak = gpu_peak(jax.devices()[0].device_kind) if jax.default_backend() == "gpu" else None
    if peak:
      key = "bf16" if self.cfg.model.dtype == "bfloat16" else "tf32"
      out["mfu"] = self.flops * steps_per_s / peak[key] if key in peak else float("nan")
    return out


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog="\n".join(__doc__.splitlines()[2:]))
  ap.add_argument("--recipe", default="rafdb", help="rafdb (JPEG files) or synthetic")
  ap.add_argument("--augment_on", default="host,device", help="comma-separated: host, device")
  ap.add_argument("--batch", type=int, default=24, help="anchors per step")
  ap.add_argument("--steps", type=int, default=10, help="timed steps per contender")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of --steps")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  ap.add_argument("--width", choices=("paper", "small"), default="paper")
  ap.add_argument("--workers", type=int, default=-1, help="grain workers (-1: os.cpu_count())")
  ap.add_argument("--num_images", type=int, default=0, help="training JPEGs (0: enough)")
  ap.add_argument("--data_dir", default="", help="where to write the JPEGs (default: a temp dir)")
  ap.add_argument("--json", default="")
  a = ap.parse_args(argv)
  runtime.set_cpu_xla_defaults()
  workers = os.cpu_count() if a.workers < 0 else a.workers
  names = [s.strip() for s in a.augment_on.split(",") if s.strip()]
  with tempfile.TemporaryDirectory(dir=a.data_dir or None) as root:
    cfg = recipe_config(a.recipe, root, a.batch, a.dtype, a.width, workers)
    if cfg.data.name == "rafdb":
      n = a.num_images or a.batch * (a.warmup + 1 + a.steps * a.rounds) * len(names) + a.batch
      write_rafdb(root, n, 16)
    mesh = make_mesh()
    model = build_model(cfg.model)
    source = sources.open_split(cfg.data, cfg.data.train_split)
    tx = optim.make_optimizer(cfg.optim, 1000)
    variables = init_variables(model, cfg, jax.random.PRNGKey(0))
    contenders = [Contender(cfg, name, source, mesh, variables, tx, model,
                            a.warmup + a.steps * a.rounds) for name in names]
    for c in contenders:
      c.compile()
      c.run(a.warmup, timed=False)
    cpu0 = {c.name: 0.0 for c in contenders}
    for _ in tqdm(range(a.rounds), desc="rounds", unit="round"):
      for c in contenders:
        t = process_tree_cpu_s()
        c.run(a.steps, timed=True)
        cpu0[c.name] += process_tree_cpu_s() - t
    rows = []
    for c in contenders:
      r = c.row()
      r["process_cpu_s_per_image"] = cpu0[c.name] / max(c.images, 1)
      rows.append(r)
      c.batches.close()
  print(f"{time.strftime('%Y-%m-%d')}, {machine_line()}, {jax.devices()[0].device_kind}; "
        f"recipe {a.recipe}, widths {tuple(cfg.model.stage_channels)}, batch {a.batch} anchors, {a.dtype}, "
        f"{workers} workers, load average {os.getloadavg()[0]:.1f}")
  for r in rows:
    extra = f", MFU {r['mfu']:.1%}" if "mfu" in r else ""
    print(f"augment on {r['augment_on']:>6}: {r['images_per_s']:8.1f} images/s, waited for "
          f"input {r['input_wait']:.1%} of the time, compile {r['compile_s']:.1f} s, "
          f"{r['flops_per_step'] / 1e9:.0f} GFLOP/step, process CPU "
          f"{1e3 * r['process_cpu_s_per_image']:.1f} ms/image{extra}", flush=True)
  if a.json:
    with open(a.json, "w") as f:
      json.dump({"machine": machine_line(), "args": vars(a), "rows": rows}, f, indent=1)
