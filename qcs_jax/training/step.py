"""The jitted SAM train step, the inference step, batch sharding and evaluation.

One jitted step for 1 or N devices: the batch is sharded along the ``data`` mesh
axis, the state is replicated and donated. Under jit, SAM's perturbation and the
per-branch BatchNorm statistics are global-batch reductions, so a step gives the
same parameters on any device count (tests/test_train.py checks 8 vs 1).
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qcs_jax.data import device_augment
from qcs_jax.training import losses
from qcs_jax.training.state import TrainState

# Separates the augmentation's random stream from dropout's (both come from state.rng).
AUGMENT_STREAM = 0x41554720


def make_train_step(model, tx, mesh: Mesh, augment: Optional[Any] = None,
                    img_size: Optional[int] = None):
  """jit(step)(state, images, labels) -> (state, metrics); state donated.

  With SAM, tx.update calls ``ascent_grad`` for the second pass; both passes run
  in train mode, so BatchNorm running statistics get both updates, the second
  starting from the first's result (docs/ARCHITECTURE.md section 7).

  ``augment`` (a transforms.Augment; data.augment_on='device'): the step takes
  jit(step)(state, images uint8 (B, nb, R, R, 3), labels, epoch (B,), position (B,))
  and augments inside the program (qcs_jax.data.device_augment) from
  fold_in(state.rng, AUGMENT_STREAM): each image is a pure function of (seed, epoch,
  anchor position, branch), whatever the batch's sharding or process count. Both
  SAM passes see the same augmented images, as with host augmentation.
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
  if augment is None:
    return jax.jit(step, in_shardings=(rep, data, data), out_shardings=(rep, rep),
                   donate_argnums=0)
  if img_size is None:
    raise ValueError("make_train_step: augmentation on the device needs img_size")
  size = int(img_size)

  def augmented_step(state: TrainState, images, labels, epoch, position):
    key = jax.random.fold_in(state.rng, AUGMENT_STREAM)
    x = device_augment.augment_batch(key, images, epoch, position, augment, size)
    return step(state, x, labels)

  return jax.jit(augmented_step, in_shardings=(rep, data, data, data, data),
                 out_shardings=(rep, rep), donate_argnums=0)


def make_eval_step(model, mesh: Mesh, uint8: bool = False):
  """jit(infer)(variables, images (B,H,W,3)) -> logits; the inference path only.

  ``uint8``: images arrive as the cache's uint8 crops and are normalised in the
  program (data.augment_on='device').
  """
  rep = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P("data"))

  def infer(v, x):
    if uint8:
      x = device_augment.eval_preprocess(x)
    return model.apply(v, x, method="infer")

  return jax.jit(infer, in_shardings=(rep, data), out_shardings=data)


def shard_batch(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """This process's rows of a global batch -> the global array sharded along 'data'.

  Every process passes its own contiguous block (pipeline ``part``), all of the
  same size; the global batch is their concatenation in process order.
  """
  global_shape = (x.shape[0] * jax.process_count(),) + tuple(x.shape[1:])
  return jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), x,
                                                global_shape)


def _gather(logits: jax.Array, batch: dict) -> dict:
  """The whole global batch's logits, labels, indices and mask, on every process."""
  local = {k: np.asarray(batch[k]) for k in ("label", "index", "mask")}
  if jax.process_count() == 1:
    return {"logits": np.asarray(jax.device_get(logits)), **local}
  return multihost_utils.process_allgather({"logits": logits, **local}, tiled=True)


def evaluate(eval_step, variables, batches: Iterator[dict], num_classes: int,
             mesh: Mesh) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Runs the jitted inference over padded batches; returns labels, preds, indices, logits.

  With several processes each batch holds this process's rows only; the results
  are gathered, so every process returns those of the whole split.
  """
  labels, preds, index, logits = [], [], [], []
  for b in batches:
    g = _gather(eval_step(variables, shard_batch(b["image"], mesh)), b)
    keep = g["mask"].astype(bool)
    labels.append(g["label"][keep])
    index.append(g["index"][keep])
    logits.append(g["logits"][keep])
    preds.append(g["logits"][keep].argmax(-1))
  cat = lambda xs, shape: np.concatenate(xs) if xs else np.zeros(shape)  # noqa: E731
  return (cat(labels, (0,)).astype(int), cat(preds, (0,)).astype(int),
          cat(index, (0,)).astype(int), cat(logits, (0, num_classes)))
