"""SAM around Adam as an optax transformation, and the per-epoch learning-rate decay.

The reference's step (docs/ARCHITECTURE.md section 8):
  g  = grad L(w);  e = rho * g / (||g||_2 + 1e-12);  g' = grad L(w + e);  w <- Adam(w, g').
We use optax.contrib.sam in its opaque mode: ``tx.update(g, state, w, grad_fn=f)``
takes the ascent step itself and calls ``f(w + e, 0)`` for g'. (Its transparent
mode computes both branches of every step and doubles the graph: 4x the compile
time here.) optax's own ``contrib.normalize`` divides by ||g|| without the
reference's 1e-12, hence ``normalize_global`` below.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

def normalize_global(eps: float = 1e-12) -> optax.GradientTransformation:
  """Scales the whole gradient tree to unit global L2 norm: g / (||g|| + eps)."""

  def update_fn(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    return jax.tree.map(lambda g: g / (norm + eps), updates), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def epoch_decay(lr: float, gamma: float, steps_per_epoch: int) -> optax.Schedule:
  """torch ExponentialLR stepped once per epoch: lr * gamma ** floor(step / steps_per_epoch).

  Written out rather than optax.exponential_decay, whose value is float32 even
  under jax_enable_x64 (it would round lr and break float64 parity checks).
  """
  steps = max(1, steps_per_epoch)
  return lambda count: lr * gamma ** (count // steps)


def schedule(optim_cfg, steps_per_epoch: int) -> optax.Schedule:
  """epoch_decay, times a linear warm-up over the first ``optim.warmup_steps`` steps.

  The released recipes start from pretrained weights and use no warm-up (0 keeps
  their schedule exactly); a network trained from scratch, like the demo's, can
  stall at ln(K) loss when Adam starts at full rate, so the demo warms up.
  """
  decay = epoch_decay(optim_cfg.lr, optim_cfg.gamma, steps_per_epoch)
  warmup = int(optim_cfg.get("warmup_steps", 0))
  if warmup <= 0:
    return decay
  return lambda count: decay(count) * jnp.minimum(1.0, (count + 1) / warmup)


def sam(base: optax.GradientTransformation, rho: float,
        eps: float = 1e-12) -> optax.GradientTransformationExtraArgs:
  """SAM (non-adaptive) around ``base``; ``update`` needs ``grad_fn(params, i) -> grads``."""
  ascent = optax.chain(normalize_global(eps), optax.scale(-rho))  # sam() negates it
  return optax.contrib.sam(base, ascent, sync_period=2, opaque_mode=True)


def make_optimizer(optim_cfg, steps_per_epoch: int) -> optax.GradientTransformationExtraArgs:
  """Adam (no weight decay) with per-epoch decay, inside SAM unless ``optim.sam`` is off.

  Either way ``update`` accepts ``grad_fn`` (plain Adam ignores it).
  """
  adam = optax.adam(schedule(optim_cfg, steps_per_epoch), b1=optim_cfg.b1, b2=optim_cfg.b2,
                    eps=optim_cfg.eps)
  if not optim_cfg.sam:
    return optax.with_extra_args_support(adam)
  return sam(adam, optim_cfg.rho)


def current_lr(optim_cfg, steps_per_epoch: int, step) -> jnp.ndarray:
  return schedule(optim_cfg, steps_per_epoch)(step)
