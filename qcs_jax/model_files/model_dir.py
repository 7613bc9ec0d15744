"""Model checkpoints on disk: an orbax pytree plus a JSON model config.

Layout of a checkpoint directory DIR:
  DIR/variables/   orbax StandardCheckpointer pytree {'params', 'batch_stats'}
  DIR/model.json   {'format', 'kind' ('model'|'backbone'), 'model' (config.model
                    fields), 'class_names' (optional), 'extra' (free metadata)}

`load_model(DIR).logits(images)` is the documented Python entry point that
evaluation and prediction use; `load_checkpoint` also takes a training workdir.

Two imports wait until they are needed, for start-up time: orbax (~0.5-1 s of
imports; weights_cache reads the usual files without it) and the Flax model
and its shapes (a predictor that runs a saved compiled program never builds
them; see apps/compiled_programs.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
import uuid
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qcs_jax.model_files import weights_cache
from qcs_jax.model_files.locate import (FORMAT, CheckpointError, read_metadata,
                                        resolve_checkpoint)

def _plain_cfg(model_cfg: Any) -> dict[str, Any]:
  cfg = model_cfg.to_dict() if hasattr(model_cfg, 'to_dict') else dict(model_cfg)
  return json.loads(json.dumps(cfg))  # tuples -> lists; fails early if odd


def _kind(variables: Mapping[str, Any]) -> str:
  params = variables.get('params', {})
  return 'backbone' if set(params) == {'ir_back'} else 'model'


def _this_process_only(ocp: Any) -> Any:
  """Orbax options for a save made by the calling process alone (in a multi-process
  job, process 0 writes best/; orbax would otherwise wait for the others)."""
  if jax.process_count() == 1:
    return ocp.options.MultiprocessingOptions()
  i = jax.process_index()
  return ocp.options.MultiprocessingOptions(primary_host=i, active_processes={i})


def save_variables(directory: str | os.PathLike, variables: Mapping[str, Any],
                   model_cfg: Any, extra: Mapping[str, Any] | None = None,
                   force: bool = False) -> pathlib.Path:
  """Writes DIR/variables (orbax) and DIR/model.json, atomically.

  Everything is written to a hidden sibling directory that is renamed into
  place at the end, so a failure leaves nothing at DIR (or the old checkpoint
  when overwriting). Refuses an existing DIR unless `force`.
  """
  directory = pathlib.Path(directory).absolute()
  if 'params' not in variables:
    raise CheckpointError('variables must hold a "params" collection')
  if directory.exists() and not force:
    raise CheckpointError(
        f'{directory} already exists; pass force=True (--force) to overwrite')
  extra = dict(extra or {})
  meta = {
      'format': FORMAT,
      'kind': _kind(variables),
      'model': _plain_cfg(model_cfg),
      'class_names': (list(extra.pop('class_names'))
                      if extra.get('class_names') is not None else None),
      'num_values': int(sum(np.size(x) for x in jax.tree.leaves(variables))),
      'extra': extra,
  }
  meta_text = json.dumps(meta, indent=2, sort_keys=True, default=str)
  host = jax.tree.map(np.asarray, dict(variables))
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f'.{directory.name}.tmp-',
                                      dir=directory.parent))
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private
  try:
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel  # see top
    ckptr = ocp.StandardCheckpointer(multiprocessing_options=_this_process_only(ocp))
    ckptr.save(tmp / 'variables', host)
    ckptr.wait_until_finished()
    (tmp / 'model.json').write_text(meta_text)
    if directory.exists():
      old = directory.parent / f'.{directory.name}.old-{uuid.uuid4().hex[:8]}'
      directory.rename(old)
      tmp.rename(directory)
      shutil.rmtree(old, ignore_errors=True)
    else:
      tmp.rename(directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory




def _check_shapes(variables: Mapping[str, Any], model_cfg: dict[str, Any],
                  kind: str, where: str) -> None:
  """Every leaf present with the shape `build_model(model_cfg)` creates."""
  from qcs_jax.models import shapes  # pylint: disable=import-outside-toplevel  # see top
  expected = shapes.expected_shapes(model_cfg)
  if kind == 'backbone':
    expected = {p: s for p, s in expected.items() if p[1] == 'ir_back'}
  got = {p: tuple(np.shape(v)) for p, v in
         shapes.flatten_tree(variables).items()}
  missing = sorted(set(expected) - set(got))
  extra = sorted(set(got) - set(expected))
  bad = [p for p in expected if p in got and got[p] != expected[p]]
  problems = []
  if missing:
    problems.append(f'{len(missing)} missing, e.g. {"/".join(missing[0])}')
  if extra:
    problems.append(f'{len(extra)} unexpected, e.g. {"/".join(extra[0])}')
  if bad:
    p = bad[0]
    problems.append(f'{len(bad)} with other shapes, e.g. {"/".join(p)} '
                    f'{got[p]} vs {expected[p]}')
  if problems:
    raise CheckpointError(
        f'{where}: variables do not match its model config ({"; ".join(problems)})')


def load_variables(directory: str | os.PathLike, check_shapes: bool = True,
                   arrays: dict[str, Any] | None = None
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
  """DIR -> (variables {'params', 'batch_stats'} of numpy arrays, model cfg).

  The variables are checked against the model config saved with them
  (check_shapes=False skips that: it traces the whole model, ~1 s at paper
  size; check_variables() does it later, e.g. when the model fails to run).
  arrays: DIR/variables already read by weights_cache (e.g. in a thread while JAX
  was imported); None reads them here.
  """
  meta = read_metadata(directory)
  path = pathlib.Path(directory).absolute() / 'variables'
  variables = arrays if arrays is not None else weights_cache.read_arrays(path)
  if variables is None:
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel  # see top
    try:
      variables = ocp.StandardCheckpointer().restore(path)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'{path}: cannot restore ({type(e).__name__}: {e})') from e
  variables = jax.tree.map(np.asarray, dict(variables))
  if check_shapes:
    _check_shapes(variables, meta['model'], meta.get('kind', 'model'),
                  str(directory))
  return variables, meta['model']


def check_variables(loaded: 'LoadedModel', where: str) -> None:
  """Raises CheckpointError if loaded.variables do not fit loaded.model_cfg."""
  _check_shapes(loaded.variables, loaded.model_cfg,
                loaded.metadata.get('kind', 'model'), where)


@dataclasses.dataclass
class LoadedModel:
  """A restored model ready for inference: `logits(images) -> (B, K)`.

  The Flax module (`model`) and its jitted inference path are built on first
  use, so a caller that runs a cached compiled program (apps/compiled_programs.py) never
  imports Flax or traces the network.
  """
  module: Any
  variables: Any
  model_cfg: dict[str, Any]
  class_names: list[str] | None
  metadata: dict[str, Any]
  _infer: Callable[..., Any] = dataclasses.field(repr=False, default=None)

  @property
  def model(self) -> Any:
    """The Flax module (built from model_cfg when first asked for)."""
    if self.module is None:
      from qcs_jax import models  # pylint: disable=import-outside-toplevel  # see top
      self.module = models.build_model(self.model_cfg)
    return self.module

  def logits(self, images: Any) -> jax.Array:
    """float32 (B, H, W, 3) normalised NHWC -> logits (B, K), eval mode."""
    shape = np.shape(images)
    size = self.model_cfg.get('img_size', 224)
    if len(shape) != 4 or shape[-1] != 3 or shape[1:3] != (size, size):
      raise ValueError(f'expected images (B, {size}, {size}, 3), got {shape}')
    if self._infer is None:
      model = self.model
      self._infer = jax.jit(lambda v, x: model.apply(v, x, method='infer'))
    return self._infer(self.variables, jnp.asarray(images, jnp.float32))


def load_model(directory: str | os.PathLike, check_shapes: bool = True,
               arrays: dict[str, Any] | None = None) -> LoadedModel:
  """DIR -> LoadedModel (model, variables, model_cfg, class_names, logits).

  check_shapes, arrays: see load_variables.
  """
  meta = read_metadata(directory)
  if meta.get('kind') == 'backbone':
    raise CheckpointError(
        f'{directory} holds only an IR50 backbone (a training init, see '
        'config.init.backbone), not a whole model')
  variables, model_cfg = load_variables(directory, check_shapes, arrays)
  return LoadedModel(module=None, variables=jax.device_put(variables), model_cfg=model_cfg,
                     class_names=meta.get('class_names'), metadata=meta)


def load_checkpoint(path: str | os.PathLike) -> LoadedModel:
  """load_model on a checkpoint directory or a training workdir (its best/)."""
  return load_model(resolve_checkpoint(path))
