"""Numerical parity of the Flax model with the PyTorch reference.

Weights go PyTorch -> qcs_jax.convert -> Flax, so this also checks the
converter. Relative error = max|ours - ref| / max|ref| (docs/ARCHITECTURE.md section 9).
- paper size (224x224, width 768), float32, eval mode: stage outputs, tokens,
  base logits, the training-time graph (QCS 7 classes: 8 outputs, DCS 8
  classes: 4 outputs) <= 1e-5, CSA maps <= 5e-5;
- tiny models in float64 (jax_enable_x64, torch.double) <= 1e-10 for every
  CSA variant, in eval and in train mode (per-branch BatchNorm statistics and
  the running-statistics updates of the reference's separate ir_back calls);
- parameter counts: Flax == PyTorch reference minus the never-used layers.
"""
from __future__ import annotations

import re

import jax
import numpy as np
import pytest
import torch

from qcs_jax.interop import reference as R
from qcs_jax import models
from qcs_jax.interop import converter as convert

TOL32, TOL32_MAPS, TOL64 = 1e-5, 5e-5, 1e-10
INFERENCE_PATH = ('ir_back', 'conv1', 'conv2', 'conv3', 'embed_q', 'embed_k',
                  'embed_v', 'VIT_base')


def _capture(mdl, method_name):
  """Stage outputs and VIT_base tokens of the stacked training-time batch."""
  return method_name == '__call__' and mdl.name in ('ir_back', 'VIT_base')


def train_graph(model, variables, images, train=False):
  """model(images) with the stacked stage outputs, tokens and CSA maps."""
  def fn(v, x):
    return model.apply(v, x, train=train, capture_intermediates=_capture,
                       mutable=['intermediates'] + (['batch_stats'] if train
                                                    else []),
                       rngs={'dropout': jax.random.key(0)})
  out, state = jax.jit(fn, compiler_options=R.FAST_COMPILE)(variables, images)
  inter = state['intermediates']
  nb = images.shape[1]
  unstack = lambda a: np.asarray(a).reshape((-1, nb) + a.shape[1:])
  x1, x2, x3 = (unstack(a) for a in inter['ir_back']['__call__'][0])
  tokens = unstack(inter['VIT_base']['__call__'][0][1])
  maps = [np.asarray(inter[f'cross_attention_{l}']['attention'][0])
          for l in (1, 2, 3) if f'cross_attention_{l}' in inter]
  return dict(out, x1=x1, x2=x2, x3=x3, tokens=tokens, maps=maps,
              batch_stats=state.get('batch_stats'))


def reference_graph(ref, images, dtype):
  """The reference's training-time graph, one forward per branch."""
  xs = [R.to_nchw(images[:, b], dtype) for b in range(images.shape[1])]
  with torch.no_grad():
    out = ref.forward_train(*xs)
  res = {k: torch.stack(out[k], 1).numpy() for k in ('base', 'cross')
         if k in out}
  for k in ('x1', 'x2', 'x3'):
    res[k] = np.stack([R.to_nhwc(f[k]) for f in out['features']], 1)
  res['tokens'] = torch.stack([f['tokens'] for f in out['features']], 1).numpy()
  res['maps'] = []
  for level in (1, 2, 3):
    module = getattr(ref, f'cross_attention_{level}', None)
    if module is not None:
      res['maps'].append(torch.stack(module.last_maps, 1).numpy())
  return res


def compare(ours, ref, tol, tol_maps, keys=('x1', 'x2', 'x3', 'tokens', 'base',
                                           'cross')):
  errors = {k: R.rel_err(ours[k], ref[k]) for k in keys if k in ref}
  for level, (m, r) in enumerate(zip(ours['maps'], ref['maps'])):
    errors[f'maps{level + 1}'] = R.rel_err(m, r)
  assert len(ours['maps']) == len(ref['maps'])
  bad = {k: e for k, e in errors.items()
         if e > (tol_maps if k.startswith('maps') else tol)}
  assert not bad, (bad, errors)
  return errors


def convert_reference(ref, cfg, dtype=np.float32):
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  variables, report = convert.convert_model(sd, cfg, dtype=dtype)
  assert not report.unknown
  return variables


# ----------------------------------------------------------------------------
# Paper size, float32.


@pytest.fixture(scope='module')
def full_qcs():
  cfg = R.make_cfg(R.FULL_CFG, num_classes=7)
  torch.manual_seed(0)
  ref = R.build_reference(cfg, seed=0)
  return cfg, ref, convert_reference(ref, cfg)


def test_full_size_qcs_eval_parity(full_qcs):
  cfg, ref, variables = full_qcs
  model = models.build_model(cfg)
  images = R.random_images(cfg, 2, seed=1, branches=4)
  want = reference_graph(ref, images, torch.float32)
  # The training-time graph in eval mode: stage outputs and tokens of every
  # branch, 4 base + 4 cross logits, CSA maps. (The `features` and `infer`
  # entry points are checked on tiny models in test_convert.py: a second
  # paper-size compile would double this test's time.)
  ours = train_graph(model, variables, images)
  assert ours['base'].shape == ours['cross'].shape == (2, 4, 7)
  assert ours['x3'].shape == (2, 4, 14, 14, 256)
  assert ours['tokens'].shape == (2, 4, 147, 768)
  errors = compare(ours, want, TOL32, TOL32_MAPS)
  print('full-size QCS float32 relative errors:', errors)


def test_full_size_dcs_8_classes_eval_parity():
  cfg = R.make_cfg(R.FULL_CFG, name='dcs', csa='s', num_classes=8)
  ref = R.build_reference(cfg, seed=2)
  variables = convert_reference(ref, cfg)
  images = R.random_images(cfg, 2, seed=3, branches=2)
  want = reference_graph(ref, images, torch.float32)
  ours = train_graph(models.build_model(cfg), variables, images)
  assert ours['base'].shape == ours['cross'].shape == (2, 2, 8)
  errors = compare(ours, want, TOL32, TOL32_MAPS)
  print('full-size DCS-8 float32 relative errors:', errors)


def _count(shapes, top=None):
  return sum(int(np.prod(s)) for p, s in shapes.items() if p[0] == 'params'
             and (top is None or re.sub(r'_\d+$', '', p[1]) in top))


def test_parameter_counts(full_qcs):
  cfg, ref, _ = full_qcs
  unused = R.UNUSED_PATTERNS
  total = R.count_params(ref)
  used = R.count_params(ref, unused)
  output_layer = R.count_params(ref.ir_back.output_layer)
  # docs/ARCHITECTURE.md sections 1 and 3: output_layer 12.85M of 16.06M never-used parameters:
  # output_layer, per-block ViT conv, CON1, IRLinear1/2, eca_block, patch_embed.
  assert round((total - used) / 1e6, 2) == 16.06
  assert round(output_layer / 1e6, 2) == 12.85
  infer_used = sum(
      p.numel() for k, p in ref.named_parameters()
      if k.split('.')[0] in INFERENCE_PATH and
      not any(re.search(u, k) for u in unused))
  shapes = convert.expected_shapes(cfg)
  assert _count(shapes) == used
  assert _count(shapes, INFERENCE_PATH) == infer_used
  dcs = convert.expected_shapes(dict(cfg, name='dcs', csa='s'))
  assert _count(dcs) == used - 3  # no theta
  base = convert.expected_shapes(dict(cfg, name='baseline'))
  assert _count(base) == infer_used
  print(f'PyTorch {total:,} parameters, {total - used:,} never used; Flax '
        f'QCS {used:,}, inference path {infer_used:,}')


# ----------------------------------------------------------------------------
# Tiny models, float64.


@pytest.mark.parametrize('overrides', [
    dict(name='qcs', csa='sd', minmax='global'),
    dict(name='qcs', csa='s', minmax='sample'),
    dict(name='qcs', csa='d', minmax='global'),
    dict(name='dcs', csa='sdpa'),  # DCS 's': test_float64_train_mode_parity
], ids=lambda o: '-'.join(o.values()))
def test_float64_eval_parity(overrides):
  cfg = R.make_cfg(**overrides)
  ref = R.build_reference(cfg, seed=5, dtype=torch.float64)
  images = R.random_images(cfg, 3, seed=6,
                           branches=R.NUM_BRANCHES[cfg['name']]).astype(np.float64)
  want = reference_graph(ref, images, torch.float64)
  with jax.enable_x64(True):
    variables = convert_reference(ref, cfg, np.float64)
    ours = train_graph(models.build_model(cfg), variables, images)
  assert ours['base'].dtype == np.float64
  errors = compare(ours, want, TOL64, TOL64)
  print(f'float64 eval {overrides}: max relative error {max(errors.values()):.2g}')


@pytest.mark.parametrize('overrides', [
    dict(name='qcs', csa='sd', minmax='global'),
    dict(name='dcs', csa='s', minmax='global'),
], ids=lambda o: o['name'])
def test_float64_train_mode_parity(overrides):
  """Per-branch BN statistics and composed running-stat updates."""
  cfg = R.make_cfg(**overrides)
  ref = R.build_reference(cfg, seed=7, dtype=torch.float64)
  nb = R.NUM_BRANCHES[cfg['name']]
  images = R.random_images(cfg, 3, seed=8, branches=nb).astype(np.float64)
  with jax.enable_x64(True):
    variables = convert_reference(ref, cfg, np.float64)
    ours = train_graph(models.build_model(cfg), variables, images, train=True)
  ref.train()  # the reference: one ir_back call per branch, in train mode
  want = reference_graph(ref, images, torch.float64)
  errors = compare(ours, want, TOL64, TOL64)
  # Eval mode would differ: the test is not satisfied trivially.
  ref.eval()
  assert R.rel_err(reference_graph(ref, images, torch.float64)['base'],
                   want['base']) > 1e-3
  # Running statistics after the nb sequential reference updates.
  updated = convert.flatten_tree(ours['batch_stats'])
  assert len(updated) == len([p for p in convert.expected_shapes(cfg)
                              if p[0] == 'batch_stats'])
  before = convert.flatten_tree(variables['batch_stats'])
  ref_sd = ref.state_dict()
  for path, value in updated.items():
    key = convert.torch_key(('batch_stats',) + path)
    assert R.rel_err(value, ref_sd[key].numpy()) <= TOL64, key
    assert not np.allclose(value, before[path]), key  # it did move
    errors['running_stats'] = max(errors.get('running_stats', 0.0),
                                  R.rel_err(value, ref_sd[key].numpy()))
  print(f'float64 train mode {cfg["name"]}: max relative error '
        f'{max(errors.values()):.2g} (running stats '
        f'{errors["running_stats"]:.2g})')
