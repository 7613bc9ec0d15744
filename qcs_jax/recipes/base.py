"""The base of every config in configs/: all fields with their defaults.

A recipe file (configs/<data set>[_dcs|_baseline].py) starts from
``paper_config(model, dataset)`` and sets each value of its released training
script by name, with the script (or paper) line it comes from; every field can
still be overridden on the command line (``--config.optim.lr=3e-6``).
tests/test_recipes.py checks the recipe files against the released scripts
(tests/fixtures/released_recipes.json).
"""
from __future__ import annotations

import importlib.util
import os

import ml_collections

from qcs_jax.models.qcs import NUM_BRANCHES  # re-exported: images per training sample
from qcs_jax.models.shapes import DEFAULT_MODEL_CFG

__all__ = ["NUM_BRANCHES", "NUM_CLASSES", "ConfigError", "base_config", "paper_config",
           "recipe", "baseline_of", "load_config_file", "synthetic", "check_config",
           "parse_flags_or_exit"]

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
NUM_CLASSES = {"rafdb": 7, "ferplus": 8, "affectnet7": 7, "affectnet8": 8, "synthetic": 7}
PAPER_DATASETS = ("rafdb", "ferplus", "affectnet7", "affectnet8")  # each has configs/<name>*.py
# The similarity each paper model refines with (docs/ARCHITECTURE.md): DCS one S, QCS S and D.
CSA = {"qcs": "sd", "dcs": "s", "baseline": DEFAULT_MODEL_CFG["csa"]}


def base_config() -> ml_collections.ConfigDict:
  """Every field with its default (model: QCSModel's fields; the rest: QCS on RAF-DB)."""
  from qcs_jax.data.transforms import recipe_augment  # pylint: disable=import-outside-toplevel

  c = ml_collections.ConfigDict()
  c.model = dict(DEFAULT_MODEL_CFG)
  c.data = dict(
      name="rafdb", root="", train_split="train", test_split="test", batch_size=24,
      eval_batch_size=64, workers=2, on_bad_image="error", anchors="shuffle",
      negatives="random", epoch_fraction=1.0, rafdb_variant="aligned", list_train="",
      list_test="", csv="", class_names=(), on_missing="error",
      fer2013_csv="", ferplus_labels="",
      augment=recipe_augment("rafdb"),
      synthetic=dict(num_train=10000, num_test=2000, image_size=112, seed=0,
                     confound=(), label_noise=0.05))
  # Every released script: SAM(params, torch.optim.Adam, lr, rho=0.05) with Adam's
  # defaults (its --wd and --beta are parsed but never used) and ExponentialLR(0.98).
  c.optim = dict(lr=4e-6, rho=0.05, b1=0.9, b2=0.999, eps=1e-8, gamma=0.98, sam=True,
                 warmup_steps=0)
  c.train = dict(epochs=200, seed=0, log_every=50, checkpoint_every=500, keep=2,
                 allow_config_change=False, progress=True, eval_every=1,
                 stop_after_steps=0)
  # backbone: a converted ir50.pth (qcs-convert), or "scratch"; require_backbone:
  # the paper recipes refuse to start from a random IR50 unless told "scratch".
  c.init = dict(backbone="", checkpoint="", require_backbone=False)
  return c


def paper_config(model: str, dataset: str) -> ml_collections.ConfigDict:
  """The part every paper recipe shares: the model and data set named, the paper's
  network (IR50 + ViT, 224 px), the released optimiser. A recipe file sets the rest."""
  if model not in NUM_BRANCHES:
    raise ValueError(f"model must be one of {sorted(NUM_BRANCHES)}, got {model!r}")
  if dataset not in NUM_CLASSES:
    raise ValueError(f"dataset must be one of {sorted(NUM_CLASSES)}, got {dataset!r}")
  c = base_config()
  c.model.update(name=model, csa=CSA[model], num_classes=NUM_CLASSES[dataset])
  c.data.name = dataset
  c.init.require_backbone = True  # every paper number starts from the Ms-Celeb-1M IR50
  return c


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """get_config() of a config file given by path (as --config loads it)."""
  spec = importlib.util.spec_from_file_location(
      "qcs_config_" + os.path.splitext(os.path.basename(path))[0], path)
  if spec is None or spec.loader is None:
    raise ValueError(f"cannot load config file {path}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def recipe(model: str, dataset: str) -> ml_collections.ConfigDict:
  """The config of a paper recipe, read from its file configs/<dataset>[_dcs|_baseline].py
  (the files ship with the repository, beside this package)."""
  paper_config(model, dataset)  # names checked
  name = dataset + ("" if model == "qcs" else "_" + model) + ".py"
  path = os.path.join(CONFIGS_DIR, name)
  if not os.path.isfile(path):
    raise ValueError(f"recipe {model} on {dataset}: no config file {path} (configs/ is part "
                     "of the repository checkout, not of an installed wheel)")
  return load_config_file(path)


def baseline_of(config_file: str, dcs_file: str) -> ml_collections.ConfigDict:
  """The IR50+ViT baseline (paper Table 1) trained as the DCS recipe next to it.

  No script for the baseline was released; the paper's ablation trains it with the
  DCS settings. ``config_file`` is the caller's __file__, ``dcs_file`` a sibling.
  """
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(config_file)), dcs_file))
  c.model.update(name="baseline", csa=CSA["baseline"])
  return c


def synthetic(model: str = "qcs") -> ml_collections.ConfigDict:
  """The embedded demo: a small network on the synthetic faces, minutes on 2 CPU cores."""
  c = base_config()
  c.model.update(name=model, csa=CSA[model], num_classes=NUM_CLASSES["synthetic"],
                 img_size=64, stage_channels=(16, 32, 64), stage_units=(1, 1, 2),
                 embed_dim=64, num_heads=4, base_depth=1, cross_depth=1)
  c.data.update(name="synthetic", batch_size=32, eval_batch_size=256, workers=0,
                augment={"resize": 64, "rotate": 0, "crop": False, "hflip": True,
                         "jitter": (0.1, 0.1, 0.1, 0.0), "erase_scale": (),
                         "erase_p": 0.0})
  c.data.synthetic.update(num_train=3000, num_test=1000, image_size=64,
                          confound=(), label_noise=0.05)
  # From scratch, Adam at full rate can stall at ln(7) loss: warm up for ~1 epoch.
  c.optim.update(lr=2e-3, gamma=0.85, warmup_steps=100)
  c.train.update(epochs=8, log_every=20, checkpoint_every=100)
  return c


# --------------------------------------------------------------------------- checks
# Everything below runs at a CLI's startup, before anything is written.

class ConfigError(ValueError):
  """A config mistake; the message names the key (and value) to fix."""


_CHOICES = {
    "model.name": tuple(NUM_BRANCHES),
    "data.on_bad_image": ("error", "skip"),
    "data.on_missing": ("error", "drop"),
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
  import os  # pylint: disable=import-outside-toplevel
  from qcs_jax import checkpoint  # pylint: disable=import-outside-toplevel
  where = f"config.init.{key}={path}"
  if not os.path.exists(path):
    return f"{where}: no such file or directory"
  if os.path.isfile(path):
    return (f"{where} is a file; it must be a checkpoint directory (convert .pth files "
            "with tools/convert_ir50.py)")
  try:
    checkpoint.read_metadata(path)
  except checkpoint.CheckpointError as e:
    return f"{where}: {e}"
  return None


def check_config(cfg: ml_collections.ConfigDict, device_count: int | None = None) -> None:
  """Raises ConfigError naming every wrong key: choices, ranges, init paths, batch vs devices.

  device_count None skips the batch-size check (multi-host runs check it after joining).
  """
  from qcs_jax.data.sources import DATASET_NAMES  # pylint: disable=import-outside-toplevel
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


def _unknown_key(err: Exception, argv: list[str]) -> str:
  """ml_collections' KeyError/AttributeError for a mistyped override -> one line naming it."""
  import re  # pylint: disable=import-outside-toplevel
  text = str(err).replace("\\'", "'").replace('\\"', '"')
  bad = re.search(r'instead of "([\w.]+)"', text) or re.search(r"'([\w.]+)'", text)
  hint = re.search(r'Did you mean "([\w.]+)"', text)
  name = bad.group(1) if bad else text.splitlines()[0]
  for arg in argv[1:]:
    if arg.startswith("--config."):
      path = arg[len("--config."):].split("=", 1)[0]
      if name in path.split("."):
        name = f"{path!r} (in {arg})"
        break
  return f"unknown config key {name}" + (f"; did you mean {hint.group(1)!r}?" if hint else "")


def parse_flags_or_exit(argv: list[str]) -> list[str]:
  """An absl ``flags_parser``: flag and config-override mistakes become one ``error:`` line.

  absl would print a traceback for an unknown --config.<key> override; this
  names the key and exits with status 2 before main() runs.
  """
  import sys  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    msg = str(e)
  except (AttributeError, KeyError) as e:
    msg = _unknown_key(e, argv)
  except (TypeError, ValueError, OSError, SyntaxError) as e:
    msg = f"{type(e).__name__}: {e}"
  print(f"error: {msg.splitlines()[0] if msg else 'bad command line'}", file=sys.stderr)
  sys.exit(2)
