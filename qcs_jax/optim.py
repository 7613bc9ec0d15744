"""SAM around Adam as an optax transformation, and the per-epoch learning-rate decay.

The reference's step (ARCHITECTURE.md section 8):
  g  = grad L(w);  e = rho * g / (||g||_2 + 1e-12);  g' = grad L(w + e);  w <- Adam(w, g').
We use optax.contrib.sam in its transparent mode: ``tx.update`` is called twice
per batch, first with g (it returns the ascent step e, so the caller's params
become w + e), then with g' (it returns Adam's step taken from the cached w).
Each call is a plain forward/backward in train mode, so BatchNorm running
statistics are updated by both passes, as in the reference. optax's own
``contrib.normalize`` divides by ||g|| without the reference's 1e-12, hence
``normalize_global`` below.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

SAM_PASSES = 2  # forward/backward passes per batch with SAM


def normalize_global(eps: float = 1e-12) -> optax.GradientTransformation:
  """Scales the whole gradient tree to unit global L2 norm: g / (||g|| + eps)."""

  def update_fn(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    return jax.tree.map(lambda g: g / (norm + eps), updates), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def epoch_decay(lr: float, gamma: float, steps_per_epoch: int) -> optax.Schedule:
  """torch ExponentialLR stepped once per epoch: lr * gamma ** floor(step / steps_per_epoch)."""
  return optax.exponential_decay(lr, transition_steps=max(1, steps_per_epoch),
                                 decay_rate=gamma, staircase=True)


def sam(base: optax.GradientTransformation, rho: float,
        eps: float = 1e-12) -> optax.GradientTransformationExtraArgs:
  """SAM (non-adaptive) around ``base``; call ``update`` SAM_PASSES times per batch."""
  ascent = optax.chain(normalize_global(eps), optax.scale(-rho))  # sam() negates it
  return optax.contrib.sam(base, ascent, sync_period=SAM_PASSES, reset_state=True)


def make_optimizer(optim_cfg, steps_per_epoch: int) -> tuple[optax.GradientTransformation, int]:
  """Adam (no weight decay) with per-epoch decay, wrapped in SAM unless ``optim.sam`` is off.

  Returns the transformation and how many passes per batch it expects.
  """
  schedule = epoch_decay(optim_cfg.lr, optim_cfg.gamma, steps_per_epoch)
  adam = optax.adam(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps)
  if not optim_cfg.sam:
    return adam, 1
  return sam(adam, optim_cfg.rho), SAM_PASSES


def current_lr(optim_cfg, steps_per_epoch: int, step) -> jnp.ndarray:
  return epoch_decay(optim_cfg.lr, optim_cfg.gamma, steps_per_epoch)(step)
