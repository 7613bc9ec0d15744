"""The variable tree a model config creates: paths, shapes, and the defaults of config.model.

Model checkpoints (qcs_jax/checkpoint.py) and the PyTorch converter
(qcs_jax/interop/converter.py) both check what they read against
`expected_shapes`, computed with `jax.eval_shape` from the model itself (no
hand-written table that could drift from the code).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from qcs_jax.models.qcs import NUM_BRANCHES, QCSModel

Path = tuple[str, ...]

# The one source of config.model's defaults: QCSModel's fields (the paper's model).
# (Flax reserves `name`: its dataclass default is None, which means 'qcs'.)
DEFAULT_MODEL_CFG: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(QCSModel)
    if f.name not in ('parent',) and f.default is not dataclasses.MISSING}
DEFAULT_MODEL_CFG['name'] = DEFAULT_MODEL_CFG.get('name') or 'qcs'
_TUPLE_FIELDS = ('stage_channels', 'stage_units')


def model_cfg_dict(model_cfg: Any) -> dict[str, Any]:
  """config.model (a ConfigDict or dict) over DEFAULT_MODEL_CFG, as a plain dict."""
  if hasattr(model_cfg, 'to_dict'):
    model_cfg = model_cfg.to_dict()
  cfg = dict(DEFAULT_MODEL_CFG)
  cfg.update(dict(model_cfg))
  for k in _TUPLE_FIELDS:
    cfg[k] = tuple(int(x) for x in cfg[k])
  if cfg['name'] not in NUM_BRANCHES:
    raise ValueError(f'config.model.name must be one of {tuple(NUM_BRANCHES)}, '
                     f'got {cfg["name"]!r}')
  return cfg


def flatten_tree(tree: Mapping, prefix: Path = ()) -> dict[Path, Any]:
  """Nested dicts -> {path tuple: leaf}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten_tree(v, prefix + (str(k),)))
    else:
      out[prefix + (str(k),)] = v
  return out


def unflatten_tree(flat: Mapping[Path, Any]) -> dict[str, Any]:
  """{path tuple: leaf} -> nested dicts."""
  out: dict[str, Any] = {}
  for path, v in sorted(flat.items()):
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return out


def expected_shapes(model_cfg: Any) -> dict[Path, tuple[int, ...]]:
  """{('params'|'batch_stats', ...): shape} of `build_model(cfg).init`."""
  cfg = model_cfg_dict(model_cfg)
  return dict(_expected_shapes_cached(tuple(sorted(cfg.items()))))


@functools.lru_cache(maxsize=16)
def _expected_shapes_cached(cfg_items: tuple) -> dict[Path, tuple[int, ...]]:
  # models/__init__.py imports this module: build_model is looked up at call time.
  from qcs_jax.models import build_model  # pylint: disable=import-outside-toplevel
  cfg = dict(cfg_items)
  model = build_model(cfg)
  size = cfg['img_size']
  x = jax.ShapeDtypeStruct((1, NUM_BRANCHES[cfg['name']], size, size, 3), jnp.float32)
  key = jax.random.key(0)
  shapes = jax.eval_shape(
      lambda imgs: model.init({'params': key, 'dropout': key}, imgs, train=False), x)
  return {p: tuple(v.shape) for p, v in flatten_tree(shapes).items()
          if p[0] in ('params', 'batch_stats')}
