"""What both frameworks' benchmark sides share: the model config, the batch,
the weights file, and timing/memory sampling of one step."""
# Imports wait inside the functions that need them: a benchmark worker process imports
# only its own framework's side, whose memory and start-up it measures.
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import tempfile
import threading
import time
from typing import Any, Callable, Optional

import numpy as np
import psutil

# Dense peak FLOP/s per chip (NVIDIA datasheets; no sparsity). XLA runs float32
# dots/convs in TF32 on these GPUs by default, so float32 MFU uses the tf32 column.
GPU_PEAK_FLOPS = {
    "H100 SXM": dict(fp32=67e12, tf32=494.7e12, bf16=989.4e12),
    "H100 PCIe": dict(fp32=51.2e12, tf32=378e12, bf16=756e12),
    "H200": dict(fp32=67e12, tf32=494.7e12, bf16=989.4e12),
    "A100": dict(fp32=19.5e12, tf32=156e12, bf16=312e12),
}

WORKER_TAG = "@@bench "
SMALL_MODEL = dict(img_size=64, stage_channels=(16, 32, 64), stage_units=(1, 1, 2),
                   embed_dim=64, num_heads=4, base_depth=1, cross_depth=1)


def gpu_peak(device_kind: str) -> Optional[dict]:
  """Peak table row of a jax device_kind such as 'NVIDIA H100 80GB HBM3'."""
  k = device_kind.upper()
  if "H200" in k:
    return GPU_PEAK_FLOPS["H200"]
  if "H100" in k:
    return GPU_PEAK_FLOPS["H100 PCIe" if "PCIE" in k else "H100 SXM"]
  if "A100" in k:
    return GPU_PEAK_FLOPS["A100"]
  return None


def model_config(args) -> dict:
  """config.model of the paper's network (or the small preset); no torch import."""
  from qcs_jax.interop.converter import DEFAULT_MODEL_CFG  # pylint: disable=import-outside-toplevel
  cfg = dict(DEFAULT_MODEL_CFG, name=args.model, csa="s" if args.model == "dcs" else "sd")
  if args.width == "small":
    cfg.update(SMALL_MODEL)
  if args.img_size:
    cfg["img_size"] = args.img_size
  return cfg


def num_branches(name: str) -> int:
  return {"baseline": 1, "dcs": 2, "qcs": 4}[name]


# ----------------------------------------------------------------------------- measuring


def rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
  """Samples this process's resident memory every few ms while in use."""

  def __init__(self, interval: float = 0.005):
    self.interval = interval
    self.peak = 0
    self._stop = threading.Event()

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, rss_bytes())
      self._stop.wait(self.interval)

  def __enter__(self):
    self.start = rss_bytes()
    self.peak = self.start
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, rss_bytes())


def timed(fn: Callable[[], Any]) -> dict:
  """Runs fn() once: wall and CPU seconds, peak RSS and what fn returned."""
  with PeakRSS() as mem:
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  return dict(wall_s=wall, cpu_s=cpu, rss_peak=mem.peak, rss_start=mem.start, out=out)


def load_average() -> float:
  return os.getloadavg()[0]


# ----------------------------------------------------------------------------- weights


def weights_file(cfg: dict, seed: int) -> str:
  """state_dict of build_reference(cfg, seed) as .npz (built once, cached in /tmp).

  The cache key covers the reference's source, so a changed reference (a layer's
  shape, its init) never loads weights cached from an older one.
  """
  import qcs_jax.interop  # pylint: disable=import-outside-toplevel
  src = os.path.dirname(qcs_jax.interop.__file__)
  code = b"".join(open(os.path.join(src, f), "rb").read()
                  for f in ("reference.py", "reference_layers.py"))
  key = hashlib.sha1(json.dumps([cfg, seed], sort_keys=True).encode() + code).hexdigest()[:12]
  path = os.path.join(tempfile.gettempdir(), f"qcs_bench_weights_{key}.npz")
  if not os.path.exists(path):
    from qcs_jax.interop import reference as R  # pylint: disable=import-outside-toplevel
    ref = R.build_reference(cfg, seed=seed)
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    np.savez(path + ".tmp.npz", **sd)
    os.replace(path + ".tmp.npz", path)
  return path


def load_state_dict(path: str) -> dict:
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def random_images(cfg: dict, batch: int, seed: int = 0,
                  branches: Optional[int] = None) -> np.ndarray:
  """Normal(0, 1) NHWC float32 images, (B, H, W, 3) or (B, nb, H, W, 3)."""
  size = cfg["img_size"]
  shape = (batch, size, size, 3) if branches is None else (batch, branches, size, size, 3)
  return np.random.default_rng(seed).normal(0.0, 1.0, shape).astype(np.float32)


def make_batch(cfg: dict, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Train images (B, nb, H, W, 3) and labels (B, nb): y, y[, y_neg, y_neg]."""
  nb = num_branches(cfg["name"])
  images = random_images(cfg, batch, seed=seed, branches=nb)
  rng = np.random.default_rng(seed + 1)
  k = cfg["num_classes"]
  y = rng.integers(0, k, batch)
  y_neg = (y + rng.integers(1, k, batch)) % k
  labels = np.stack([y, y, y_neg, y_neg][:nb], axis=1).astype(np.int32)
  return images, labels


def machine_line() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      m = re.search(r"model name\s*:\s*(.+)", f.read())
      cpu = m.group(1).strip() if m else cpu
  except OSError:
    pass
  return f"{cpu}, {os.cpu_count()} cores"



def process_tree_cpu_s() -> float:
  """CPU seconds of this process (all threads) and of its live child processes
  (grain workers): the host's cost of a pipeline, wherever its work runs."""
  total = time.process_time()
  for child in psutil.Process().children(recursive=True):
    try:
      t = child.cpu_times()
      total += t.user + t.system
    except psutil.Error:
      pass
  return total
