"""Training checkpoints (orbax), the workdir's config guard, metrics truncation on resume."""
from __future__ import annotations

import json
import os

import flax
import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qcs_jax.training.state import TrainState


# Fields that may differ between a run and its resumption without --config.train.allow_config_change.
RESUMABLE_CHANGES = ("data.workers", "train.epochs", "train.log_every", "train.progress",
                     "train.allow_config_change", "train.stop_after_steps", "data.root")


def _flat_config(cfg: ml_collections.ConfigDict) -> dict:
  return flax.traverse_util.flatten_dict(json.loads(cfg.to_json_best_effort()), sep=".")


def check_config(workdir: str, cfg: ml_collections.ConfigDict) -> None:
  """Writes workdir/config.json on the first run; refuses a changed config on resume."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    with open(path, "w") as f:
      f.write(cfg.to_json_best_effort(indent=2))
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
  import orbax.checkpoint as ocp
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           cleanup_tmp_directories=True),
      item_names=("state", "meta"))


def save_checkpoint(mngr, state: TrainState, meta: dict) -> None:
  """Async save; on one host the replicated state is fetched once as numpy first
  (orbax would otherwise slice every replica of every array)."""
  import orbax.checkpoint as ocp
  if jax.process_count() == 1:
    state = jax.device_get(state)
  mngr.save(int(meta["global_step"]), args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)


def restore_checkpoint(mngr, abstract_state: TrainState,
                       mesh: Mesh) -> tuple[TrainState, dict] | None:
  """The latest checkpoint, restored straight into replicated arrays; None if there is none."""
  import orbax.checkpoint as ocp
  step = mngr.latest_step()
  if step is None:
    return None
  rep = NamedSharding(mesh, P())
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                        abstract_state)
  got = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  return got["state"], got["meta"]


def latest_variables(workdir: str) -> dict:
  """params and batch_stats of a training workdir's latest checkpoint, as numpy."""
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                             item_names=("state", "meta")) as mngr:
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f"{workdir}: no training checkpoint under checkpoints/")
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  return {"params": state["params"], "batch_stats": state["batch_stats"]}


def truncate_metrics(path: str, global_step: int, epoch: int) -> None:
  """Drops metric rows written after the checkpoint a run resumes from."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    rows = [json.loads(l) for l in f if l.strip()]
  keep = [r for r in rows if (r["kind"] == "train" and r["step"] <= global_step)
          or (r["kind"] == "eval" and r["epoch"] < epoch)]
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in keep)
