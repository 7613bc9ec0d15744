"""Config checks at a program's start, before anything is written: every wrong key named.

`check_config(cfg, device_count)` raises one ConfigError listing each problem
(choices, ranges, init paths, the batch against the devices).
"""
from __future__ import annotations

import os

import ml_collections

from qcs_jax.data.sources import DATASET_NAMES
from qcs_jax.model_files.locate import CheckpointError, read_metadata
from qcs_jax.models.qcs import NUM_BRANCHES


class ConfigError(ValueError):
  """A config mistake; the message names the key (and value) to fix."""


_CHOICES = {
    "model.name": tuple(NUM_BRANCHES),
    "data.on_bad_image": ("error", "skip"),
    "data.on_missing": ("error", "drop"),
    "data.augment_on": ("auto", "host", "device"),
    "data.anchors": ("shuffle", "balanced"),
    "data.negatives": ("random", "balanced"),
}
_POSITIVE = ("data.batch_size", "data.eval_batch_size", "train.epochs", "optim.lr",
             "train.keep", "train.log_every", "train.checkpoint_every", "model.num_classes")
_NON_NEGATIVE = ("data.workers", "optim.warmup_steps", "train.stop_after_steps")


def _lookup(cfg: ml_collections.ConfigDict, key: str):
  node = cfg
  for part in key.split("."):
    if part not in node:
      return None
    node = node[part]
  return node


def init_path_problem(key: str, path: str) -> str | None:
  """Why config.init.<key>=path cannot be loaded (None when it can)."""
  where = f"config.init.{key}={path}"
  if not os.path.exists(path):
    return f"{where}: no such file or directory"
  if os.path.isfile(path):
    return (f"{where} is a file; it must be a checkpoint directory (convert .pth files "
            "with qcs-convert)")
  try:
    read_metadata(path)
  except CheckpointError as e:
    return f"{where}: {e}"
  return None


def check_config(cfg: ml_collections.ConfigDict, device_count: int | None = None) -> None:
  """Raises ConfigError naming every wrong key: choices, ranges, init paths, batch vs devices.

  device_count None skips the batch-size check (multi-host runs check it after joining).
  """
  problems = []
  choices = dict(_CHOICES, **{"data.name": DATASET_NAMES})
  for key, allowed in choices.items():
    val = _lookup(cfg, key)
    if val is not None and val not in allowed:
      problems.append(f"{key}={val!r} is not one of {', '.join(map(repr, allowed))}")
  for key, low in [(k, 1e-300) for k in _POSITIVE] + [(k, 0) for k in _NON_NEGATIVE]:
    val = _lookup(cfg, key)
    if val is None:
      continue
    if isinstance(val, bool) or not isinstance(val, (int, float)):
      problems.append(f"{key}={val!r} must be a number")
    elif val < low:
      problems.append(f"{key}={val} must be {'> 0' if low else '>= 0'}")
  fraction = _lookup(cfg, "data.epoch_fraction")
  if fraction is not None and not 0.0 < fraction <= 1.0:
    problems.append(f"data.epoch_fraction={fraction} must be in (0, 1]")
  for key in ("backbone", "checkpoint"):
    path = _lookup(cfg, f"init.{key}")
    if path and not (key == "backbone" and path == "scratch"):  # scratch: a random IR50
      problem = init_path_problem(key, str(path))
      if problem:
        problems.append(problem)
  bs = _lookup(cfg, "data.batch_size")
  if device_count and isinstance(bs, int) and bs > 0 and bs % device_count:
    up = -(-bs // device_count) * device_count
    problems.append(f"data.batch_size={bs} is not a multiple of the {device_count} devices "
                    f"(jax.device_count()); use e.g. --config.data.batch_size={up}")
  if problems:
    raise ConfigError("; ".join(problems))
