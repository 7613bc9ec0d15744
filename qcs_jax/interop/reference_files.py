"""Writers of the PyTorch files users hold (docs/CONVERTER.md section 1), for tests and
--verify: ir50.pth in both key layouts, and training checkpoints exactly as the
authors' main_*.py scripts save them (DataParallel 'module.' keys, a tensor best_acc,
SAM's state, `__main__.RecorderMeter_*` objects, storages tagged 'cuda:0')."""
from __future__ import annotations

import collections
import sys
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from qcs_jax.interop.reference import Backbone, make_stage


def _stage_offsets(units: Sequence[int]) -> list[int]:
  return [sum(units[:s]) for s in range(3)]


def ir50_state_dict(backbone: Backbone, layout: str, stage_units: Sequence[int],
                    stage4_units: int = 3, seed: int = 1
                    ) -> collections.OrderedDict:
  """The Ms-Celeb-1M ir50.pth key sets: 'split' (body1/2/3) or 'consecutive'.

  The consecutive layout also holds a random 4th stage (c3 -> 2*c3, the
  `body.21-23` units at paper size) that the converter must ignore.
  """
  sd = backbone.state_dict()
  if layout == 'split':
    return collections.OrderedDict((k, v.clone()) for k, v in sd.items())
  if layout != 'consecutive':
    raise ValueError(layout)
  offsets = _stage_offsets(stage_units)
  out = collections.OrderedDict()
  for k, v in sd.items():
    head, _, rest = k.partition('.')
    if head in ('body1', 'body2', 'body3'):
      idx, _, tail = rest.partition('.')
      k = f'body.{offsets[int(head[-1]) - 1] + int(idx)}.{tail}'
    out[k] = v.clone()
  c3 = backbone.body3[0].res_layer[4].num_features
  torch.manual_seed(seed)
  stage4 = make_stage(c3, 2 * c3, stage4_units)
  first = sum(stage_units)
  for k, v in stage4.state_dict().items():
    idx, _, tail = k.partition('.')
    out[f'body.{first + int(idx)}.{tail}'] = v.clone()
  return out


def save_ir50(path, backbone: Backbone, layout: str,
              stage_units: Sequence[int], legacy: bool = False) -> None:
  torch.save(ir50_state_dict(backbone, layout, stage_units), str(path),
             _use_new_zipfile_serialization=not legacy)


class RecorderMeter_loss:  # pylint: disable=invalid-name
  """Stand-in for the authors' training-script class (pickled as __main__): the
  four per-epoch training losses of QCS (main_*.py's RecorderMeter_loss)."""

  def __init__(self, total_epoch: int):
    self.total_epoch = total_epoch
    self.current_epoch = 0
    self.epoch_losses = np.zeros((total_epoch, 4), dtype=np.float32)


class RecorderMeter_matrix:  # pylint: disable=invalid-name
  """Stand-in for main_*.py's RecorderMeter_matrix: last predictions and targets."""

  def __init__(self, total_epoch: int):
    self.total_epoch = total_epoch
    self.current_epoch = 0
    self.epoch_losses = np.zeros((total_epoch, 2), dtype=np.float32)
    self.epoch_accuracy = np.zeros((total_epoch, 2), dtype=np.float32)
    self.y_pred: Any = None
    self.y_true: Any = None


_RECORDERS = (RecorderMeter_loss, RecorderMeter_matrix)


def full_checkpoint(model: nn.Module | None = None, epoch: int = 7, best_acc: float = 91.5,
                    embed_names: str = 'qkv',
                    state_dict: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
  """A training checkpoint as main_*.py's save_checkpoint writes it.

  {'epoch', 'state_dict' (DataParallel: 'module.' keys), 'best_acc' (a 0-d
  tensor: max(val_acc, best_acc) of tensors), 'optimizer' (SAM's state dict:
  its saved weights 'old_p' only), 'recorder_m', 'recorder'}. `state_dict`
  replaces the model's (e.g. one built from the released files' key list).
  """
  source = model.state_dict() if state_dict is None else state_dict
  sd = collections.OrderedDict()
  rename = {'embed_q.': 'embed_1.', 'embed_k.': 'embed_2.', 'embed_v.': 'embed_3.'}
  for k, v in source.items():
    if embed_names == '123':
      for old, new in rename.items():
        if k.startswith(old):
          k = new + k[len(old):]
    sd['module.' + k] = v.clone()
  recorder = RecorderMeter_loss(epoch + 3)
  recorder.epoch_losses[:epoch] = np.linspace(1.5, 0.5, epoch * 4).reshape(-1, 4)
  recorder.current_epoch = epoch
  recorder_m = RecorderMeter_matrix(epoch + 3)
  recorder_m.y_pred = np.arange(10) % 7
  recorder_m.y_true = np.arange(10)[::-1] % 7
  params = [v for k, v in source.items() if v.dtype.is_floating_point][:3]
  optimizer = {
      'state': {i: {'old_p': p.detach().clone()} for i, p in enumerate(params)},
      'param_groups': [{'lr': 3e-6, 'betas': (0.9, 0.999), 'eps': 1e-8,
                        'weight_decay': 0, 'amsgrad': False, 'rho': 0.05,
                        'adaptive': False, 'params': list(range(len(source)))}],
  }
  return {'epoch': epoch, 'state_dict': sd,
          'best_acc': torch.tensor(best_acc, dtype=torch.float32),
          'optimizer': optimizer, 'recorder_m': recorder_m, 'recorder': recorder}


_TAG_AS_CUDA = [False]


def _cuda_tagger(obj: Any) -> str | None:
  """Location tag 'cuda:0' while saving a checkpoint 'from CUDA' (no GPU needed)."""
  return 'cuda:0' if _TAG_AS_CUDA[0] else None


def _cuda_restore(obj: Any, location: str) -> Any:
  return None  # map_location='cpu' is what every reader of these files uses


torch.serialization.register_package(-1, _cuda_tagger, _cuda_restore)


def save_full_checkpoint(path, model: nn.Module | None = None, cuda: bool = True,
                         **kwargs) -> None:
  """Writes full_checkpoint() as the authors' scripts do: its recorders pickled as
  `__main__.RecorderMeter_*`, every storage tagged 'cuda:0' (saved from a GPU)
  unless `cuda` is False."""
  ckpt = full_checkpoint(model, **kwargs)
  main = sys.modules['__main__']
  saved = []
  for cls in _RECORDERS:
    saved.append((cls, cls.__module__, hasattr(main, cls.__name__)))
    cls.__module__ = '__main__'
    if not saved[-1][2]:
      setattr(main, cls.__name__, cls)
  _TAG_AS_CUDA[0] = cuda
  try:
    torch.save(ckpt, str(path))
  finally:
    _TAG_AS_CUDA[0] = False
    for cls, module, had in saved:
      cls.__module__ = module
      if not had:
        delattr(main, cls.__name__)
