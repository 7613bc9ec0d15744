"""Train state: TrainState, the device mesh, random init, loading init weights."""
from __future__ import annotations

import logging
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qcs_jax.model_files import model_dir
from qcs_jax.models.qcs import NUM_BRANCHES

log = logging.getLogger("qcs_jax")


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jnp.ndarray

  @property
  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats}


def make_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ("data",))


def _dummy_images(cfg) -> jnp.ndarray:
  s = cfg.model.img_size
  return jnp.zeros((1, NUM_BRANCHES[cfg.model.name], s, s, 3), jnp.float32)


def init_variables(model, cfg, rng) -> dict:
  """Random variables with the init of docs/ARCHITECTURE.md (host side, before sharding)."""
  prng, drng = jax.random.split(rng)
  v = jax.jit(lambda p, d: model.init({"params": p, "dropout": d}, _dummy_images(cfg),
                                      train=False))(prng, drng)
  return {"params": v["params"], "batch_stats": v.get("batch_stats", {})}


def _replace_subtree(target: dict, source: dict, what: str) -> dict:
  """target with source's leaves, refusing any structure or shape mismatch."""
  t_flat = flax.traverse_util.flatten_dict(target, sep="/")
  s_flat = flax.traverse_util.flatten_dict(source, sep="/")
  missing = sorted(set(t_flat) - set(s_flat))
  extra = sorted(set(s_flat) - set(t_flat))
  if missing or extra:
    raise ValueError(f"{what}: checkpoint does not fit the configured model: "
                     f"missing {missing[:5]} ({len(missing)}), unexpected {extra[:5]} ({len(extra)})")
  for k, v in s_flat.items():
    if tuple(np.shape(v)) != tuple(np.shape(t_flat[k])):
      raise ValueError(f"{what}: {k} has shape {np.shape(v)}, the model wants {np.shape(t_flat[k])}")
  out = {k: jnp.asarray(v, dtype=t_flat[k].dtype) for k, v in s_flat.items()}
  return flax.traverse_util.unflatten_dict(out, sep="/")


SCRATCH = "scratch"  # config.init.backbone=scratch: a random IR50, deliberately


def check_init(cfg) -> None:
  """Refuses a paper recipe that would train from a random IR50 (before anything is written).

  The paper's accuracies depend on the Ms-Celeb-1M IR50: recipes that need it set
  config.init.require_backbone; `--config.init.backbone=scratch` opts out. (That
  the init paths exist is checked with the rest of the config, config.check_config.)
  """
  init = cfg.init
  if init.get("require_backbone", False) and not init.backbone and not init.checkpoint:
    raise model_dir.CheckpointError(
        "this recipe trains from the Ms-Celeb-1M IR50, as the paper does (its accuracies "
        "depend on it), but config.init.backbone is empty. Download the authors' ir50.pth "
        "(qcs-convert --list_zoo), convert it with `qcs-convert --input ir50.pth --output "
        "runs/ir50` and add --config.init.backbone=runs/ir50; or pass "
        "--config.init.backbone=scratch to train from a random IR50 on purpose.")


def apply_init(variables: dict, init_cfg) -> dict:
  """Loads config.init.backbone (converted IR50) or config.init.checkpoint (full model)."""
  variables = jax.tree.map(lambda x: x, variables)
  if init_cfg.checkpoint:
    loaded, _ = model_dir.load_variables(init_cfg.checkpoint)
    for col in ("params", "batch_stats"):
      variables[col] = _replace_subtree(variables[col], loaded.get(col, {}),
                                        f"init.checkpoint={init_cfg.checkpoint} [{col}]")
    log.info("initialised the whole model from %s", init_cfg.checkpoint)
  elif init_cfg.backbone and init_cfg.backbone != SCRATCH:
    loaded, _ = model_dir.load_variables(init_cfg.backbone)
    for col in ("params", "batch_stats"):
      if "ir_back" not in loaded.get(col, {}):
        raise ValueError(f"init.backbone={init_cfg.backbone}: no ir_back {col} in it")
      variables[col]["ir_back"] = _replace_subtree(
          variables[col]["ir_back"], loaded[col]["ir_back"],
          f"init.backbone={init_cfg.backbone} [{col}]")
    log.info("initialised ir_back from %s", init_cfg.backbone)
  return variables


def create_state(variables: dict, tx, rng, mesh: Mesh) -> TrainState:
  """The replicated train state, built under jit with out_shardings from eval_shape."""

  def make(v, r):
    return TrainState(step=jnp.zeros((), jnp.int32), params=v["params"],
                      batch_stats=v["batch_stats"], opt_state=tx.init(v["params"]), rng=r)

  shapes = jax.eval_shape(make, variables, rng)
  shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), shapes)
  return jax.jit(make, out_shardings=shardings)(variables, rng)
