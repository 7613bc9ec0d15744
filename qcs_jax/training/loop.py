"""train_and_evaluate: the training loop with per-epoch evaluation, best/ and resume.

Three parts: `_setup` (everything that can fail on the user's input is checked
before the workdir is written; then the model, optimiser, state and batches),
`_train_epoch` (the train steps of one epoch, logging and mid-epoch
checkpoints) and `_evaluate_epoch` (the test split, best/, the epoch's checkpoint).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from qcs_jax import runtime
from qcs_jax.data import pipeline, sources
from qcs_jax.data.transforms import Augment
from qcs_jax.model_files import model_dir
from qcs_jax.models import build_model
from qcs_jax.models.qcs import NUM_BRANCHES
from qcs_jax.training import distributed, metrics as metrics_lib, optim, plots
from qcs_jax.training.checkpoints import (check_config, checkpoint_manager, disk_full_error,
                                          is_disk_full, restore_checkpoint, save_checkpoint,
                                          truncate_metrics)
from qcs_jax.training.metrics_log import MetricsLog, NullLog
from qcs_jax.training.state import (TrainState, apply_init, check_init, create_state,
                                    init_variables, make_mesh)
from qcs_jax.training.step import evaluate, make_eval_step, make_train_step, shard_batch

log = logging.getLogger("qcs_jax")


def _check_finite(pending: list, epoch: int, mngr) -> None:
  """Raises on a NaN/inf loss among the steps since the last check (nothing is saved)."""
  for step, m in pending:
    loss = float(m["loss"])
    if not np.isfinite(loss) or not bool(m["params_finite"]):
      last = mngr.latest_step()
      what = f"training loss is {loss}" if not np.isfinite(loss) else "parameters became non-finite"
      raise FloatingPointError(
          f"{what} at step {step} (epoch {epoch}); stopping. The last good "
          f"checkpoint (step {last}) is kept; lower --config.optim.lr or check the data.")


STEPS_IN_FLIGHT = 4  # steps dispatched ahead of the host (measurements: docs/BENCHMARKS.md)


def _advance(bar, position: int) -> None:
  """Moves a tqdm bar forward to ``position`` finished steps."""
  if position > bar.n:
    bar.update(position - bar.n)


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains cfg in workdir, resuming from its latest checkpoint; returns the best eval row.

  A full disk anywhere (metrics, checkpoints, best/) stops it with one clear error.
  """
  try:
    return _train_and_evaluate(cfg, workdir)
  except Exception as e:  # orbax and tensorstore wrap ENOSPC in their own errors
    if is_disk_full(e) and "no space left on the device of" not in str(e):
      raise disk_full_error(workdir) from e
    raise


@dataclasses.dataclass
class _Run:
  """What `_setup` builds and the epochs use; `state` and `meta` change as they go."""
  cfg: ml_collections.ConfigDict
  workdir: str
  mesh: Mesh
  writer: bool  # process 0: the one that writes files and logs
  say: Callable[..., None]
  steps: int  # train steps per epoch
  eval_bs: int
  train_src: Any
  test_src: Any
  state: TrainState
  meta: dict
  mngr: Any
  metrics_log: Any
  train_step: Callable
  eval_step: Callable
  batches: Any  # one iterator over all remaining epochs
  # Bad training images replaced so far; kept in the checkpoint's meta so a resumed run
  # counts the same events as an uninterrupted one (the replayed steps recount theirs).
  skipped_before: int
  device_augment: bool = False  # uint8 batches, augmented in the step
  trimmed: bool = False  # the compiler's freed memory was given back after the first step

  @property
  def train_skipped(self) -> int:
    return self.skipped_before + self.batches.num_skipped


def _setup(cfg: ml_collections.ConfigDict, workdir: str) -> _Run:
  """Checks the data and config, then writes the workdir: state restored or initialised."""
  mesh = make_mesh()
  nb = NUM_BRANCHES[cfg.model.name]
  ndev = mesh.devices.size
  # Multi-process: process 0 alone writes files and logs; each process builds
  # its own rows of every batch (`part`).
  writer = jax.process_index() == 0
  part = (jax.process_index(), jax.process_count())
  say = print if writer else (lambda *a, **k: None)
  if cfg.data.batch_size % ndev:
    raise ValueError(f"data.batch_size={cfg.data.batch_size} does not divide among the "
                     f"{ndev} devices ({jax.process_count()} processes): use a multiple "
                     f"of {ndev}")
  eval_bs = -(-cfg.data.eval_batch_size // ndev) * ndev

  train_src = sources.open_split(cfg.data, cfg.data.train_split)
  test_src = sources.open_split(cfg.data, cfg.data.test_split)
  for s in (train_src, test_src):
    say(s.summary(), flush=True)
  for w in sources.validate_for_training(train_src):
    log.warning("%s", w)
  if train_src.num_classes != cfg.model.num_classes:
    raise ValueError(f"{train_src.name} has {train_src.num_classes} classes but "
                     f"model.num_classes={cfg.model.num_classes}")
  steps = pipeline.steps_per_epoch(pipeline.make_sampler(train_src, cfg.data, nb, cfg.train.seed),
                                   cfg.data.batch_size)
  if steps < 1:
    raise ValueError(f"{train_src.name}: {len(train_src)} images give no full batch of "
                     f"{cfg.data.batch_size}")

  check_init(cfg)
  # Every check that can fail on the user's input is done: now the workdir is written.
  os.makedirs(workdir, exist_ok=True)
  check_config(workdir, cfg)

  model = build_model(cfg.model)
  tx = optim.make_optimizer(cfg.optim, steps)
  rng = jax.random.PRNGKey(cfg.train.seed)
  init_rng, state_rng = jax.random.split(rng)
  variables = init_variables(model, cfg, init_rng)
  distributed.barrier("checkpoint manager")  # its first collective sets up gloo
  mngr = checkpoint_manager(workdir, cfg.train.keep)
  restored = restore_checkpoint(mngr, jax.eval_shape(
      lambda v, r: create_state(v, tx, r, mesh), variables, state_rng), mesh)
  if restored is None:
    state = create_state(apply_init(variables, cfg.init), tx, state_rng, mesh)
    meta = {"global_step": 0, "epoch": 0, "step_in_epoch": 0, "best_accuracy": -1.0,
            "best_epoch": -1}
  else:
    state, meta = restored
    say(f"resuming {workdir} at epoch {meta['epoch']} step {meta['step_in_epoch']} "
          f"(global step {meta['global_step']})", flush=True)
  del variables
  metrics_log = MetricsLog(workdir) if writer else NullLog(workdir)
  if writer:
    truncate_metrics(metrics_log.path, meta["global_step"], meta["epoch"])

  # One iterator over all remaining epochs: worker processes start once and keep
  # preparing the next epoch's batches while the test split is evaluated.
  batches = pipeline.train_batches(
      train_src, cfg.data, cfg.model.img_size, nb, cfg.train.seed, meta["epoch"],
      start_step=meta["step_in_epoch"], num_epochs=max(cfg.train.epochs - meta["epoch"], 1),
      part=part)
  # data.augment_on='device': uint8 batches from the image cache, augmented in the step.
  device = pipeline.resolve_augment_on(cfg.data.get("augment_on", "auto")) == "device"
  augment = Augment.from_cfg(cfg.data.augment) if device else None
  say(f"augmentation on the {'device' if device else 'host'} "
      f"(data.augment_on={cfg.data.get('augment_on', 'auto')!r})", flush=True)
  return _Run(cfg=cfg, workdir=workdir, mesh=mesh, writer=writer, say=say, steps=steps,
              eval_bs=eval_bs, train_src=train_src, test_src=test_src, state=state, meta=meta,
              mngr=mngr, metrics_log=metrics_log,
              train_step=make_train_step(model, tx, mesh, augment, cfg.model.img_size),
              eval_step=make_eval_step(model, mesh, uint8=device), device_augment=device,
              batches=batches, skipped_before=int(meta.get("train_skipped", 0)))


def _train_epoch(run: _Run, epoch: int) -> bool:
  """The train steps of `epoch` (from the resumed step); True when train.stop_after_steps
  ended the run."""
  cfg, mesh, steps, meta, batches = run.cfg, run.mesh, run.steps, run.meta, run.batches
  train_step, state = run.train_step, run.state
  images_per_step = cfg.data.batch_size * NUM_BRANCHES[cfg.model.name]
  start = meta["step_in_epoch"] if epoch == meta["epoch"] else 0
  bar = tqdm(total=steps, initial=start, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
             unit="step", disable=not (cfg.train.progress and run.writer), dynamic_ncols=True)
  pending, t0, done, in_flight = [], time.perf_counter(), 0, collections.deque()
  waited = 0.0  # seconds this epoch's loop waited for the input pipeline
  keys = ("image", "label", "epoch", "position") if run.device_augment else ("image", "label")
  for i in range(start, steps):
    w0 = time.perf_counter()
    batch = next(batches, None)
    waited += time.perf_counter() - w0
    if batch is None:
      break
    state, m = train_step(state, *(shard_batch(batch[k], mesh) for k in keys))
    run.state = state
    if not run.trimmed:  # the step is compiled: the compiler's freed memory goes back
      runtime.release_free_memory()
      run.trimmed = True
    # A few steps in flight (the host prepares batches ahead), and the bar counts
    # finished steps, so its rate and ETA are true.
    in_flight.append(m)
    if len(in_flight) > STEPS_IN_FLIGHT:
      jax.block_until_ready(in_flight.popleft())
      _advance(bar, i + 1 - STEPS_IN_FLIGHT)
    gstep = epoch * steps + i + 1
    pending.append((gstep, m))
    done += 1
    last = i + 1 == steps
    if gstep % cfg.train.log_every == 0 or last:
      _check_finite(pending, epoch, run.mngr)
      m = jax.device_get(m)
      elapsed = time.perf_counter() - t0
      rate = done * images_per_step / elapsed
      row = {"kind": "train", "step": gstep, "epoch": epoch, "loss": float(m["loss"]),
             "accuracy": float(m["accuracy"]), "grad_norm": float(m["grad_norm"]),
             "lr": float(optim.current_lr(cfg.optim, steps, epoch * steps + i)),
             "images_per_sec": rate, "input_wait": waited / elapsed}
      run.metrics_log.write(row)
      _advance(bar, i + 1)
      bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{rate:.0f}")
      pending = []
    if gstep % cfg.train.checkpoint_every == 0 and not last:  # last: saved after eval
      _check_finite(pending, epoch, run.mngr)
      pending = []
      meta.update(global_step=gstep, epoch=epoch, step_in_epoch=i + 1,
                  data=batches.get_state(), train_skipped=run.train_skipped)
      save_checkpoint(run.mngr, state, meta)
    if cfg.train.stop_after_steps and gstep >= cfg.train.stop_after_steps:
      run.mngr.wait_until_finished()
      bar.close()
      run.say(f"stopping after step {gstep} (train.stop_after_steps)", flush=True)
      return True
  _advance(bar, steps)
  bar.close()
  return False


def _evaluate_epoch(run: _Run, epoch: int) -> None:
  """The test split after `epoch` (inference path only): metrics, best/ when it improved,
  the end-of-epoch checkpoint and the curves."""
  cfg, meta, test_src, workdir = run.cfg, run.meta, run.test_src, run.workdir
  test_batches = pipeline.eval_batches(test_src, cfg.data, cfg.model.img_size, run.eval_bs,
                                       (jax.process_index(), jax.process_count()))
  labels, preds, _, _ = evaluate(run.eval_step, run.state.variables, test_batches,
                                 cfg.model.num_classes, run.mesh)
  cm = metrics_lib.confusion_matrix(labels, preds, cfg.model.num_classes)
  summary = metrics_lib.summarize(cm, test_src.class_names)
  row = {"kind": "eval", "step": (epoch + 1) * run.steps, "epoch": epoch + 1,
         **{k: v for k, v in summary.items() if k != "per_class"}}
  skipped = {"train_skipped": run.train_skipped, "test_skipped": test_batches.num_skipped}
  if any(skipped.values()):  # rows of clean runs stay as they were
    row.update(skipped)
    run.say(_skipped_line(skipped), flush=True)
  run.metrics_log.write(row)
  improved = summary["accuracy"] > meta["best_accuracy"]
  run.say(f"epoch {epoch + 1}: test accuracy {100 * summary['accuracy']:.2f}% "
          f"(mean class {100 * summary['mean_class_accuracy']:.2f}%)"
          + (" *best*" if improved else ""), flush=True)
  if improved:
    meta.update(best_accuracy=summary["accuracy"], best_epoch=epoch + 1)
  if improved and run.writer:
    model_dir.save_variables(
        os.path.join(workdir, "best"), jax.device_get(run.state.variables), cfg.model.to_dict(),
        extra={"epoch": epoch + 1, "accuracy": summary["accuracy"],
               "class_names": list(test_src.class_names)}, force=True)
    with open(os.path.join(workdir, "best_confusion.json"), "w") as f:
      json.dump({"class_names": list(test_src.class_names), "matrix": cm.tolist(),
                 **summary, "epoch": epoch + 1}, f, indent=1)
    plots.plot_confusion(cm, test_src.class_names,
                         os.path.join(workdir, "best_confusion.png"),
                         f"epoch {epoch + 1}: {100 * summary['accuracy']:.2f}%")
  meta.update(global_step=(epoch + 1) * run.steps, epoch=epoch + 1, step_in_epoch=0,
              data=run.batches.get_state(), train_skipped=run.train_skipped)
  save_checkpoint(run.mngr, run.state, meta)
  if run.writer:
    plots.plot_curves(run.metrics_log.path, os.path.join(workdir, "curves.png"))


def _train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  run = _setup(cfg, workdir)
  failed = False
  try:
    for epoch in range(run.meta["epoch"], cfg.train.epochs):
      if _train_epoch(run, epoch):
        return {}
      _evaluate_epoch(run, epoch)
    return {"best_accuracy": run.meta["best_accuracy"], "best_epoch": run.meta["best_epoch"]}
  except Exception as e:
    failed = True
    if is_disk_full(e):
      raise disk_full_error(workdir) from e
    raise
  finally:
    run.batches.close()
    # An async save's error surfaces in wait_until_finished; after an error, one
    # from closing (e.g. TensorBoard's flush on a full disk) must not mask it.
    _close_all((run.metrics_log.close, run.mngr.wait_until_finished, run.mngr.close), workdir,
               run.mngr, quiet=failed)


def _skipped_line(skipped: dict) -> str:
  """One line of bad-image totals (data.on_bad_image=skip); each file was logged once."""
  return (f"bad images skipped (data.on_bad_image='skip'): {skipped['train_skipped']} training "
          f"draws so far, each replaced by another image of its class; "
          f"{skipped['test_skipped']} test images, not counted in this epoch's accuracy "
          "(each file and its reason is in the log above)")


def _close_all(closers, workdir: str, mngr, quiet: bool) -> None:
  first = None
  for close in closers:
    try:
      close()
    except Exception as e:  # pylint: disable=broad-except
      first = first or e
  if first is None:
    return
  if quiet:
    log.warning("while stopping after an error: %s: %s", type(first).__name__, first)
  elif is_disk_full(first):
    raise disk_full_error(workdir) from first
  else:
    raise first
