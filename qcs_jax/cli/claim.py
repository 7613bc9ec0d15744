"""qcs-claim: the claim experiment's grid from the command line (qcs_jax.experiments.claim).

  qcs-claim --quick --out runs/claim_quick          # smoke test: 4 tiny runs
  qcs-claim --plan issue27 --out runs/claim27 --rows experiments/claim_rows.jsonl

Rerunning the same command resumes; several processes may share one grid
(docs/EXPERIMENTS.md).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import jax

from qcs_jax import recipes as config_lib, runtime
from qcs_jax.data.base import DataError
from qcs_jax.experiments import claim_report, claim_store
from qcs_jax.experiments.claim import (MODELS, QUICK, REAL_DATA, RESULTS, WIDTHS, Cell, Settings,
                                       cell_config, grid, plan_27, run_grid)
from qcs_jax.experiments.claim_store import read_rows


def _floats(text: str) -> tuple[float, ...]:
  return tuple(float(x) for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(x) for x in text.split(",") if x.strip())


def _names(text: str) -> tuple[str, ...]:
  return tuple(x.strip() for x in text.split(",") if x.strip())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  d = Settings()
  ap = argparse.ArgumentParser(prog="qcs-claim", description=__doc__.splitlines()[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog="\n".join(__doc__.splitlines()[2:]))
  ap.add_argument("--out", required=True, help="results folder (rerun the command to resume)")
  ap.add_argument("--quick", action="store_true",
                  help="smoke test: baseline and QCS x 2 strengths x 1 seed, tiny network, 1 epoch")
  ap.add_argument("--plan", default="", choices=("", "issue27"),
                  help="issue27: the whole grid of issue 27 (--models/--strengths/--seeds/"
                       "--nuisances ignored)")
  ap.add_argument("--models", default=",".join(MODELS), help=f"subset of {','.join(MODELS)}")
  ap.add_argument("--strengths", default="0,0.5,0.8,0.95", help="confound strengths p")
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--nuisances", default="background",
                  help="nuisances tied to the class with probability p (synthetic data; "
                       "several: tied together in each cell)")
  ap.add_argument("--data", default=d.data, help=f"synthetic or one of {','.join(REAL_DATA)}")
  ap.add_argument("--root", default="", help="data set folder (real data)")
  ap.add_argument("--csv", default="", help="path,label,split manifest (--data csv)")
  ap.add_argument("--recipe", default=None,
                  help="released recipe for real data: rafdb, ferplus, affectnet7, affectnet8 "
                       "(default: --data's own, rafdb for folder and csv)")
  ap.add_argument("--image_size", type=int, default=d.image_size)
  ap.add_argument("--num_train", type=int, default=d.num_train)
  ap.add_argument("--num_test", type=int, default=d.num_test)
  ap.add_argument("--label_noise", type=float, default=d.label_noise)
  ap.add_argument("--width", default=d.width, choices=sorted(WIDTHS))
  ap.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (synthetic)")
  ap.add_argument("--warmup_steps", type=int, default=d.warmup_steps)
  ap.add_argument("--gamma", type=float, default=d.gamma, help="lr decay per epoch")
  ap.add_argument("--sam", type=int, choices=(0, 1), default=int(d.sam),
                  help="1: SAM (two passes a step, the released recipes), 0: plain Adam")
  ap.add_argument("--expression_strength", type=float, default=d.expression_strength,
                  help="renderer: scale of each face's departure from neutral")
  ap.add_argument("--expression_jitter", type=float, default=d.expression_jitter,
                  help="renderer: scale of the within-class variation")
  ap.add_argument("--images_per_step", type=int, default=d.images_per_step)
  ap.add_argument("--epochs", type=int, default=None,
                  help=f"epochs per run (synthetic default {d.epochs}; real data: the recipe's)")
  ap.add_argument("--budget", default=None, choices=("images", "recipe"),
                  help="images: equal images through the backbone (synthetic default); "
                       "recipe: each model's released recipe (real-data default)")
  ap.add_argument("--set", action="append", default=[], dest="overrides",
                  help="config override key=value for every run, e.g. init.backbone=ir50.npz")
  ap.add_argument("--rows", default="",
                  help="the finished rows, one JSON line each (default OUT/results.jsonl); "
                       "commit it to resume in another session or on another machine")
  ap.add_argument("--until", default="",
                  help="start no cell after this UTC time, HH:MM today (or an ISO date-time)")
  ap.add_argument("--stale_s", type=float, default=claim_store.STALE_S,
                  help="a claim not refreshed for this long is another host's dead run")
  ap.add_argument("--report_only", action="store_true", help="redraw table and figure only")
  ap.add_argument("--keep_checkpoints", action="store_true")
  return ap.parse_args(argv)


def settings_from_args(a: argparse.Namespace) -> tuple[Settings, list[Cell]]:
  real = a.data != "synthetic"
  if a.quick:
    q = QUICK["settings"]
    return q, grid(QUICK["models"], QUICK["strengths"], QUICK["seeds"])
  s = Settings(data=a.data, image_size=a.image_size,
               num_train=a.num_train, num_test=a.num_test, label_noise=a.label_noise,
               width=a.width, images_per_step=a.images_per_step, lr=a.lr,
               warmup_steps=a.warmup_steps, gamma=a.gamma, sam=bool(a.sam),
               expression_strength=a.expression_strength,
               expression_jitter=a.expression_jitter,
               epochs=a.epochs if a.epochs is not None else (0 if real else Settings.epochs),
               budget=a.budget or ("recipe" if real else "images"), root=a.root, csv=a.csv,
               recipe=a.recipe or (a.data if a.data in config_lib.PAPER_DATASETS else "rafdb"),
               overrides=tuple(a.overrides))
  strengths = (None,) if real else _floats(a.strengths)
  if a.plan == "issue27":
    if real:
      raise ValueError("--plan issue27 is a synthetic-data grid; drop --plan for --data")
    cells = plan_27()
  else:
    cells = grid(_names(a.models), strengths, _ints(a.seeds), _names(a.nuisances))
  cell_config(s, cells[0])  # fails early on a bad option
  return s, cells


def use_compile_cache(out: str) -> None:
  """Persistent XLA cache in OUT (unless JAX_COMPILATION_CACHE_DIR is set): the cells of a
  model share their programs, so each model compiles once per grid, not once per cell."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(out), "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv: Sequence[str] | None = None) -> int:
  try:
    a = parse_args(argv)
    s, cells = settings_from_args(a)
    failures: list[str] = []
    rows_path = a.rows or os.path.join(a.out, RESULTS)
    if a.report_only:
      rows = read_rows(rows_path)
      print(claim_store.cost_line(rows, [c for c in cells
                                         if c.key not in {r["cell"] for r in rows}]))
    else:
      until = claim_store.parse_until(a.until) if a.until else None
      use_compile_cache(a.out)
      rows, failures = run_grid(s, cells, a.out, a.keep_checkpoints, rows_path=rows_path,
                                until=until, stale_s=a.stale_s)
    if rows:
      table, figure = claim_report.write_report(rows, a.out)
      print(open(table).read())
      print(f"wrote {table} and {figure}")
  except (ValueError, DataError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if failures:
    print(f"error: {len(failures)} cell(s) failed: " + "; ".join(failures), file=sys.stderr)
    return 1
  return 0


def run() -> None:
  """Console script `qcs-claim`."""
  runtime.set_cpu_xla_defaults()
  sys.exit(main())


if __name__ == "__main__":
  run()
