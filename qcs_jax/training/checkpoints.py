"""Training checkpoints (orbax), the workdir's config guard, metrics truncation on resume."""
from __future__ import annotations

import errno
import json
import logging
import os
import time

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qcs_jax.training.state import TrainState

log = logging.getLogger("qcs_jax")


# Fields that may differ between a run and its resumption without --config.train.allow_config_change.
RESUMABLE_CHANGES = ("data.workers", "train.epochs", "train.log_every", "train.progress",
                     "train.allow_config_change", "train.stop_after_steps", "data.root",
                     "init.require_backbone")


def write_atomic(path: str, text: str) -> None:
  """Writes path through a temporary file and a rename: readers (and a kill) see the
  old file or the new one, never half of one."""
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _flat_config(cfg: ml_collections.ConfigDict) -> dict:
  return flax.traverse_util.flatten_dict(json.loads(cfg.to_json_best_effort()), sep=".")


def check_config(workdir: str, cfg: ml_collections.ConfigDict) -> None:
  """Writes workdir/config.json on the first run; refuses a changed config on resume."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    if jax.process_index() == 0:   # the other processes of a job only read it
      write_atomic(path, cfg.to_json_best_effort(indent=2))
    return
  with open(path) as f:
    old = flax.traverse_util.flatten_dict(json.load(f), sep=".")
  new = _flat_config(cfg)
  diff = sorted(k for k in set(old) | set(new)
                if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
  if diff and not cfg.train.allow_config_change:
    rows = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:8])
    raise ValueError(f"{workdir} holds a run with another config ({rows}). Use a new "
                     f"--workdir, or pass --config.train.allow_config_change=True to resume anyway.")


def checkpoint_manager(workdir: str, keep: int):
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           cleanup_tmp_directories=True),
      item_names=("state", "meta"))


def save_checkpoint(mngr, state: TrainState, meta: dict) -> None:
  """Async save; on one host the replicated state is fetched once as numpy first
  (orbax would otherwise slice every replica of every array)."""
  if jax.process_count() == 1:
    state = jax.device_get(state)
  mngr.save(int(meta["global_step"]), args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)


def restore_checkpoint(mngr, abstract_state: TrainState,
                       mesh: Mesh) -> tuple[TrainState, dict] | None:
  """The latest readable checkpoint, restored into replicated arrays; None if there is none.

  A checkpoint that fails to restore (truncated or half-written files) is reported
  and moved aside to ``<workdir>/unreadable_checkpoints/`` (nothing is deleted);
  the next older one is used.
  """
  rep = NamedSharding(mesh, P())
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                        abstract_state)
  bad = []
  found = None
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      got = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except  (any unreadable file)
      bad.append(step)
      log.warning("checkpoint step %d in %s cannot be read (%s: %s); trying an older one",
                  step, mngr.directory, type(e).__name__, str(e)[:300])
      continue
    _check_meta(got["meta"], step, mngr.directory)
    found = got["state"], got["meta"]
    break
  if bad:
    _move_aside(mngr, bad, found[1]["global_step"] if found else None)
  return found


def _check_meta(meta: dict, step: int, where) -> None:
  keys = ("global_step", "epoch", "step_in_epoch", "best_accuracy", "best_epoch")
  if not isinstance(meta, dict) or any(k not in meta for k in keys) \
      or int(meta["global_step"]) != int(step):
    raise ValueError(f"checkpoint step {step} in {where}: its meta {meta!r} is not a "
                     f"training checkpoint's")


def _move_aside(mngr, steps: list[int], used: int | None) -> None:
  """Moves unreadable checkpoint steps out of orbax's directory, keeping them."""
  directory = os.fspath(mngr.directory)
  aside = os.path.join(os.path.dirname(directory), "unreadable_checkpoints")
  if jax.process_index() == 0:
    os.makedirs(aside, exist_ok=True)
    for step in steps:
      dst = os.path.join(aside, f"{step}.{int(time.time())}")
      os.replace(os.path.join(directory, str(step)), dst)
      print(f"warning: checkpoint step {step} is unreadable; moved to {dst}; "
            + (f"resuming from step {used}" if used is not None else "starting afresh"),
            flush=True)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("qcs_jax move unreadable checkpoints")
  mngr.reload()


def is_disk_full(e: BaseException) -> bool:
  """True if e, or an exception it was raised from, says the disk is full."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) \
        or "No space left on device" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


def disk_full_error(workdir: str) -> OSError:
  """The error a run stops with when its workdir's disk is full."""
  ck = os.path.join(workdir, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(ck) if d.isdigit()) if os.path.isdir(ck) else []
  return OSError(errno.ENOSPC, f"no space left on the device of {workdir} while writing "
                 f"checkpoints, metrics or best/. The complete checkpoints it holds "
                 f"(steps {steps}) are kept; free some space and rerun the same command "
                 f"to resume.")


def latest_variables(workdir: str) -> dict:
  """params and batch_stats of a training workdir's latest checkpoint, as numpy."""
  with ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                             item_handlers={"state": ocp.StandardCheckpointHandler(),
                                            "meta": ocp.JsonCheckpointHandler()}) as mngr:
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f"{workdir}: no training checkpoint under checkpoints/")
    # Onto this process's first device, whatever the topology it was saved from.
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shapes = mngr.item_metadata(step)["state"]
    shapes = getattr(shapes, "tree", shapes)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), shapes,
                          is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
    state = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"]
    state = jax.tree.map(np.asarray, state)
  return {"params": state["params"], "batch_stats": state["batch_stats"]}


def truncate_metrics(path: str, global_step: int, epoch: int) -> None:
  """Drops metric rows written after the checkpoint a run resumes from."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [l for l in f if l.strip()]
  rows = []
  for n, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if n + 1 < len(lines):
        raise ValueError(f"{path} line {n + 1} is not JSON: {e}") from e
      log.warning("%s: dropping a torn last line (a write was interrupted)", path)
  # An eval row's "epoch" is the finished epoch (1-based); a checkpoint's meta epoch e
  # follows the evaluation of epoch e, so that row belongs to the resumed run.
  keep = [r for r in rows if (r["kind"] == "train" and r["step"] <= global_step)
          or (r["kind"] == "eval" and r["epoch"] <= epoch)]
  if len(keep) < len(lines):  # only then (a full disk may refuse even a rewrite)
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))
