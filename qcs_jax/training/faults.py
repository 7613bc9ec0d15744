"""Fault injection: SIGKILL a training run at random moments, resume it, compare.

``python -m qcs_jax.training.faults --config=CFG --root=DIR --kills=20`` runs
CFG once uninterrupted (DIR/reference) and once killed ``kills`` times
(DIR/killed): each time the run has made progress (a new metrics row or a new
checkpoint since it started) it is killed after a random delay, or, for every
third kill, the moment a checkpoint save is in progress (orbax's temporary
directory exists). After the last kill the same command finishes the run. The
two workdirs must then hold bit-identical latest checkpoints, identical metrics
rows (timing fields aside) and identical best/ weights.

Everything runs as child processes of ``python -m qcs_jax.train`` (optionally
through the multi-process launcher with ``--processes``), so a kill is a real
SIGKILL of the whole training process.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from typing import Sequence

import jax
import numpy as np

from qcs_jax.model_files import model_dir
from qcs_jax.training import checkpoints

TIMING_FIELDS = ("images_per_sec", "input_wait")


def _cmd(config: str, workdir: str, overrides: Sequence[str]) -> list[str]:
  return [sys.executable, "-m", "qcs_jax.train", f"--config={config}", f"--workdir={workdir}",
          *overrides]


def _progress(workdir: str) -> tuple[int, int]:
  """(metrics rows, finished checkpoint steps) in workdir, as a progress mark."""
  rows = 0
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path, "rb") as f:
      rows = f.read().count(b"\n")
  ck = os.path.join(workdir, "checkpoints")
  steps = len([d for d in os.listdir(ck) if d.isdigit()]) if os.path.isdir(ck) else 0
  return rows, steps


def _saving(workdir: str) -> bool:
  ck = os.path.join(workdir, "checkpoints")
  return os.path.isdir(ck) and any("tmp" in d for d in os.listdir(ck))


def _kill(proc: subprocess.Popen) -> None:
  """SIGKILL proc and, when it is the launcher's process group, all of it."""
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  proc.wait()


def killed_run(config: str, workdir: str, kills: int, seed: int, overrides: Sequence[str],
               max_delay_s: float, launcher: Sequence[str] = (), log=print) -> list[str]:
  """Runs CFG in workdir with `kills` SIGKILLs; returns what each kill hit."""
  rng = random.Random(seed)
  hits = []
  cmd = [*launcher, *_cmd(config, workdir, overrides)] if launcher else _cmd(
      config, workdir, overrides)
  while len(hits) < kills:
    start = _progress(workdir)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    in_save = len(hits) % 3 == 2
    delay = rng.uniform(0.0, max_delay_s)
    moved_at = None
    hit = None
    while proc.poll() is None:
      now = time.monotonic()
      if moved_at is None and _progress(workdir) != start:
        moved_at = now
      if moved_at is not None:
        if in_save and _saving(workdir):
          hit = "inside a checkpoint save"
        elif not in_save and now - moved_at >= delay:
          hit = "during a save" if _saving(workdir) else f"{delay:.2f} s after progress"
      if hit:
        _kill(proc)
        break
      time.sleep(0.005)
    if proc.returncode not in (0, -signal.SIGKILL) and hit is None:
      raise RuntimeError(f"the training process failed (exit {proc.returncode}); "
                         f"rerun {' '.join(cmd)} to see why")
    if hit is None:  # it finished first: nothing left to kill
      break
    hits.append(hit)
    log(f"kill {len(hits)}/{kills}: {hit}, at {_progress(workdir)} (rows, checkpoints)")
  subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
  return hits


def metrics_rows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f if l.strip()]
  return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def _same_tree(a, b) -> bool:
  if jax.tree.structure(a) != jax.tree.structure(b):
    return False
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def compare(reference: str, other: str) -> dict:
  """Weights, metrics rows and best/ of two workdirs: what matches."""
  ra, rb = metrics_rows(reference), metrics_rows(other)
  same_rows = sum(x == y for x, y in zip(ra, rb))
  best = [model_dir.load_variables(os.path.join(d, "best"))[0] for d in (reference, other)]
  return {"weights_exact": _same_tree(checkpoints.latest_variables(reference),
                                      checkpoints.latest_variables(other)),
          "rows": len(ra), "rows_equal": same_rows if len(ra) == len(rb) else 0,
          "rows_other": len(rb), "best_exact": _same_tree(*best)}


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m qcs_jax.training.faults", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="recipe file, as for qcs_jax.train")
  p.add_argument("--root", required=True, help="new folder for the two workdirs")
  p.add_argument("--kills", type=int, default=20)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--max_delay_s", type=float, default=3.0,
                 help="a kill comes up to this long after the run's first progress")
  p.add_argument("--processes", type=int, default=1,
                 help="> 1: train through the local multi-process launcher")
  a, overrides = p.parse_known_args(argv)  # the rest: --config.x=y flags for both runs
  a.overrides = overrides
  if os.path.exists(os.path.join(a.root, "reference")):
    print(f"error: {a.root} already holds a fault-injection run; pick a new --root",
          file=sys.stderr)
    return 2
  launcher = ([sys.executable, "-m", "qcs_jax.training.distributed",
               f"--processes={a.processes}", "--"] if a.processes > 1 else [])
  ref, bad = os.path.join(a.root, "reference"), os.path.join(a.root, "killed")
  t0 = time.monotonic()
  subprocess.run([*launcher, *_cmd(a.config, ref, a.overrides)], check=True,
                 stdout=subprocess.DEVNULL)
  hits = killed_run(a.config, bad, a.kills, a.seed, a.overrides, a.max_delay_s, launcher)
  got = compare(ref, bad)
  exact = got["weights_exact"] and got["best_exact"] and got["rows_equal"] == got["rows"]
  print(json.dumps({"kills": len(hits), "hits": hits, **got,
                    "seconds": round(time.monotonic() - t0, 1)}, indent=1))
  print(f"{len(hits)} kills, resumed {len(hits)} times: "
        + ("exact" if exact else "NOT exact")
        + f" (weights {'bit-identical' if got['weights_exact'] else 'differ'}, "
        f"{got['rows_equal']}/{got['rows']} metrics rows identical, best/ "
        f"{'identical' if got['best_exact'] else 'differs'})")
  return 0 if exact else 1


if __name__ == "__main__":
  sys.exit(main())
