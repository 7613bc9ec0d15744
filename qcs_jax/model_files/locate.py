"""Finding a model folder and reading its model.json, without importing JAX.

A model folder DIR holds DIR/variables/ (orbax) and DIR/model.json; a training
workdir holds one as best/. The predictor resolves its --checkpoint here
before JAX is imported (the weights' read starts first), so nothing here may
import JAX.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import ml_collections

FORMAT = 'qcs_jax.variables/1'
TUPLE_FIELDS = ('stage_channels', 'stage_units')


class CheckpointError(ValueError):
  """A checkpoint directory that is missing, incomplete or does not fit."""


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
  """DIR/model.json, checked; model config tuples restored."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise CheckpointError(f'{directory}: no such checkpoint directory')
  meta_path = directory / 'model.json'
  if not meta_path.is_file():
    raise CheckpointError(
        f'{directory}: not a qcs_jax checkpoint (no model.json); convert '
        'PyTorch files with qcs-convert')
  try:
    meta = json.loads(meta_path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f'{meta_path}: unreadable JSON ({e})') from e
  if meta.get('format') != FORMAT or not isinstance(meta.get('model'), dict):
    raise CheckpointError(
        f'{meta_path}: format {meta.get("format")!r}, expected {FORMAT!r}')
  for k in TUPLE_FIELDS:
    if k in meta['model']:
      meta['model'][k] = tuple(int(x) for x in meta['model'][k])
  if not (directory / 'variables').is_dir():
    raise CheckpointError(f'{directory}: incomplete checkpoint (no variables/)')
  return meta


def model_folder(path: str | os.PathLike) -> str:
  """`path` if it holds model.json, else its best/ when that does (a training workdir);
  otherwise `path` unchecked (reading it then says what is wrong)."""
  path = os.path.expanduser(os.fspath(path))
  best = os.path.join(path, 'best')
  if not os.path.isfile(os.path.join(path, 'model.json')) and os.path.isfile(
      os.path.join(best, 'model.json')):
    return best
  return path


def resolve_checkpoint(path: str | os.PathLike) -> str:
  """model_folder(path), checked: a CheckpointError explains a folder that holds no model."""
  found = model_folder(path)
  if os.path.isfile(os.path.join(found, 'model.json')):
    return found
  path = found
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    raise CheckpointError(
        f'{path} is a training workdir without a best/ model yet (one is written after the '
        f'first evaluated epoch)')
  read_metadata(path)  # raises the explanation
  return path


def workdir_config(checkpoint: str) -> ml_collections.ConfigDict | None:
  """The config.json a training run wrote next to (or above) its best/ checkpoint."""
  path = resolve_checkpoint(checkpoint)
  for d in (os.path.dirname(os.path.abspath(path)), os.path.abspath(path)):
    f = os.path.join(d, 'config.json')
    if os.path.isfile(f):
      with open(f) as fh:
        return ml_collections.ConfigDict(json.load(fh))
  return None
