"""QCS / DCS / baseline models in Flax (linen), NHWC, batch-major branches."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from qcs_jax.models.qcs import (NUM_BRANCHES, QCSModel, num_branches,
                                tokens_per_level)

MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(QCSModel)
                     if f.name not in ('parent',))
_TUPLE_FIELDS = ('stage_channels', 'stage_units')


def build_model(model_cfg: Mapping[str, Any] | Any) -> QCSModel:
  """config.model (ConfigDict or dict) -> QCSModel; missing keys take defaults.

  dtype 'float32': compute follows inputs/params (float64 params and inputs
  under jax_enable_x64 compute in float64); 'bfloat16': bf16 convs/matmuls with
  float32 params, norms, softmax and CSA in float32, float32 logits.
  Unknown keys or invalid values raise ValueError naming the key.
  """
  cfg = model_cfg.to_dict() if hasattr(model_cfg, 'to_dict') else dict(model_cfg)
  unknown = sorted(set(cfg) - set(MODEL_FIELDS))
  if unknown:
    raise ValueError(f'config.model has unknown keys {unknown}; known: {MODEL_FIELDS}')
  for key in _TUPLE_FIELDS:
    if key in cfg:
      cfg[key] = tuple(int(v) for v in cfg[key])
  return QCSModel(**cfg)


__all__ = ['MODEL_FIELDS', 'NUM_BRANCHES', 'QCSModel', 'build_model', 'num_branches',
           'tokens_per_level']
