"""One full SAM + Adam training step: qcs_jax.training.step vs the PyTorch reference, float64.

Both frameworks start from the same weights (PyTorch reference -> qcs_jax.convert)
and see the same batch, dropout 0. The PyTorch step is written out here as the
reference does it (docs/ARCHITECTURE.md sections 7 and 8): train mode, mean of the
8 (QCS) / 4 (DCS) cross-entropies of the separate per-branch ir_back calls,
SAM perturbation e = rho g / (||g|| + 1e-12) over the parameters that got a
gradient, a second train-mode pass at w + e, then torch.optim.Adam on w. Both
passes update the BatchNorm running statistics.

Compared after the step (relative error max|ours - ref| / max|ref| per tensor):
every Flax parameter and running statistic against the converted PyTorch state
dict, the per-leaf update w_new - w_old, and the first pass's loss. Two
configurations, both on every run: QCS on RAF-DB (7 classes) and DCS on
AffectNet-8 (8 classes), each the recipe's model at tiny widths, dropout 0.
"""
from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import TINY_MODEL, rel_err
from qcs_jax import recipes as config_lib
from qcs_jax.interop import converter as convert
from qcs_jax.interop import reference as R
from qcs_jax.models import NUM_BRANCHES, build_model
from qcs_jax.training import optim, state as train_state, step as train_step

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')

TOL64 = 1e-10
# The update w_new - w_old (~lr per element) measured against itself: stricter
# than TOL64 on w. Adam's first step, lr * g / (|g| + 1e-8), turns a gradient's
# absolute round-off d into up to lr * d / 4e-8 where |g| ~ 1e-8, so float64
# round-off (d ~ 1e-17) may show at ~1e-9 here (measured: up to 2e-10).
TOL_UPDATE = 1e-8
# lr 1e-3: large enough to move every weight visibly.
LR, RHO = 1e-3, 0.05
BATCH = 2


def _optim_cfg():
  c = config_lib.base_config().optim
  c.update(lr=LR, rho=RHO, b1=0.9, b2=0.999, eps=1e-8, gamma=0.5, sam=True)
  return c


def _batch(cfg, seed):
  """images (B, nb, H, W, 3) float64 and labels (B, nb): (y, y[, y_neg, y_neg])."""
  nb = NUM_BRANCHES[cfg['name']]
  images = R.random_images(cfg, BATCH, seed=seed, branches=nb).astype(np.float64)
  rng = np.random.default_rng(seed + 1)
  k = cfg['num_classes']
  y = rng.integers(0, k, BATCH)
  y_neg = (y + rng.integers(1, k, BATCH)) % k  # a different class
  labels = np.stack([y, y, y_neg, y_neg][:nb], axis=1).astype(np.int32)
  return images, labels


def _reference_loss(ref, xs, labels):
  """Mean of the per-branch base and cross cross-entropies (train mode)."""
  out = ref.forward_train(*xs)
  terms = []
  for head in ('base', 'cross'):
    for b, logits in enumerate(out[head]):
      terms.append(F.cross_entropy(logits, labels[:, b]))
  return torch.stack(terms).mean()


def reference_step(ref, images, labels, lr, rho):
  """The reference's SAM(Adam) step on one batch; returns (loss, used names)."""
  xs = [R.to_nchw(images[:, b], torch.float64) for b in range(images.shape[1])]
  y = torch.from_numpy(labels.astype(np.int64))
  params = dict(ref.named_parameters())
  adam = torch.optim.Adam(params.values(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
  ref.train()
  adam.zero_grad(set_to_none=True)
  loss = _reference_loss(ref, xs, y)
  loss.backward()
  used = sorted(k for k, p in params.items() if p.grad is not None)
  with torch.no_grad():
    norm = torch.norm(torch.stack([params[k].grad.norm(2) for k in used]), 2)
    scale = rho / (norm + 1e-12)
    eps = {k: params[k].grad * scale for k in used}
    for k in used:
      params[k].add_(eps[k])
  adam.zero_grad(set_to_none=True)
  _reference_loss(ref, xs, y).backward()  # second pass: BN statistics move again
  with torch.no_grad():
    for k in used:
      params[k].sub_(eps[k])
  adam.step()
  ref.eval()
  return float(loss.detach()), used


def jax_step(cfg, variables, images, labels):
  """qcs_jax.training.step's jitted SAM step on one device; returns (params, batch_stats, loss)."""
  model = build_model(cfg)
  tx = optim.make_optimizer(_optim_cfg(), steps_per_epoch=100)
  mesh = train_state.make_mesh(jax.devices()[:1])
  state = train_state.create_state(variables, tx, jax.random.PRNGKey(0), mesh)
  step = train_step.make_train_step(model, tx, mesh)
  state, metrics = step(state, train_step.shard_batch(images, mesh),
                        train_step.shard_batch(labels, mesh))
  params, stats, loss = jax.device_get((state.params, state.batch_stats, metrics['loss']))
  return params, stats, float(loss)


def _key_bias(path, d: int) -> slice | None:
  """The key part of an attention qkv bias: its gradient is zero in exact maths.

  softmax over keys ignores q . b_k, a constant per query, so b_k's float64
  gradient is pure round-off (~1e-17), which Adam's first step turns into a
  move of lr * g / (|g| + 1e-8) ~ 1e-9 lr that differs between frameworks.
  """
  return slice(d, 2 * d) if path[-3:] == ('attn', 'qkv', 'bias') else None


def tiny_recipe_model(recipe: str) -> dict:
  """config.model of configs/<recipe> at TINY_MODEL widths (4 heads), dropout 0."""
  cfg = config_lib.load_config_file(os.path.join(CONFIGS, recipe)).model.to_dict()
  cfg.update(TINY_MODEL, num_classes=cfg['num_classes'], num_heads=4)
  cfg.update({k: 0.0 for k in cfg if 'drop' in k})
  return cfg


# One VIT_base block, units (1, 1, 1). Forward parity of deeper models: test_parity.py.
# Each model costs ~35 s of XLA compile (CPU time) with a cold cache.
@pytest.mark.parametrize('recipe', ['rafdb.py', 'affectnet8_dcs.py'])
def test_float64_train_step_matches_reference(x64, torch_one_thread, recipe):
  cfg = tiny_recipe_model(recipe)
  assert (cfg['name'], cfg['num_classes']) == {'rafdb.py': ('qcs', 7),
                                               'affectnet8_dcs.py': ('dcs', 8)}[recipe]
  ref = R.build_reference(cfg, seed=11, dtype=torch.float64)
  images, labels = _batch(cfg, seed=12)
  sd_before = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
  before, report = convert.convert_model(sd_before, cfg, dtype=np.float64)
  assert not report.unknown

  params, stats, loss = jax_step(cfg, before, images, labels)
  ref_loss, used = reference_step(ref, images, labels, LR, RHO)
  after, _ = convert.convert_model(
      {k: v.detach().numpy() for k, v in ref.state_dict().items()}, cfg, dtype=np.float64)

  ours = convert.flatten_tree({'params': params, 'batch_stats': stats})
  want = convert.flatten_tree(after)
  old = convert.flatten_tree(before)
  assert sorted(ours) == sorted(want)
  assert all(v.dtype == np.float64 for v in ours.values())
  # The converted parameters are exactly those the reference's forward uses
  # (the others get no gradient there and stay untouched by its Adam).
  assert sorted(convert.torch_key(p) for p in ours if p[0] == 'params') == used

  errors, update_errors = {}, {}
  for path, value in ours.items():
    key = convert.torch_key(path)
    errors[key] = rel_err(value, want[path])
    ours_update, ref_update = value - old[path], want[path] - old[path]
    if path[0] == 'batch_stats':
      # 2 passes x nb calls of momentum 0.1: a visible move towards the batch's statistics.
      assert np.max(np.abs(ref_update)) > 1e-2 * np.max(np.abs(old[path])), key
    else:
      kb = _key_bias(path, cfg['embed_dim'])
      if kb is not None:
        assert np.max(np.abs(ours_update[kb])) < 1e-6 * LR, key
        assert np.max(np.abs(ref_update[kb])) < 1e-6 * LR, key
        keep = np.ones(value.shape, bool)
        keep[kb] = False
        ours_update, ref_update = ours_update[keep], ref_update[keep]
      # Adam's first step moves every weight with a gradient by ~lr (|g| >> eps).
      assert np.max(np.abs(ref_update)) > 0.5 * LR, key
    update_errors[key] = rel_err(ours_update, ref_update)
  loss_error = abs(loss - ref_loss) / abs(ref_loss)

  def worst(errs):
    top = sorted(errs.items(), key=lambda kv: -kv[1])[:3]
    return ', '.join(f'{k} {e:.2g}' for k, e in top)

  print(f'\n{cfg["name"]}: {len(errors)} tensors; loss {ref_loss:.6f} rel err '
        f'{loss_error:.2g}; params+stats max rel err {max(errors.values()):.2g} '
        f'({worst(errors)}); updates max rel err {max(update_errors.values()):.2g} '
        f'({worst(update_errors)})')
  bad = {k: e for k, e in errors.items() if e > TOL64}
  assert not bad, bad
  assert loss_error <= TOL64, (loss, ref_loss)
  bad = {k: e for k, e in update_errors.items() if e > TOL_UPDATE}
  assert not bad, bad


def test_float64_learning_rate_is_not_rounded_to_float32(x64):
  """make_optimizer's first SAM(Adam) step moves by exactly lr * g' / (|g'| + eps)."""
  cfg = _optim_cfg()
  cfg.lr = 1e-3
  tx = optim.make_optimizer(cfg, steps_per_epoch=10)
  params = {'w': np.array([0.5, -1.0, 2.0])}
  g1 = {'w': np.array([0.3, 0.4, -0.2])}
  g2 = {'w': np.array([2.0, -3.0, 1e-3])}
  updates, _ = tx.update(g1, tx.init(params), params, grad_fn=lambda p, i: g2)
  want = -1e-3 * g2['w'] / (np.abs(g2['w']) + 1e-8)
  assert np.asarray(updates['w']).dtype == np.float64
  assert rel_err(updates['w'], want) <= 1e-14
