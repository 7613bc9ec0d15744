"""Training library: train state, the sharded SAM step, evaluation, checkpoints, the loop.

One jitted step for 1 or N devices: the batch is sharded along the ``data`` mesh
axis, the state is replicated and donated. Under jit, SAM's perturbation and the
per-branch BatchNorm statistics are global-batch reductions, so a step gives the
same parameters on any device count (tests/test_train.py checks 8 vs 1).
"""
from __future__ import annotations

import collections
import json
import logging
import os
import time
from typing import Any, Iterator

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qcs_jax import checkpoint as ckpt_io
from qcs_jax.training import losses, metrics as metrics_lib, optim
from qcs_jax.config import NUM_BRANCHES
from qcs_jax.models import build_model

log = logging.getLogger("qcs_jax")


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jnp.ndarray

  @property
  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats}


def make_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ("data",))


def maybe_initialize_distributed() -> None:
  """Multi-host: join the job when the environment describes one (coordinator set)."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_NTASKS", "1") != "1":
    jax.distributed.initialize()


# ----------------------------------------------------------------------------- state


def _dummy_images(cfg) -> jnp.ndarray:
  s = cfg.model.img_size
  return jnp.zeros((1, NUM_BRANCHES[cfg.model.name], s, s, 3), jnp.float32)


def init_variables(model, cfg, rng) -> dict:
  """Random variables with the init of ARCHITECTURE.md (host side, before sharding)."""
  prng, drng = jax.random.split(rng)
  v = jax.jit(lambda p, d: model.init({"params": p, "dropout": d}, _dummy_images(cfg),
                                      train=False))(prng, drng)
  return {"params": v["params"], "batch_stats": v.get("batch_stats", {})}


def _replace_subtree(target: dict, source: dict, what: str) -> dict:
  """target with source's leaves, refusing any structure or shape mismatch."""
  t_flat = flax.traverse_util.flatten_dict(target, sep="/")
  s_flat = flax.traverse_util.flatten_dict(source, sep="/")
  missing = sorted(set(t_flat) - set(s_flat))
  extra = sorted(set(s_flat) - set(t_flat))
  if missing or extra:
    raise ValueError(f"{what}: checkpoint does not fit the configured model: "
                     f"missing {missing[:5]} ({len(missing)}), unexpected {extra[:5]} ({len(extra)})")
  for k, v in s_flat.items():
    if tuple(np.shape(v)) != tuple(np.shape(t_flat[k])):
      raise ValueError(f"{what}: {k} has shape {np.shape(v)}, the model wants {np.shape(t_flat[k])}")
  out = {k: jnp.asarray(v, dtype=t_flat[k].dtype) for k, v in s_flat.items()}
  return flax.traverse_util.unflatten_dict(out, sep="/")


SCRATCH = "scratch"  # config.init.backbone=scratch: a random IR50, deliberately


def check_init(cfg: ml_collections.ConfigDict) -> None:
  """Refuses a paper recipe that would train from a random IR50 (before anything is written).

  The paper's accuracies depend on the Ms-Celeb-1M IR50: recipes that need it set
  config.init.require_backbone; `--config.init.backbone=scratch` opts out.
  """
  init = cfg.init
  for key in ("backbone", "checkpoint"):
    path = init.get(key, "") or ""
    if path and path != SCRATCH and not os.path.isdir(path):
      raise ckpt_io.CheckpointError(
          f"config.init.{key}={path}: no such checkpoint directory (convert a PyTorch file "
          f"with qcs-convert; see README 'Use the authors' released models')")
  if init.get("require_backbone", False) and not init.backbone and not init.checkpoint:
    raise ckpt_io.CheckpointError(
        "this recipe trains from the Ms-Celeb-1M IR50, as the paper does (its accuracies "
        "depend on it), but config.init.backbone is empty. Download the authors' ir50.pth "
        "(qcs-convert --list_zoo), convert it with `qcs-convert --input ir50.pth --output "
        "runs/ir50` and add --config.init.backbone=runs/ir50; or pass "
        "--config.init.backbone=scratch to train from a random IR50 on purpose.")


def apply_init(variables: dict, init_cfg) -> dict:
  """Loads config.init.backbone (converted IR50) or config.init.checkpoint (full model)."""
  variables = jax.tree.map(lambda x: x, variables)
  if init_cfg.checkpoint:
    loaded, _ = ckpt_io.load_variables(init_cfg.checkpoint)
    for col in ("params", "batch_stats"):
      variables[col] = _replace_subtree(variables[col], loaded.get(col, {}),
                                        f"init.checkpoint={init_cfg.checkpoint} [{col}]")
    log.info("initialised the whole model from %s", init_cfg.checkpoint)
  elif init_cfg.backbone and init_cfg.backbone != SCRATCH:
    loaded, _ = ckpt_io.load_variables(init_cfg.backbone)
    for col in ("params", "batch_stats"):
      if "ir_back" not in loaded.get(col, {}):
        raise ValueError(f"init.backbone={init_cfg.backbone}: no ir_back {col} in it")
      variables[col]["ir_back"] = _replace_subtree(
          variables[col]["ir_back"], loaded[col]["ir_back"],
          f"init.backbone={init_cfg.backbone} [{col}]")
    log.info("initialised ir_back from %s", init_cfg.backbone)
  return variables


def create_state(variables: dict, tx, rng, mesh: Mesh) -> TrainState:
  """The replicated train state, built under jit with out_shardings from eval_shape."""

  def make(v, r):
    return TrainState(step=jnp.zeros((), jnp.int32), params=v["params"],
                      batch_stats=v["batch_stats"], opt_state=tx.init(v["params"]), rng=r)

  shapes = jax.eval_shape(make, variables, rng)
  shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), shapes)
  return jax.jit(make, out_shardings=shardings)(variables, rng)


# ----------------------------------------------------------------------------- steps


def make_train_step(model, tx, mesh: Mesh):
  """jit(step)(state, images, labels) -> (state, metrics); state donated.

  With SAM, tx.update calls ``ascent_grad`` for the second pass; both passes run
  in train mode, so BatchNorm running statistics get both updates, the second
  starting from the first's result (ARCHITECTURE.md section 7).
  """

  def loss_fn(params, batch_stats, images, labels, rng):
    out, mutated = model.apply({"params": params, "batch_stats": batch_stats}, images,
                               train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
    return losses.branch_cross_entropy(out, labels), (mutated["batch_stats"], out)

  # Inner jit: SAM's second pass reuses the first pass's trace (same shapes).
  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))

  def step(state: TrainState, images, labels):
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, (stats, out)), grads = grad_fn(state.params, state.batch_stats, images, labels,
                                          jax.random.fold_in(rng, 0))
    second = {"batch_stats": stats}

    def ascent_grad(perturbed, i):
      # Called inline by tx.update within this trace; its BatchNorm statistics are
      # handed back through `second` (optax's grad_fn returns gradients only).
      (_, (new_stats, _)), g = grad_fn(perturbed, stats, images, labels,
                                       jax.random.fold_in(rng, i + 1))
      second["batch_stats"] = new_stats
      return g

    updates, opt_state = tx.update(grads, state.opt_state, state.params, grad_fn=ascent_grad)
    params = optax.apply_updates(state.params, updates)
    acc = jnp.mean(jnp.argmax(out["base"][:, 0], -1) == labels[:, 0])
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
    new = state.replace(step=state.step + 1, params=params,
                        batch_stats=second["batch_stats"], opt_state=opt_state)
    return new, {"loss": loss, "accuracy": acc, "grad_norm": optax.tree.norm(grads),
                 "params_finite": finite}

  rep = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P("data"))
  return jax.jit(step, in_shardings=(rep, data, data), out_shardings=(rep, rep),
                 donate_argnums=0)


def make_eval_step(model, mesh: Mesh):
  """jit(infer)(variables, images (B,H,W,3)) -> logits; the inference path only."""
  rep = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P("data"))
  return jax.jit(lambda v, x: model.apply(v, x, method="infer"),
                 in_shardings=(rep, data), out_shardings=data)


def shard_batch(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """Global host batch -> array sharded along 'data'.

  Multi-host: every process builds the same global batch (the pipeline is a pure
  function of (seed, epoch, step)) and contributes its contiguous slice. Simple
  and exact; it decodes P times the images, which a per-process pipeline would avoid.
  """
  n, i = jax.process_count(), jax.process_index()
  if n > 1:
    per = x.shape[0] // n
    x = x[i * per:(i + 1) * per]
  return jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), x)


def evaluate(eval_step, variables, batches: Iterator[dict], num_classes: int,
             mesh: Mesh) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Runs the jitted inference over padded batches; returns labels, preds, indices, logits."""
  labels, preds, index, logits = [], [], [], []
  for b in batches:
    out = np.asarray(jax.device_get(eval_step(variables, shard_batch(b["image"], mesh))))
    keep = np.asarray(b["mask"], bool)
    labels.append(np.asarray(b["label"])[keep])
    index.append(np.asarray(b["index"])[keep])
    logits.append(out[keep])
    preds.append(out[keep].argmax(-1))
  cat = lambda xs, shape: np.concatenate(xs) if xs else np.zeros(shape)  # noqa: E731
  return (cat(labels, (0,)).astype(int), cat(preds, (0,)).astype(int),
          cat(index, (0,)).astype(int), cat(logits, (0, num_classes)))


# ----------------------------------------------------------------------------- checkpoints

# Fields that may differ between a run and its resumption without --config.train.allow_config_change.
RESUMABLE_CHANGES = ("data.workers", "train.epochs", "train.log_every", "train.progress",
                     "train.allow_config_change", "train.stop_after_steps", "data.root",
                     "init.require_backbone")


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


# ----------------------------------------------------------------------------- the loop


class MetricsLog:
  """metrics.jsonl plus TensorBoard event files, both in the workdir."""

  def __init__(self, workdir: str):
    from tensorboardX import SummaryWriter
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, row: dict) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    step = row["step"]
    for k, v in row.items():
      if isinstance(v, (int, float)) and k not in ("step", "epoch"):
        self.tb.add_scalar(f"{row['kind']}/{k}", v, step)

  def close(self) -> None:
    self.tb.close()


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


STEPS_IN_FLIGHT = 4  # the demo: 1 gave 272 images/s, 4 gave 308, unbounded 313 (2 cores)


def _advance(bar, position: int) -> None:
  """Moves a tqdm bar forward to ``position`` finished steps."""
  if position > bar.n:
    bar.update(position - bar.n)


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains cfg in workdir, resuming from its latest checkpoint; returns the best eval row."""
  from tqdm import tqdm

  from qcs_jax.training import plots
  from qcs_jax.data import pipeline, sources

  mesh = make_mesh()
  nb = NUM_BRANCHES[cfg.model.name]
  ndev = mesh.devices.size
  if cfg.data.batch_size % ndev:
    raise ValueError(f"data.batch_size={cfg.data.batch_size} must be a multiple of the "
                     f"{ndev} devices")
  eval_bs = -(-cfg.data.eval_batch_size // ndev) * ndev

  train_src = sources.open_split(cfg.data, cfg.data.train_split)
  test_src = sources.open_split(cfg.data, cfg.data.test_split)
  for s in (train_src, test_src):
    print(s.summary(), flush=True)
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
  mngr = checkpoint_manager(workdir, cfg.train.keep)
  restored = restore_checkpoint(mngr, jax.eval_shape(
      lambda v, r: create_state(v, tx, r, mesh), variables, state_rng), mesh)
  if restored is None:
    state = create_state(apply_init(variables, cfg.init), tx, state_rng, mesh)
    meta = {"global_step": 0, "epoch": 0, "step_in_epoch": 0, "best_accuracy": -1.0,
            "best_epoch": -1}
  else:
    state, meta = restored
    print(f"resuming {workdir} at epoch {meta['epoch']} step {meta['step_in_epoch']} "
          f"(global step {meta['global_step']})", flush=True)
  del variables
  metrics_log = MetricsLog(workdir)
  truncate_metrics(metrics_log.path, meta["global_step"], meta["epoch"])

  train_step = make_train_step(model, tx, mesh)
  eval_step = make_eval_step(model, mesh)
  images_per_step = cfg.data.batch_size * nb
  best = {}
  # One iterator over all remaining epochs: worker processes start once and keep
  # preparing the next epoch's batches while the test split is evaluated.
  batches = pipeline.train_batches(
      train_src, cfg.data, cfg.model.img_size, nb, cfg.train.seed, meta["epoch"],
      start_step=meta["step_in_epoch"], num_epochs=max(cfg.train.epochs - meta["epoch"], 1))
  try:
    for epoch in range(meta["epoch"], cfg.train.epochs):
      start = meta["step_in_epoch"] if epoch == meta["epoch"] else 0
      bar = tqdm(total=steps, initial=start, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                 unit="step", disable=not cfg.train.progress, dynamic_ncols=True)
      pending, t0, done, in_flight = [], time.perf_counter(), 0, collections.deque()
      for i, batch in zip(range(start, steps), batches):
        state, m = train_step(state, shard_batch(batch["image"], mesh),
                              shard_batch(batch["label"], mesh))
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
          _check_finite(pending, epoch, mngr)
          m = jax.device_get(m)
          rate = done * images_per_step / (time.perf_counter() - t0)
          row = {"kind": "train", "step": gstep, "epoch": epoch, "loss": float(m["loss"]),
                 "accuracy": float(m["accuracy"]), "grad_norm": float(m["grad_norm"]),
                 "lr": float(optim.current_lr(cfg.optim, steps, epoch * steps + i)),
                 "images_per_sec": rate}
          metrics_log.write(row)
          _advance(bar, i + 1)
          bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{rate:.0f}")
          pending = []
        if gstep % cfg.train.checkpoint_every == 0 and not last:  # last: saved after eval
          _check_finite(pending, epoch, mngr)
          pending = []
          meta.update(global_step=gstep, epoch=epoch, step_in_epoch=i + 1,
                      data=batches.get_state())
          save_checkpoint(mngr, state, meta)
        if cfg.train.stop_after_steps and gstep >= cfg.train.stop_after_steps:
          mngr.wait_until_finished()
          bar.close()
          print(f"stopping after step {gstep} (train.stop_after_steps)", flush=True)
          return best
      _advance(bar, steps)
      bar.close()
      # Evaluation of the test split (inference path only) after each epoch.
      labels, preds, _, _ = evaluate(eval_step, state.variables, pipeline.eval_batches(
          test_src, cfg.data, cfg.model.img_size, eval_bs), cfg.model.num_classes, mesh)
      cm = metrics_lib.confusion_matrix(labels, preds, cfg.model.num_classes)
      summary = metrics_lib.summarize(cm, test_src.class_names)
      row = {"kind": "eval", "step": (epoch + 1) * steps, "epoch": epoch + 1,
             **{k: v for k, v in summary.items() if k != "per_class"}}
      metrics_log.write(row)
      improved = summary["accuracy"] > meta["best_accuracy"]
      print(f"epoch {epoch + 1}: test accuracy {100 * summary['accuracy']:.2f}% "
            f"(mean class {100 * summary['mean_class_accuracy']:.2f}%)"
            + (" *best*" if improved else ""), flush=True)
      if improved:
        meta.update(best_accuracy=summary["accuracy"], best_epoch=epoch + 1)
        ckpt_io.save_variables(
            os.path.join(workdir, "best"), jax.device_get(state.variables), cfg.model.to_dict(),
            extra={"epoch": epoch + 1, "accuracy": summary["accuracy"],
                   "class_names": list(test_src.class_names)}, force=True)
        with open(os.path.join(workdir, "best_confusion.json"), "w") as f:
          json.dump({"class_names": list(test_src.class_names), "matrix": cm.tolist(),
                     **summary, "epoch": epoch + 1}, f, indent=1)
        plots.plot_confusion(cm, test_src.class_names,
                             os.path.join(workdir, "best_confusion.png"),
                             f"epoch {epoch + 1}: {100 * summary['accuracy']:.2f}%")
      meta.update(global_step=(epoch + 1) * steps, epoch=epoch + 1, step_in_epoch=0,
                  data=batches.get_state())
      save_checkpoint(mngr, state, meta)
      plots.plot_curves(metrics_log.path, os.path.join(workdir, "curves.png"))
    best = {"best_accuracy": meta["best_accuracy"], "best_epoch": meta["best_epoch"]}
    return best
  finally:
    batches.close()
    mngr.wait_until_finished()
    mngr.close()
    metrics_log.close()
