"""Contenders in worker processes, taking their steps in turn (A B C A B C ...)."""
from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

from qcs_jax.bench.workload import (WORKER_TAG, load_average, load_state_dict, machine_line,
                                  model_config, weights_file)
from qcs_jax.bench.jax_side import JaxBench
from qcs_jax.bench.torch_side import TorchBench
from qcs_jax.bench.report import MD_HEADER, markdown_rows, print_table, summarize
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def worker_main(args) -> None:
  """One contender in its own process: reads commands on stdin, answers JSON lines."""
  def say(obj):
    sys.stdout.write(WORKER_TAG + json.dumps(obj) + "\n")
    sys.stdout.flush()

  cfg = model_config(args)
  sd = load_state_dict(args.weights) if args.weights else None
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
  dtype: str = "float32"
  channels_last: bool = False
  proc: Any = None
  hello: dict = dataclasses.field(default_factory=dict)

  def start(self, args, weights: str) -> None:
    env = dict(os.environ)
    if self.framework == "jax":
      env["XLA_FLAGS"] = " ".join(x for x in (os.environ.get("XLA_FLAGS", ""), self.xla_flags)
                                  if x).strip()
    # The worker imports this very qcs_jax (a worktree's copy, not an installed one).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "qcs_jax.bench", "--worker", "--framework", self.framework,
           "--weights", weights] + args.passthrough + ["--dtype", self.dtype] + (
               ["--channels_last"] if self.channels_last else [])
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


def parse_extra(spec: str) -> Contender:
  """'torch:bfloat16:channels_last' -> a Contender (framework[:dtype][:channels_last])."""
  parts = spec.split(":")
  fw, dtype = parts[0], (parts[1] if len(parts) > 1 and parts[1] else "float32")
  flags = parts[2:]
  if (fw not in ("jax", "torch") or dtype not in ("float32", "bfloat16")
      or any(f != "channels_last" for f in flags) or (flags and fw != "torch")):
    raise ValueError(f"--extra {spec!r}: expected jax[:DTYPE] or torch[:DTYPE][:channels_last], "
                     "DTYPE float32 or bfloat16")
  cl = bool(flags)
  tags = ([] if dtype == "float32" else ["bf16"]) + (["channels_last"] if cl else [])
  return Contender(fw + (f"[{','.join(tags)}]" if tags else ""), fw, "", dtype, cl)


def make_contenders(args) -> list[Contender]:
  """--framework's contenders at --dtype, each --variant (JAX flags), each --extra."""
  out = []
  if args.framework in ("jax", "both"):
    out.append(Contender("jax", "jax", "", args.dtype))
  for v in args.variant:
    name, _, flags = v.partition("=")
    out.append(Contender(f"jax[{name}]", "jax", flags, args.dtype))
  if args.framework in ("torch", "both"):
    out.append(Contender("torch", "torch", "", args.dtype))
  out += [parse_extra(e) for e in args.extra]
  names = [c.name for c in out]
  for c in out:  # two contenders of one name: the second says its dtype
    if names.count(c.name) > 1 and c.dtype != args.dtype:
      c.name += f"<{c.dtype}>"
  return out


def parent_main(args) -> None:
  cfg = model_config(args)
  t0 = time.perf_counter()
  contenders = make_contenders(args)
  if args.random_weights:
    if any(c.framework == "torch" for c in contenders):
      raise SystemExit("error: --random_weights is for JAX-only runs (--framework jax)")
    weights = ""
  else:
    weights = weights_file(cfg, args.seed)
  print(f"weights of build_reference(seed={args.seed}) at {weights or '(random, JAX)'} "
        f"({time.perf_counter() - t0:.1f} s)", flush=True)
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
        rows.append(summarize(key, c, preps[c.name], runs[c.name], warm[c.name], c.dtype))
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
