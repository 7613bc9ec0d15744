"""Converted weights against the PyTorch reference: the check behind convert_ir50 --verify.

Apart from convert.py because it needs torch and a reference network; conversion
itself needs neither.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import numpy as np

from qcs_jax import models
from qcs_jax.interop import converter as convert


def _rel_err(ours: Any, ref: np.ndarray) -> float:
  ours = np.asarray(ours, np.float64)
  ref = np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def verify_against_torch(sd: Mapping[str, np.ndarray], variables: Mapping,
                         model_cfg: Any, reference: Any, full: bool,
                         batch: int = 2, seed: int = 0) -> dict[str, float]:
  """Max relative errors of Flax vs the PyTorch reference on a random batch.

  `reference` is the module of a PyTorch implementation with the authors'
  names (qcs_jax/interop/reference.py: `Backbone`, `QCSReference`); it gets the
  original state dict `sd`, the Flax model gets the converted `variables`.
  Backbone: stage outputs x1..x3; full: also tokens, logits, and the
  training-time graph's base/cross logits (eval mode). float64 variables run
  both sides in float64.
  """
  import torch  # pylint: disable=import-outside-toplevel  # optional: only --verify needs it
  cfg = convert.model_cfg_dict(model_cfg)
  nsd = convert.reference_state_dict(sd, cfg)
  f64 = convert.flatten_tree(variables)[
      ('params', 'ir_back', 'input_conv', 'kernel')].dtype == np.float64
  tdtype = torch.float64 if f64 else torch.float32
  if full:
    net, prefix = reference.QCSReference(cfg), ''
  else:
    net = reference.Backbone(cfg['stage_channels'], cfg['stage_units'],
                             cfg['img_size'])
    prefix = 'ir_back.'
  own = net.state_dict()
  load, absent = {}, []
  for k, t in own.items():
    src = nsd.get(prefix + k)
    if src is not None and tuple(src.shape) == tuple(t.shape):
      load[k] = torch.from_numpy(np.array(src))
    elif not any(re.search(p, prefix + k) for p, _ in convert.KNOWN_UNUSED):
      absent.append(prefix + k)
  if absent:
    raise convert.ConversionError(f'reference network lacks weights for {absent[:5]}')
  net.load_state_dict(load, strict=False)
  net = net.to(tdtype).eval()
  rng = np.random.default_rng(seed)
  nb = convert.NUM_BRANCHES[cfg['name']] if full else 1
  size = cfg['img_size']
  images = rng.normal(size=(batch, nb, size, size, 3)).astype(
      np.float64 if f64 else np.float32)
  nchw = lambda x: torch.from_numpy(np.ascontiguousarray(
      np.moveaxis(x, -1, 1))).to(tdtype)
  with torch.no_grad():
    if full:
      ref = net.features(nchw(images[:, 0]))
      train = net.forward_train(*[nchw(images[:, i]) for i in range(nb)])
      for k in ('base', 'cross'):
        if k in train:
          ref[f'train_{k}'] = torch.stack(train[k], 1)
    else:
      ref = dict(zip(('x1', 'x2', 'x3'), net(nchw(images[:, 0]))))
  ref = {k: v.numpy() for k, v in ref.items()}
  for k in ('x1', 'x2', 'x3'):
    ref[k] = np.moveaxis(ref[k], 1, -1)
  model = models.build_model(cfg)
  with jax.enable_x64(f64):
    if not full:  # the rest of the model is irrelevant to x1..x3: zeros
      flat = {p: np.zeros(s, images.dtype) for p, s in
              convert.expected_shapes(cfg).items()}
      flat.update(convert.flatten_tree(variables))
      variables = convert.unflatten_tree(flat)
    feats = jax.jit(lambda v, x: model.apply(v, x, method='features'))(
        variables, images[:, 0])
    ours = {k: feats[k] for k in ref if k in feats}
    if full:
      out = jax.jit(lambda v, x: model.apply(v, x, train=False))(
          variables, images)
      ours.update({f'train_{k}': v for k, v in out.items()})
    return {k: _rel_err(ours[k], ref[k]) for k in ref}
