"""Speed of qcs_jax against the PyTorch reference: the same network, weights and batch.

  python tools/benchmark.py --framework both --model qcs --batch 2 --mode train
  python tools/benchmark.py --framework both --mode infer --infer_batch 1,16,64
  python tools/benchmark.py --framework both --mode train \
      --variant xla_default=--xla_cpu_use_xnnpack=false
  python tools/benchmark.py --parts --framework both    # fwd+bwd time of each part, both sides
  python tools/benchmark.py --profile --mode train      # XLA thunk times by part and op kind
  python tools/benchmark.py --roofline --steps 5        # the CPU's attainable GEMM rate

What runs:
- train: one SAM step as the reference takes it (forward+backward at w, e = rho g /
  (||g|| + 1e-12), forward+backward at w + e, Adam at w with the second gradient).
  JAX: qcs_jax.training.step.make_train_step (jitted, state donated). PyTorch: that step
  written out with torch.optim.Adam over tests/torch_reference.py (one ir_back call
  per branch, as the authors' code). `--batch` counts anchors: a QCS step sees
  4 x batch images, DCS 2 x batch.
- infer: the inference path only (ir_back -> embed -> VIT_base), JAX `method='infer'`
  jitted (qcs_jax.training.step.make_eval_step), PyTorch `infer` under torch.inference_mode().

Both frameworks get the weights of one `build_reference(cfg, seed)` (converted for
JAX with qcs_jax.convert.convert_model), the same images and labels; the first
step's loss of each is printed so that a reader can see they compute the same thing.

JAX runs with qcs_jax.runtime's CPU XLA flags, as the entry points do. Each framework
(and each `--variant`, a JAX run with extra XLA_FLAGS) runs in its own
worker process; the parent makes them take their steps in turn (A B C A B C ...), so
a shared, fluctuating machine loads every contender alike. Reported per step, after
warm-up: median wall time, images/s, CPU seconds (all threads; a load-independent
cost), peak resident memory (sampled during the step) and, for JAX, XLA's own
numbers: compile time, FLOPs (`compiled.cost_analysis()`), buffer sizes
(`compiled.memory_analysis()`), device peak memory (`memory_stats()`, GPU) and, on a
GPU, achieved FLOP/s and MFU against the chip's dense peak.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import functools
import gzip
import hashlib
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
  """state_dict of build_reference(cfg, seed) as .npz (built once, cached in /tmp)."""
  key = hashlib.sha1(json.dumps([cfg, seed], sort_keys=True).encode()).hexdigest()[:12]
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


# ----------------------------------------------------------------------------- JAX


class JaxBench:
  """qcs_jax side: the library's jitted train step and inference path."""

  framework = "jax"

  def __init__(self, args, cfg: dict, sd: dict):
    import jax  # pylint: disable=import-outside-toplevel
    # pylint: disable=import-outside-toplevel
    from qcs_jax import config as config_lib
    from qcs_jax.interop import converter as convert
    from qcs_jax.training import optim, state as train_state, step as train_lib
    from qcs_jax.models import build_model  # pylint: disable=import-outside-toplevel
    self.jax, self.train_lib, self.train_state = jax, train_lib, train_state
    self.args, self.cfg = args, dict(cfg, dtype=args.dtype)
    t0 = time.perf_counter()
    self.variables, _ = convert.convert_model(sd, cfg)
    self.convert_s = time.perf_counter() - t0
    self.model = build_model(self.cfg)
    self.device = jax.devices()[0]
    self.mesh = train_state.make_mesh([self.device])
    ocfg = config_lib.base_config().optim
    self.tx = optim.make_optimizer(ocfg, steps_per_epoch=1000)
    self.prepared: dict[str, dict] = {}

  def versions(self) -> str:
    import flax  # pylint: disable=import-outside-toplevel
    import jaxlib  # pylint: disable=import-outside-toplevel
    return f"jax {self.jax.__version__}, jaxlib {jaxlib.__version__}, flax {flax.__version__}"

  def _xla_numbers(self, compiled) -> dict:
    info: dict[str, Any] = {}
    try:
      ca = compiled.cost_analysis()
      ca = ca[0] if isinstance(ca, (list, tuple)) else ca
      info["flops"] = float(ca.get("flops", float("nan")))
    except Exception as e:  # pylint: disable=broad-except
      info["flops_error"] = repr(e)
    try:
      ma = compiled.memory_analysis()
      info["xla_bytes"] = dict(
          arguments=ma.argument_size_in_bytes, outputs=ma.output_size_in_bytes,
          temp=ma.temp_size_in_bytes, alias=ma.alias_size_in_bytes,
          peak=ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
          - ma.alias_size_in_bytes)
    except Exception as e:  # pylint: disable=broad-except
      info["memory_error"] = repr(e)
    return info

  def prepare(self, key: str) -> dict:
    """Compiles the program of `key` ('train' or 'infer:B'); returns compile time etc."""
    jax, tl = self.jax, self.train_lib
    if key == "train":
      images, labels = make_batch(self.cfg, self.args.batch, self.args.seed)
      state = self.train_state.create_state(self.variables, self.tx, jax.random.PRNGKey(0),
                                            self.mesh)
      step = tl.make_train_step(self.model, self.tx, self.mesh)
      x, y = tl.shard_batch(images, self.mesh), tl.shard_batch(labels, self.mesh)
      t0 = time.perf_counter()
      lowered = step.lower(state, x, y)
      t1 = time.perf_counter()
      compiled = lowered.compile()
      t2 = time.perf_counter()
      box = {"state": state}

      def run():
        box["state"], m = compiled(box["state"], x, y)
        return float(m["loss"])  # fetching the loss waits for the step

      n_images = images.shape[0] * images.shape[1]
    else:
      b = int(key.split(":")[1])
      images = random_images(self.cfg, b, seed=self.args.seed)
      fn = tl.make_eval_step(self.model, self.mesh)
      v = jax.device_put(self.variables, self.jax.sharding.NamedSharding(
          self.mesh, self.jax.sharding.PartitionSpec()))
      x = tl.shard_batch(images, self.mesh)
      t0 = time.perf_counter()
      lowered = fn.lower(v, x)
      t1 = time.perf_counter()
      compiled = lowered.compile()
      t2 = time.perf_counter()

      def run():
        return float(np.asarray(compiled(v, x))[0, 0])

      n_images = b
    self.prepared[key] = dict(run=run, compiled=compiled)
    info = dict(lower_s=t1 - t0, compile_s=t2 - t1, images=n_images, **self._xla_numbers(compiled))
    return info

  def step(self, key: str) -> dict:
    r = timed(self.prepared[key]["run"])
    if self.device.platform == "gpu":
      stats = self.device.memory_stats() or {}
      r["device_peak"] = stats.get("peak_bytes_in_use")
    return r

  def device_info(self) -> dict:
    return dict(platform=self.device.platform, device_kind=self.device.device_kind)


# ----------------------------------------------------------------------------- PyTorch


class TorchBench:
  """tests/torch_reference.py: the authors' network; SAM + Adam written out."""

  framework = "torch"

  def __init__(self, args, cfg: dict, sd: dict):
    import torch  # pylint: disable=import-outside-toplevel
    from qcs_jax.interop import reference as R  # pylint: disable=import-outside-toplevel
    self.torch, self.R = torch, R
    self.args, self.cfg = args, cfg
    torch.set_num_threads(args.threads)
    self.dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    self.state_dict = {k: torch.from_numpy(v) for k, v in sd.items()}
    self.net = R.QCSReference(cfg).to(self.dev)
    self.prepared: dict[str, Callable] = {}

  def versions(self) -> str:
    return f"torch {self.torch.__version__} ({self.torch.get_num_threads()} threads)"

  def _autocast(self):
    if self.args.dtype == "bfloat16":
      return self.torch.autocast(self.dev.type, dtype=self.torch.bfloat16)
    return _nullcontext()

  def _sync(self):
    if self.dev.type == "cuda":
      self.torch.cuda.synchronize()

  def prepare(self, key: str) -> dict:
    torch, R, F = self.torch, self.R, self.torch.nn.functional
    self.net.load_state_dict(self.state_dict)  # every program starts from the same weights
    if key == "train":
      images, labels = make_batch(self.cfg, self.args.batch, self.args.seed)
      nb = images.shape[1]
      branches = [R.to_nchw(images[:, i]).to(self.dev) for i in range(nb)]
      y = torch.from_numpy(labels).long().to(self.dev)
      net = self.net.train()
      params = [p for p in net.parameters() if p.requires_grad]
      optim_cfg = dict(lr=4e-6, betas=(0.9, 0.999), eps=1e-8)
      opt = torch.optim.Adam(params, **optim_cfg)
      rho = 0.05

      def loss_fn():
        with self._autocast():
          out = net.forward_train(*branches)
        terms = [F.cross_entropy(out[k][b].float(), y[:, b])
                 for k in ("base", "cross") for b in range(nb)]
        return torch.stack(terms).mean()

      def run():
        loss = loss_fn()
        loss.backward()
        with torch.no_grad():
          used = [p for p in params if p.grad is not None]
          norm = torch.sqrt(sum(torch.sum(p.grad * p.grad) for p in used))
          perturb = []
          for p in used:
            e = rho * p.grad / (norm + 1e-12)
            p.add_(e)
            perturb.append((p, e))
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        with torch.no_grad():
          for p, e in perturb:
            p.sub_(e)
        opt.step()
        opt.zero_grad(set_to_none=True)
        self._sync()
        return float(loss.detach())

      n_images = images.shape[0] * nb
    else:
      b = int(key.split(":")[1])
      x = R.to_nchw(random_images(self.cfg, b, seed=self.args.seed)).to(self.dev)
      net = self.net.eval()

      def run():
        with torch.inference_mode(), self._autocast():
          out = net.infer(x)
        self._sync()
        return float(out[0, 0])

      n_images = b
    self.prepared[key] = run
    info: dict[str, Any] = dict(images=n_images)
    if self.args.torch_flops:
      from torch.utils import flop_counter  # pylint: disable=import-outside-toplevel
      counter = flop_counter.FlopCounterMode(display=False)
      with counter:
        run()
      info["torch_flops"] = float(counter.get_total_flops())
    return info

  def step(self, key: str) -> dict:
    return timed(self.prepared[key])

  def device_info(self) -> dict:
    return dict(platform=self.dev.type, device_kind=platform.processor() or "cpu")


class _nullcontext:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


# ----------------------------------------------------------------------------- worker


def worker_main(args) -> None:
  """One contender in its own process: reads commands on stdin, answers JSON lines."""
  def say(obj):
    sys.stdout.write(WORKER_TAG + json.dumps(obj) + "\n")
    sys.stdout.flush()

  cfg = model_config(args)
  sd = load_state_dict(args.weights)
  t0 = time.perf_counter()
  bench = (JaxBench if args.framework == "jax" else TorchBench)(args, cfg, sd)
  say(dict(ready=True, setup_s=time.perf_counter() - t0, versions=bench.versions(),
           **bench.device_info()))
  for line in sys.stdin:
    cmd = json.loads(line)
    try:
      if cmd["op"] == "prepare":
        say(dict(ok=True, **bench.prepare(cmd["key"])))
      elif cmd["op"] == "step":
        r = bench.step(cmd["key"])
        r["loss"] = r.pop("out")
        r["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        say(dict(ok=True, **r))
      elif cmd["op"] == "quit":
        say(dict(ok=True))
        return
    except Exception as e:  # pylint: disable=broad-except
      say(dict(ok=False, error=f"{type(e).__name__}: {e}"))


@dataclasses.dataclass
class Contender:
  name: str
  framework: str
  xla_flags: str
  proc: Any = None
  hello: dict = dataclasses.field(default_factory=dict)

  def start(self, args, weights: str) -> None:
    env = dict(os.environ)
    if self.framework == "jax":
      env["XLA_FLAGS"] = " ".join(x for x in (os.environ.get("XLA_FLAGS", ""), self.xla_flags)
                                  if x).strip()
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--framework", self.framework,
           "--weights", weights] + args.passthrough
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                 text=True, bufsize=1)
    self.hello = self._read()

  def _read(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith(WORKER_TAG):
        return json.loads(line[len(WORKER_TAG):])
      sys.stderr.write(f"[{self.name}] {line}")
    raise RuntimeError(f"{self.name}: worker exited with {self.proc.wait()}")

  def ask(self, **cmd) -> dict:
    self.proc.stdin.write(json.dumps(cmd) + "\n")
    self.proc.stdin.flush()
    r = self._read()
    if not r.get("ok", False):
      raise RuntimeError(f"{self.name} {cmd}: {r.get('error')}")
    return r

  def stop(self) -> None:
    if self.proc and self.proc.poll() is None:
      try:
        self.ask(op="quit")
      except Exception:  # pylint: disable=broad-except
        pass
      self.proc.wait(timeout=60)


# ----------------------------------------------------------------------------- report


def machine_line() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      m = re.search(r"model name\s*:\s*(.+)", f.read())
      cpu = m.group(1).strip() if m else cpu
  except OSError:
    pass
  return f"{cpu}, {os.cpu_count()} cores"


def summarize(key: str, c: Contender, prep: dict, steps: list[dict], warm: list[dict],
              dtype: str) -> dict:
  walls = [s["wall_s"] for s in steps]
  cpus = [s["cpu_s"] for s in steps]
  med = statistics.median(walls)
  row = dict(contender=c.name, framework=c.framework, key=key, images=prep["images"],
             ms_per_step=1e3 * med, images_per_s=prep["images"] / med,
             ms_min=1e3 * min(walls), ms_max=1e3 * max(walls),
             cpu_s_per_step=statistics.median(cpus),
             rss_peak_mib=max(s["rss_peak"] for s in steps + warm) / 2**20,
             step_mem_mib=max(s["rss_peak"] - s["rss_start"] for s in steps) / 2**20,
             first_loss=warm[0]["loss"] if warm else steps[0]["loss"],
             warmup_ms=[round(1e3 * w["wall_s"]) for w in warm],
             versions=c.hello.get("versions", ""), device_kind=c.hello.get("device_kind", ""),
             platform=c.hello.get("platform", ""), xla_flags=c.xla_flags)
  for k in ("lower_s", "compile_s", "flops", "xla_bytes", "torch_flops"):
    if k in prep:
      row[k] = prep[k]
  if row.get("flops"):
    row["gflop_per_image"] = row["flops"] / prep["images"] / 1e9
    row["achieved_flops"] = row["flops"] / med
    peak = gpu_peak(row["device_kind"]) if row["platform"] == "gpu" else None
    if peak:
      col = "bf16" if dtype == "bfloat16" else "tf32"
      row["mfu"] = row["achieved_flops"] / peak[col]
      row["mfu_against"] = col
  dev_peaks = [s["device_peak"] for s in steps if s.get("device_peak")]
  if dev_peaks:
    row["device_peak_mib"] = max(dev_peaks) / 2**20
  return row


def markdown_rows(rows: list[dict], args, load: tuple[float, float],
                  date: Optional[str] = None) -> str:
  date = date or datetime.date.today().isoformat()
  size = args.img_size or (224 if args.width == "paper" else 64)
  out = []
  for r in rows:
    what = "train step (SAM+Adam)" if r["key"] == "train" else "inference"
    mem = (f"{r['device_peak_mib']:.0f} dev" if "device_peak_mib" in r else
           f"{r['rss_peak_mib']:.0f} RSS")
    if "xla_bytes" in r:
      mem += f" / {r['xla_bytes']['peak'] / 2**20:.0f} XLA"
    flops = f"{r['gflop_per_image']:.1f}" if "gflop_per_image" in r else (
        f"{r['torch_flops'] / r['images'] / 1e9:.1f}*" if r.get("torch_flops") else "")
    compile_s = f"{r['lower_s'] + r['compile_s']:.0f}" if "compile_s" in r else "-"
    mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else ""
    name = r["contender"] + (f" `{r['xla_flags']}`" if r["xla_flags"] else "")
    out.append(
        f"| {date} | {machine_line()}, load {load[0]:.1f}-{load[1]:.1f} | {name} | "
        f"{r['versions']} | {args.model} {args.width} {size}px {args.dtype} | "
        f"{what} | {r['images']} | {r['ms_per_step']:.0f} | {r['images_per_s']:.2f} | "
        f"{r['cpu_s_per_step']:.1f} | {compile_s} | {mem} | {flops} | {mfu} |")
  return "\n".join(out)


MD_HEADER = ("| date | machine | contender | versions | model | what | images/step | "
             "ms/step (median) | images/s | CPU s/step | compile s | peak MiB | "
             "GFLOP/image | MFU |\n|" + "---|" * 14)


def print_table(rows: list[dict]) -> None:
  print(f"\n{'contender':<22} {'what':<9} {'img':>4} {'ms/step':>9} {'img/s':>8} {'cpu s':>7} "
        f"{'min-max ms':>15} {'RSS MiB':>8} {'compile':>8} {'GFLOP/step':>10} {'GFLOP/img':>9} "
        f"{'GFLOP/s':>8} {'loss@1':>9}")
  for r in rows:
    comp = f"{r['lower_s'] + r['compile_s']:.1f}" if "compile_s" in r else "-"
    if "gflop_per_image" in r:
      gf = (f"{r['flops'] / 1e9:>10.1f} {r['gflop_per_image']:>9.2f} "
            f"{r['achieved_flops'] / 1e9:>8.1f}")
    elif r.get("torch_flops"):  # FlopCounterMode: matmuls/convs only
      gf = (f"{r['torch_flops'] / 1e9:>9.1f}* {r['torch_flops'] / r['images'] / 1e9:>8.2f}* "
            f"{r['torch_flops'] / 1e9 / (r['ms_per_step'] / 1e3):>7.1f}*")
    else:
      gf = f"{'-':>10} {'-':>9} {'-':>8}"
    print(f"{r['contender']:<22} {r['key']:<9} {r['images']:>4} {r['ms_per_step']:>9.1f} "
          f"{r['images_per_s']:>8.2f} {r['cpu_s_per_step']:>7.2f} "
          f"{r['ms_min']:>7.0f}-{r['ms_max']:<7.0f} {r['rss_peak_mib']:>8.0f} {comp:>8} {gf} "
          f"{r['first_loss']:>9.5f}")
    if "mfu" in r:
      print(f"    {r['achieved_flops'] / 1e12:.2f} TFLOP/s, MFU {100 * r['mfu']:.1f}% "
            f"of {r['device_kind']} {r['mfu_against']} peak")
    if "xla_bytes" in r:
      xb = {k: f"{v / 2**20:.0f}" for k, v in r["xla_bytes"].items()}
      print(f"    XLA buffers MiB: {xb}")
  print("(GFLOP from XLA's cost analysis; * = torch FlopCounterMode, matmuls and convolutions "
        "only; loss@1 = first step's loss, or logits[0, 0] for inference)")


def parent_main(args) -> None:
  cfg = model_config(args)
  t0 = time.perf_counter()
  weights = weights_file(cfg, args.seed)
  print(f"weights of build_reference(seed={args.seed}) at {weights} "
        f"({time.perf_counter() - t0:.1f} s)", flush=True)
  contenders = []
  if args.framework in ("jax", "both"):
    contenders.append(Contender("jax", "jax", ""))
  for v in args.variant:
    name, _, flags = v.partition("=")
    contenders.append(Contender(f"jax[{name}]", "jax", flags))
  if args.framework in ("torch", "both"):
    contenders.append(Contender("torch", "torch", ""))
  keys = (["train"] if args.mode in ("train", "all") else []) + (
      [f"infer:{b}" for b in args.infer_batch] if args.mode in ("infer", "all") else [])
  load0 = load_average()
  rows = []
  try:
    for c in contenders:
      c.start(args, weights)
      print(f"{c.name}: {c.hello}", flush=True)
    for key in keys:
      preps = {}
      for c in contenders:
        preps[c.name] = c.ask(op="prepare", key=key)
        print(f"{c.name} {key} prepared: "
              f"{ {k: v for k, v in preps[c.name].items() if k != 'ok'} }", flush=True)
      warm = collections.defaultdict(list)
      runs = collections.defaultdict(list)
      n_steps = args.steps if key == "train" or not args.infer_steps else args.infer_steps
      for i in range(args.warmup + n_steps):
        order = contenders[i % len(contenders):] + contenders[:i % len(contenders)]
        for c in order:
          r = c.ask(op="step", key=key)
          (warm if i < args.warmup else runs)[c.name].append(r)
          print(f"  {key} {'warm-up' if i < args.warmup else 'step'} {c.name}: "
                f"{1e3 * r['wall_s']:.0f} ms (cpu {r['cpu_s']:.1f} s, load "
                f"{load_average():.1f}) loss {r['loss']:.6f}", flush=True)
      for c in contenders:
        rows.append(summarize(key, c, preps[c.name], runs[c.name], warm[c.name], args.dtype))
  finally:
    for c in contenders:
      c.stop()
  load = (load0, load_average())
  print_table(rows)
  print(f"\nload average {load[0]:.1f} -> {load[1]:.1f} on {os.cpu_count()} cores")
  if args.markdown:
    print("\n" + MD_HEADER + "\n" + markdown_rows(rows, args, load))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(rows=rows, load=load, machine=machine_line(), args=vars(args),
                     date=datetime.date.today().isoformat()), f,
                indent=1, default=str)


def report_main(args) -> None:
  """Re-prints the table and markdown rows of a saved --json result."""
  with open(args.report) as f:
    saved = json.load(f)
  run = argparse.Namespace(**saved["args"])
  print_table(saved["rows"])
  if args.markdown:
    print("\n" + MD_HEADER + "\n" + markdown_rows(saved["rows"], run, tuple(saved["load"]),
                                                   saved.get("date")))


# ----------------------------------------------------------------------------- profile


PARTS = (("cross_attention", "cross/CSA"), ("VIT_cross", "VIT_cross"), ("VIT_base", "VIT_base"),
         ("ir_back", "backbone"), ("qcs.embed", "embed"), ("loss", "loss"))


def hlo_op_names(hlo_text: str) -> dict[str, str]:
  """Instruction name -> op_name metadata; a fusion without one takes its body's first."""
  current = None
  first_in_comp: dict[str, str] = {}
  inst: dict[str, tuple[str, str, str]] = {}
  for line in hlo_text.splitlines():
    m = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$", line)
    if m and not line.startswith(" "):
      current = m.group(1)
      continue
    m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?(?:calls=%?([\w.\-]+))?.*$", line)
    if not m:
      continue
    name = m.group(1)
    op = re.search(r'op_name="([^"]*)"', line)
    calls = re.search(r"calls=%?([\w.\-]+)", line)
    opn = op.group(1) if op else ""
    inst[name] = (opn, calls.group(1) if calls else "", current or "")
    if opn and current and current not in first_in_comp:
      first_in_comp[current] = opn
  out = {}
  for name, (opn, calls, _) in inst.items():
    out[name] = opn or first_in_comp.get(calls, "")
  return out


def classify(op_name: str, inst: str) -> tuple[str, str, str]:
  """(model part, fwd/bwd, op kind) of one HLO instruction."""
  part = "optimizer/other" if op_name else "unattributed (no metadata)"
  for pat, label in PARTS:
    if pat in op_name:
      part = label
      break
  if part == "optimizer/other" and ("conv" in op_name.split("/")[-1] or "embed" in op_name):
    part = "embed"
  direction = "bwd" if "transpose(" in op_name else ("fwd" if "jvp(" in op_name else "-")
  if inst.startswith(("ynn_fusion", "xnn_fusion")):
    kind = "ynn/xnn (conv/dot)"
  elif inst.startswith("convolution") or inst.startswith("conv"):
    kind = "conv (eigen)"
  elif inst.startswith("dot"):
    kind = "dot (eigen)"
  elif "transpose" in inst or inst.startswith("copy"):
    kind = "transpose/copy"
  elif "reduce" in inst:
    kind = "reduce"
  else:
    kind = "elementwise/other"
  return part, direction, kind


def profile_main(args) -> None:
  """Traces JAX steps and adds up the thunk times by model part, direction and op kind."""
  import jax  # pylint: disable=import-outside-toplevel
  cfg = model_config(args)
  sd = load_state_dict(weights_file(cfg, args.seed))
  bench = JaxBench(args, cfg, sd)
  key = "train" if args.mode in ("train", "all") else f"infer:{args.infer_batch[0]}"
  prep = bench.prepare(key)
  print(f"{key}: compile {prep['lower_s'] + prep['compile_s']:.1f} s, "
        f"{prep.get('flops', 0) / 1e9:.1f} GFLOP", flush=True)
  names = hlo_op_names(bench.prepared[key]["compiled"].as_text())
  for _ in range(args.warmup):
    bench.step(key)
  logdir = tempfile.mkdtemp(prefix="qcs_bench_trace_")
  walls = []
  with jax.profiler.trace(logdir, create_perfetto_trace=True):
    for _ in range(args.steps):
      walls.append(bench.step(key)["wall_s"])
  path = [os.path.join(d, f) for d, _, fs in os.walk(logdir) for f in fs
          if f.endswith("perfetto_trace.json.gz")][0]
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  by = collections.Counter()
  per_op = collections.Counter()
  total = 0.0
  for e in events:
    if e.get("ph") != "X" or e["name"] not in names:
      continue
    d = e.get("dur", 0) / 1e3 / args.steps
    part, direction, kind = classify(names[e["name"]], e["name"])
    by[(part, direction, kind)] += d
    per_op[(e["name"], names[e["name"]])] += d
    total += d
  wall = 1e3 * statistics.median(walls)
  print(f"\nwall {wall:.0f} ms/step (median of {args.steps}); traced thunk time {total:.0f} ms/step"
        f" (thunks may overlap); trace at {path}")
  print("Note: Eigen convolutions (the non-YNN path) run asynchronously on the intra-op pool and "
        "appear only as their dispatch here; --parts times every part whatever runs it.")
  parts = collections.Counter()
  kinds = collections.Counter()
  for (part, direction, kind), d in by.items():
    parts[(part, direction)] += d
    kinds[kind] += d
  print("\nby model part (ms/step, % of traced):")
  for (part, direction), d in sorted(parts.items(), key=lambda kv: -kv[1]):
    print(f"  {part:<16} {direction:<4} {d:9.1f}  {100 * d / total:5.1f}%")
  print("\nby op kind:")
  for kind, d in kinds.most_common():
    print(f"  {kind:<22} {d:9.1f}  {100 * d / total:5.1f}%")
  print(f"\ntop {args.top} ops:")
  for (name, opn), d in per_op.most_common(args.top):
    print(f"  {d:8.1f} ms  {name:<32} {opn[-110:]}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(wall_ms=wall, traced_ms=total,
                     parts={f"{p}|{d}": v for (p, d), v in parts.items()},
                     kinds=dict(kinds), by={"|".join(k): v for k, v in by.items()},
                     top=[(n, o, d) for (n, o), d in per_op.most_common(args.top)]), f, indent=1)


# ----------------------------------------------------------------------------- parts


def jax_parts(args, cfg: dict, sd: dict) -> dict[str, tuple[Callable[[], Any], float]]:
  """Forward+backward of each part of one SAM pass, jitted alone, on the step's shapes.

  Every part takes the gradient of its parameters AND of its inputs (what backprop
  through the whole network needs), with random cotangents. The optimizer part is
  SAM's normalise/perturb plus Adam (tx.update with both gradients given).
  Returns part -> (run once, compile seconds).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  bench = JaxBench(args, cfg, sd)
  m, v = bench.model, bench.variables
  params, stats = v["params"], v["batch_stats"]
  images, _ = make_batch(bench.cfg, args.batch, args.seed)
  b, nb = images.shape[:2]
  x = jnp.asarray(images.reshape((b * nb,) + images.shape[2:]))
  rng = np.random.default_rng(0)

  def cot(tree):
    return jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), tree)

  def part(fn, p, *inputs, mutable=False):
    """jit(grad of <cotangent, fn(p, *inputs)>) w.r.t. p and the float inputs."""
    out = jax.eval_shape(fn, p, *inputs)
    c = cot(out)
    diff = tuple(range(1 + len(inputs)))

    def loss(p, *xs):
      y = fn(p, *xs)
      return sum(jnp.vdot(a.astype(jnp.float32), b.astype(jnp.float32))
                 for a, b in zip(jax.tree.leaves(y), jax.tree.leaves(c)))
    return jax.jit(jax.grad(loss, argnums=diff)), (p,) + inputs

  def sub(name):
    return {"params": params[name]}

  def apply_method(method, mutable=()):
    def fn(p, *xs):
      out = m.apply({"params": p, "batch_stats": stats}, *xs, method=method,
                    mutable=list(mutable))
      return out[0] if mutable else out
    return fn

  fwd_base = jax.jit(lambda v, x: m.apply(v, x, method=lambda mm, x: mm.base_forward(
      x, train=True, groups=nb), mutable=["batch_stats"])[0])
  _, tokens, (x1, x2, x3) = fwd_base(v, x)
  tokens4 = tokens.reshape((b, nb) + tokens.shape[1:])
  jobs = {
      "backbone (ir_back)": part(apply_method(
          lambda mm, x: mm.ir_back(x, train=True, groups=nb), ["batch_stats"]), params, x),
      "embed (conv1-3, embed_q/k/v)": part(apply_method(
          lambda mm, a, b_, c: mm.embed(a, b_, c)), params, x1, x2, x3),
      "VIT_base": part(apply_method(lambda mm, t: mm.VIT_base(t, train=True)), params, tokens),
  }
  if cfg["name"] != "baseline":
    def cross_only(mm, t4):
      levels = jnp.split(t4, 3, axis=2)
      mods = (mm.cross_attention_1, mm.cross_attention_2, mm.cross_attention_3)
      return t4 + jnp.concatenate([mod(lv) for mod, lv in zip(mods, levels)], axis=2)
    jobs["cross modules + CSA"] = part(apply_method(cross_only), params, tokens4)
    jobs["VIT_cross"] = part(apply_method(lambda mm, u: mm.VIT_cross(u, train=True)), params,
                             tokens)
  grads = cot(params)
  opt_state = bench.tx.init(params)

  def opt_step(p, g, s):
    updates, s = bench.tx.update(g, s, p, grad_fn=lambda q, i: g)
    return optax.apply_updates(p, updates), s
  jobs["optimizer (SAM perturb + Adam)"] = (jax.jit(opt_step), (params, grads, opt_state))
  out = {}
  for name, (fn, fargs) in jobs.items():
    t0 = time.perf_counter()
    compiled = fn.lower(*fargs).compile()
    out[name] = (functools.partial(_run_blocking, jax, compiled, fargs),
                 time.perf_counter() - t0)
  return out


def _run_blocking(jax, compiled, fargs):
  return jax.block_until_ready(compiled(*fargs))


def torch_parts(args, cfg: dict, sd: dict) -> dict[str, tuple[Callable[[], Any], float]]:
  """The same parts on the PyTorch reference (ir_back called once per branch, as it does)."""
  import torch  # pylint: disable=import-outside-toplevel
  tb = TorchBench(args, cfg, sd)
  R, net = tb.R, tb.net
  net.load_state_dict(tb.state_dict)
  net.train()
  images, _ = make_batch(cfg, args.batch, args.seed)
  b, nb = images.shape[:2]
  branches = [R.to_nchw(images[:, i]) for i in range(nb)]
  gen = torch.Generator().manual_seed(0)

  def backward(outs, inputs):
    outs = [o for o in outs if o.requires_grad]
    torch.autograd.backward(outs, [torch.randn(o.shape, generator=gen) for o in outs])
    for t in inputs:
      t.grad = None
    net.zero_grad(set_to_none=True)

  def leaf(t):
    return t.detach().requires_grad_(True)

  with torch.no_grad():
    feats = [net.ir_back(x) for x in branches]
    toks = []
    for x1, x2, x3 in feats:
      t1 = net.embed_q(net.conv1(x1)).flatten(2).transpose(1, 2)
      t2 = net.embed_k(net.conv2(x2)).flatten(2).transpose(1, 2)
      t3 = net.embed_v(net.conv3(x3))
      toks.append(torch.cat([t1, t2, t3], 1))
    vit_out = [net.VIT_base(t)[1] for t in toks]
  feats = [[leaf(t) for t in f] for f in feats]
  toks = [leaf(t) for t in toks]
  vit_out = [leaf(t) for t in vit_out]

  def backbone():
    backward([y for x in branches for y in net.ir_back(x)], [])

  def embed():
    outs = []
    for x1, x2, x3 in feats:
      outs += [net.embed_q(net.conv1(x1)), net.embed_k(net.conv2(x2)), net.embed_v(net.conv3(x3))]
    backward(outs, [t for f in feats for t in f])

  def vit_base():
    backward([y for t in toks for y in net.VIT_base(t)], toks)

  n = vit_out[0].shape[1] // 3

  def cross():
    outs = []
    for level in range(3):
      mod = getattr(net, f"cross_attention_{level + 1}")
      outs += mod(*[t[:, level * n:(level + 1) * n] for t in vit_out])
    backward(outs, vit_out)

  def vit_cross():
    backward([net.VIT_cross(t)[0] for t in vit_out], vit_out)

  params = [p for p in net.parameters()]
  opt = torch.optim.Adam(params, lr=4e-6)
  grads = [torch.randn(p.shape, generator=gen) for p in params]

  def optimizer():
    with torch.no_grad():
      for p, g in zip(params, grads):
        p.grad = g
      norm = torch.sqrt(sum(torch.sum(g * g) for g in grads))
      es = []
      for p, g in zip(params, grads):
        e = 0.05 * g / (norm + 1e-12)
        p.add_(e)
        es.append(e)
      for p, e in zip(params, es):
        p.sub_(e)
    opt.step()

  return {"backbone (ir_back)": (backbone, 0.0), "embed (conv1-3, embed_q/k/v)": (embed, 0.0),
          "VIT_base": (vit_base, 0.0), "cross modules + CSA": (cross, 0.0),
          "VIT_cross": (vit_cross, 0.0), "optimizer (SAM perturb + Adam)": (optimizer, 0.0)}


def parts_main(args) -> None:
  """Times each part of a training pass alone in this process (no worker processes)."""
  cfg = model_config(args)
  sd = load_state_dict(weights_file(cfg, args.seed))
  nb = num_branches(cfg["name"])
  print(f"parts of one SAM pass: {args.model} {args.width}, {args.batch} anchors x {nb} "
        f"branches; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
  jobs = {}
  if args.framework in ("jax", "both"):
    jobs["jax"] = jax_parts(args, cfg, sd)
  if args.framework in ("torch", "both"):
    jobs["torch"] = torch_parts(args, cfg, sd)
  results: dict[str, dict[str, dict]] = {k: {} for k in jobs}
  names = list(next(iter(jobs.values())))
  for name in names:
    # The frameworks take turns, so a fluctuating machine load hits both alike.
    samples = collections.defaultdict(list)
    for i in range(args.warmup + args.steps):
      for fw, parts in jobs.items():
        r = timed(parts[name][0])
        if i >= args.warmup:
          samples[fw].append(r)
    for fw in jobs:
      walls = [r["wall_s"] for r in samples[fw]]
      results[fw][name] = dict(ms=1e3 * statistics.median(walls), ms_min=1e3 * min(walls),
                               cpu_s=statistics.median(r["cpu_s"] for r in samples[fw]),
                               compile_s=jobs[fw][name][1])
      print(f"  {fw:<6}{name:<32} {results[fw][name]['ms']:9.0f} ms (min "
            f"{results[fw][name]['ms_min']:.0f})  cpu {results[fw][name]['cpu_s']:6.2f} s  "
            f"compile {jobs[fw][name][1]:5.1f} s  load {load_average():.1f}", flush=True)
  print(f"\n{'part (fwd+bwd, one pass), median ms':<38}" + "".join(f"{k:>10}" for k in jobs))
  for name in names:
    print(f"{name:<38}" + "".join(f"{results[k][name]['ms']:>10.0f}" for k in jobs))
  def step_sum(res):  # a step: every model part twice (two SAM passes), the optimizer once
    return sum(v["ms"] * (1 if n.startswith("optimizer") else 2) for n, v in res.items())
  print(f"{'sum: 2 x model parts + optimizer':<38}" + "".join(
      f"{step_sum(results[k]):>10.0f}" for k in jobs))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(results=results, xla_flags=os.environ.get("XLA_FLAGS", ""),
                     load=load_average()), f, indent=1)


# ----------------------------------------------------------------------------- roofline


def roofline_main(args) -> None:
  """The machine's attainable float32 rate: the best of square GEMMs in both frameworks.

  A train step's FLOP/s against this says how much room any framework has left.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(args.threads)
  jmm = jax.jit(lambda x: x @ x)
  rows = []
  for n in args.roofline_sizes:
    a = np.random.default_rng(0).normal(size=(n, n)).astype(np.float32)
    ja, ta = jax.device_put(a), torch.from_numpy(a)
    fns = {"jax": lambda: jmm(ja).block_until_ready(), "torch": lambda: torch.mm(ta, ta)}
    for name, fn in fns.items():
      fn()  # compiles (JAX) and warms up
      best = min(timed(fn)["wall_s"] for _ in range(args.steps))
      rows.append((name, n, 2 * n ** 3 / best / 1e9))
      print(f"  {name:<6} {n}x{n} float32 GEMM: {rows[-1][2]:7.1f} GFLOP/s (best of "
            f"{args.steps})", flush=True)
  best = max(rows, key=lambda r: r[2])
  print(f"attainable float32 rate on {machine_line()}: {best[2]:.1f} GFLOP/s "
        f"({best[0]}, {best[1]}x{best[1]})")


# ----------------------------------------------------------------------------- CLI


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog="\n".join(__doc__.splitlines()[2:]))
  ap.add_argument("--framework", choices=("jax", "torch", "both"), default="both")
  ap.add_argument("--model", choices=("qcs", "dcs"), default="qcs")
  ap.add_argument("--mode", choices=("train", "infer", "all"), default="all")
  ap.add_argument("--batch", type=int, default=2, help="train step: anchors (x branches images)")
  ap.add_argument("--infer_batch", default="1,16,64", help="comma-separated inference batches")
  ap.add_argument("--img_size", type=int, default=0, help="0: the width preset's (224 / 64)")
  ap.add_argument("--width", choices=("paper", "small"), default="paper")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  ap.add_argument("--steps", type=int, default=3, help="timed steps per contender")
  ap.add_argument("--infer_steps", type=int, default=0, help="timed inference steps (0: --steps)")
  ap.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
  ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
  ap.add_argument("--variant", action="append", default=[],
                  help="NAME=XLA_FLAGS: one more JAX contender with these extra XLA flags")
  ap.add_argument("--torch_flops", action="store_true",
                  help="count the reference's FLOPs with torch's FlopCounterMode (one more step)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--markdown", action="store_true", help="also print docs/BENCHMARKS.md rows")
  ap.add_argument("--json", default="", help="write the results here")
  ap.add_argument("--profile", action="store_true",
                  help="JAX only, in-process: trace --steps steps, time by part / op kind")
  ap.add_argument("--top", type=int, default=25, help="--profile: ops listed")
  ap.add_argument("--parts", action="store_true",
                  help="in-process: time backbone / embed / ViTs / cross+CSA / optimizer alone")
  ap.add_argument("--roofline", action="store_true",
                  help="best float32 GEMM GFLOP/s of both frameworks: the machine's ceiling")
  ap.add_argument("--roofline_sizes", default="1024,2048,4096", help="--roofline: GEMM sizes n")
  ap.add_argument("--report", default="",
                  help="print the table (and --markdown rows) of a --json file")
  ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--weights", default="", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  args.infer_batch = [int(b) for b in str(args.infer_batch).split(",") if b]
  args.roofline_sizes = [int(n) for n in str(args.roofline_sizes).split(",") if n]
  # What a worker needs to rebuild the same model and batch.
  args.passthrough = ["--model", args.model, "--batch", str(args.batch), "--img_size",
                      str(args.img_size), "--width", args.width, "--dtype", args.dtype,
                      "--threads", str(args.threads), "--seed", str(args.seed)] + (
                          ["--torch_flops"] if args.torch_flops else [])
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  if (args.worker and args.framework == "jax") or args.profile or args.parts or args.roofline:
    # What the entry points run with (a --variant's own XLA_FLAGS win).
    from qcs_jax import runtime  # pylint: disable=import-outside-toplevel
    runtime.set_cpu_xla_defaults()
  if args.worker:
    worker_main(args)
  elif args.report:
    report_main(args)
  elif args.profile:
    profile_main(args)
  elif args.parts:
    parts_main(args)
  elif args.roofline:
    roofline_main(args)
  else:
    parent_main(args)


if __name__ == "__main__":
  main()
