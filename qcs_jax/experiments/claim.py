"""Does QCS isolate redundant features? A grid of training runs (issue 16).

models {baseline, dcs, qcs-sd, qcs-s, qcs-d} x confound strength p x seeds, on the
synthetic faces whose training split ties a nuisance (background by default) to the
class with probability p, while the test split keeps it independent: a model that
learned the nuisance loses test accuracy as p grows. The same command runs the five
models x seeds on a real data set (folder, CSV manifest, RAF-DB, ...), no knob there.

Budget ("images"): every model sees the same number of images through the backbone,
images_per_step per step for the same number of steps: batch = images_per_step /
branches anchors (baseline 1 branch, DCS 2, QCS 4) and an epoch is a 1/branches
fraction of the anchors, so each epoch pushes num_train images through every model
and the learning-rate schedule (per step and per epoch) is the same for all. That is
how the authors pair DCS (48 anchors) with QCS (24 anchors) in their recipes, and it
equalises compute, which the backbone dominates. "recipe" keeps each model's released
recipe unchanged (the paper's protocol on real data).

Each run appends one JSON row to the rows file (--rows; default OUT/results.jsonl; the
grid's is the committed experiments/claim_rows.jsonl) with its settings hash, CPU
seconds, date and CPU model; rerunning the command skips the finished cells (another
session, another machine: commit the file) and resumes an interrupted one from its
checkpoint. Processes that share OUT claim each cell atomically first (claim_store.py),
so they can run one grid side by side. The tables and the figure (claim_report.py)
are redrawn from the rows at the end.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import os
import resource
import shutil
import time
from typing import Sequence

import ml_collections

from qcs_jax import recipes as config_lib
from qcs_jax.data.base import DataError
from qcs_jax.experiments import claim_store
from qcs_jax.experiments.claim_store import read_rows, settings_hash

MODELS = {"baseline": ("baseline", "sd"), "dcs": ("dcs", "s"), "qcs-sd": ("qcs", "sd"),
          "qcs-s": ("qcs", "s"), "qcs-d": ("qcs", "d")}
REAL_DATA = ("rafdb", "ferplus", "affectnet7", "affectnet8", "folder", "csv")
# Network widths: "demo" is configs/synthetic.py's network, "tiny" the tests' one.
WIDTHS = {
    "demo": dict(stage_channels=(16, 32, 64), stage_units=(1, 1, 2), embed_dim=64,
                 num_heads=4),
    "tiny": dict(stage_channels=(8, 16, 16), stage_units=(1, 1, 1), embed_dim=32, num_heads=2),
}
RESULTS = "results.jsonl"


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything a cell's result depends on besides (model, strength, seed)."""
  data: str = "synthetic"
  # The issue-27 recipe (docs/EXPERIMENTS.md: the search): strong, tight expressions at
  # 40 px, no label noise, plain Adam at 1e-3 decayed x0.93 an epoch, 64 images a step.
  image_size: int = 40
  num_train: int = 2304  # 36 steps of 64 images per epoch
  num_test: int = 1400
  label_noise: float = 0.0
  width: str = "demo"
  images_per_step: int = 64  # QCS: 16 anchors
  epochs: int = 18  # 41,472 images through the backbone
  gamma: float = 0.93  # lr decay per epoch of num_train images
  warmup_steps: int = 60  # of the 648 steps
  lr: float = 1e-3
  sam: bool = False  # SAM costs two backbone passes per step (the images budget counts one)
  expression_strength: float = 3.0  # the renderer's scale of the departure from neutral
  expression_jitter: float = 0.5  # the renderer's scale of the within-class variation
  budget: str = "images"
  root: str = ""
  csv: str = ""
  recipe: str = "rafdb"
  overrides: tuple[str, ...] = ()

  def as_dict(self) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclasses.dataclass(frozen=True)
class Cell:
  """One run. ``nuisance``: the nuisances tied to the class ("+"-joined); at p = 0 none
  is, so the p = 0 run is one cell shared by every nuisance's curve."""
  model: str
  strength: float | None  # None: a real data set (no knob)
  seed: int
  nuisance: str = ""

  @property
  def key(self) -> str:
    if self.strength is None:
      return f"{self.model}_seed{self.seed}"
    n = f"_{self.nuisance}" if self.strength and self.nuisance else ""
    return f"{self.model}{n}_p{self.strength:.2f}_seed{self.seed}"


QUICK = dict(models=("baseline", "qcs-sd"), strengths=(0.0, 0.95), seeds=(0,),
             settings=Settings(image_size=32, num_train=224, num_test=70, width="tiny",
                               images_per_step=32, epochs=1))


# Issue 27's grid: p in {0, .1, .2, .3, .5}; background: baseline/DCS/QCS-SD x 5 seeds and
# QCS-S/QCS-D x 3; skin tone (a nuisance on the face itself): the first three x 5 seeds.
PLAN_STRENGTHS = (0.0, 0.1, 0.2, 0.3, 0.5)
PLAN_27 = (
    (("baseline", "dcs", "qcs-sd"), (0, 1, 2, 3, 4), ("background", "skin")),
    (("qcs-s", "qcs-d"), (0, 1, 2), ("background",)),
)


def plan_27() -> list[Cell]:
  """Issue 27's cells, most informative first: every p = 0 cell (the recipe's check over
  seeds, shared by both nuisances), then background and skin seed by seed."""
  cells: list[Cell] = []
  for models, seeds, _ in PLAN_27:
    cells += grid(models, (0.0,), seeds)
  for nuisance in ("background", "skin"):
    for seed in range(5):
      for models, seeds, nuisances in PLAN_27:
        if nuisance in nuisances and seed in seeds:
          cells += grid(models, PLAN_STRENGTHS[1:], (seed,), (nuisance,))
  return cells


def grid(models: Sequence[str], strengths: Sequence[float | None],
         seeds: Sequence[int], nuisances: Sequence[str] = ("background",)) -> list[Cell]:
  """Cells seed-major, so an interrupted grid already holds whole seeds.

  ``nuisances`` are tied to the class together in every cell with p > 0."""
  for m in models:
    if m not in MODELS:
      raise ValueError(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
  for p in strengths:
    if p is not None and not 0.0 <= p <= 1.0:
      raise ValueError(f"confound strength must be in [0, 1], got {p}")
  tied = "+".join(nuisances)
  return [Cell(m, p, s, tied if p else "") for s in seeds for p in strengths for m in models]


def _set(cfg: ml_collections.ConfigDict, assignment: str) -> None:
  """Applies 'a.b.c=value' (value parsed as a Python literal, else kept as a string)."""
  key, sep, raw = assignment.partition("=")
  if not sep or not key.strip():
    raise ValueError(f"--set needs key=value, got {assignment!r}")
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  *path, leaf = key.strip().split(".")
  node = cfg
  for part in path:
    if part not in node:
      raise ValueError(f"--set {key}: no config field {part!r}")
    node = node[part]
  if leaf not in node:
    raise ValueError(f"--set {key}: no config field {leaf!r}")
  node[leaf] = value


def _tied(cell: Cell) -> list[str]:
  return [n for n in cell.nuisance.split("+") if n]


def cell_config(s: Settings, cell: Cell) -> ml_collections.ConfigDict:
  """The training config of one cell (pure: no files are read)."""
  family, csa = MODELS[cell.model]
  if s.data == "synthetic":
    c = config_lib.synthetic(family)
    c.model.update(img_size=s.image_size, **WIDTHS[s.width])
    c.data.augment.resize = s.image_size
    confound = tuple(f"{n}:{cell.strength:g}" for n in _tied(cell)) if cell.strength else ()
    c.data.synthetic.update(num_train=s.num_train, num_test=s.num_test,
                            image_size=s.image_size, seed=cell.seed,
                            label_noise=s.label_noise, confound=confound,
                            expression_strength=s.expression_strength,
                            expression_jitter=s.expression_jitter)
    c.train.epochs = s.epochs
    c.optim.update(gamma=s.gamma, warmup_steps=s.warmup_steps, lr=s.lr, sam=s.sam)
  elif s.data in REAL_DATA:
    c = config_lib.recipe(family, s.recipe)
    c.data.update(name=s.data, root=s.root, csv=s.csv)
    if s.epochs > 0:
      c.train.epochs = s.epochs
  else:
    raise ValueError(f"unknown data {s.data!r}; choose synthetic or one of {REAL_DATA}")
  c.model.csa = csa
  if s.budget == "images":
    nb = config_lib.NUM_BRANCHES[family]
    if s.images_per_step % 4:
      raise ValueError(f"images_per_step={s.images_per_step} must be a multiple of 4 "
                       f"(QCS's 4 branches)")
    c.data.batch_size = s.images_per_step // nb
    c.data.epoch_fraction = c.data.epoch_fraction / nb
  elif s.budget != "recipe":
    raise ValueError(f"budget must be 'images' or 'recipe', got {s.budget!r}")
  c.train.update(seed=cell.seed, progress=False, checkpoint_every=10**9, log_every=10**9)
  for assignment in s.overrides:
    _set(c, assignment)
  return c


def images_per_epoch(cfg: ml_collections.ConfigDict, num_train: int) -> int:
  """Images through the backbone per epoch: steps x anchors x branches (the sampler's rule)."""
  nb = config_lib.NUM_BRANCHES[cfg.model.name]
  anchors = max(1, int(round(num_train * cfg.data.epoch_fraction)))
  return anchors // cfg.data.batch_size * cfg.data.batch_size * nb


def _eval_rows(workdir: str) -> list[dict]:
  by_epoch = {}
  for r in read_rows(os.path.join(workdir, "metrics.jsonl")):
    if r.get("kind") == "eval":
      by_epoch[r["epoch"]] = r
  return [by_epoch[e] for e in sorted(by_epoch)]


def _cpu_seconds() -> float:
  """CPU time of this process, all threads (wall time misleads on a shared machine)."""
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def run_cell(s: Settings, cell: Cell, workdir: str) -> dict:
  """Trains one cell (resuming its workdir) and returns its result row."""
  from qcs_jax.training import loop  # jax starts here, after the XLA flags are set

  cfg = cell_config(s, cell)
  t0, cpu0 = time.perf_counter(), _cpu_seconds()
  loop.train_and_evaluate(cfg, workdir)
  wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
  evals = _eval_rows(workdir)
  if len(evals) < cfg.train.epochs:
    raise RuntimeError(f"{workdir}: {len(evals)} of {cfg.train.epochs} epochs evaluated")
  best = max(evals, key=lambda r: r["accuracy"])
  family, csa = MODELS[cell.model]
  nb = config_lib.NUM_BRANCHES[family]
  steps = evals[-1]["step"]
  return {
      "cell": cell.key, "model": cell.model, "name": family, "csa": csa,
      "strength": cell.strength, "seed": cell.seed,
      "nuisance": cell.nuisance,
      "confound": {n: cell.strength for n in _tied(cell)} if cell.strength else {},
      "final_accuracy": evals[-1]["accuracy"],
      "final_mean_class_accuracy": evals[-1]["mean_class_accuracy"],
      "best_accuracy": best["accuracy"], "best_epoch": best["epoch"],
      "epoch_accuracies": [r["accuracy"] for r in evals],
      "steps": steps, "images_through_backbone": steps * cfg.data.batch_size * nb,
      "anchors_per_step": cfg.data.batch_size, "wall_s": round(wall, 1),
      "cpu_s": round(cpu, 1),
      "settings": s.as_dict(),
  }


def _done(rows: Sequence[dict], path: str, digest: str, s: Settings) -> set[str]:
  """Keys of the cells finished with these settings; rows of other settings are refused."""
  for r in rows:
    if r.get("settings_hash", settings_hash(r.get("settings", {}))) != digest:
      mine, theirs = s.as_dict(), r.get("settings", {})
      changed = sorted(k for k in set(mine) | set(theirs) if theirs.get(k) != mine.get(k))
      raise ValueError(f"{path} holds runs with other settings ({', '.join(changed)}); "
                       f"use another --rows file or the same options")
  return {r["cell"] for r in rows}


def run_grid(s: Settings, cells: Sequence[Cell], out: str, keep_checkpoints: bool = False,
             log=print, rows_path: str | None = None, until: float | None = None,
             stale_s: float = claim_store.STALE_S) -> tuple[list[dict], list[str]]:
  """Runs the cells not yet in the rows file (default OUT/results.jsonl); returns (all
  rows, failures). Each cell is claimed first (OUT/claims), so processes sharing OUT
  never run one cell twice; cells another live process holds are left to it. No cell
  starts after the time ``until`` (seconds since the epoch)."""
  os.makedirs(out, exist_ok=True)
  path = rows_path or os.path.join(out, RESULTS)
  digest = settings_hash(s.as_dict())
  claims = claim_store.Claims(os.path.join(out, "claims"), stale_s=stale_s)
  done = _done(claim_store.read_rows(path), path, digest, s)
  todo = [c for c in cells if c.key not in done]
  log(f"{len(cells)} cells: {len(cells) - len(todo)} done, {len(todo)} to run -> {path} "
      f"(settings {digest})")
  log(claim_store.cost_line([r for r in claim_store.read_rows(path)], todo))
  failures = []
  for i, cell in enumerate(todo):
    if until is not None and time.time() >= until:
      log(f"stopping: --until reached, {len(todo) - i} cells not started")
      break
    if cell.key in _done(claim_store.read_rows(path), path, digest, s):
      continue  # another process finished it meanwhile
    if not claims.try_claim(cell.key):
      log(f"[{i + 1}/{len(todo)}] {cell.key}: claimed by {claims.holder(cell.key)}, skipped")
      continue
    if cell.key in _done(claim_store.read_rows(path), path, digest, s):
      claims.release(cell.key)  # its owner wrote the row and let go between our two looks
      continue
    workdir = os.path.join(out, "runs", cell.key)
    log(f"[{i + 1}/{len(todo)}] {cell.key}")
    try:
      with claims.heartbeat(cell.key):
        row = run_cell(s, cell, workdir)
    except (ValueError, RuntimeError, FloatingPointError, DataError) as e:
      failures.append(f"{cell.key}: {e}")
      log(f"error: {cell.key}: {e}")
      claims.release(cell.key)
      continue
    row.update(settings_hash=digest, date=claim_store.utc_now(), cpu=claim_store.cpu_model())
    claim_store.append_row(path, row)
    claims.release(cell.key)
    log(f"  test accuracy {100 * row['final_accuracy']:.2f}% (best "
        f"{100 * row['best_accuracy']:.2f}% at epoch {row['best_epoch']}), "
        f"{row['images_through_backbone']} images, {row['wall_s']:.0f} s wall, "
        f"{row['cpu_s']:.0f} s CPU")
    if not keep_checkpoints:
      shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
  rows = claim_store.read_rows(path)
  log(claim_store.cost_line(rows, [c for c in cells if c.key not in {r["cell"] for r in rows}]))
  return rows, failures
