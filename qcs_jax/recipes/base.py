"""The base of every recipe: all config fields with their defaults.

A paper recipe (qcs_jax/recipes/<data set>[_dcs|_baseline].py) starts from
``paper_config(model, dataset)`` and sets each value of its released training
script by name, with the script (or paper) line it comes from; every field can
still be overridden on the command line (``--config.optim.lr=3e-6``).
tests/test_recipes.py checks the recipes against the released scripts
(tests/fixtures/released_recipes.json).
"""
from __future__ import annotations

import ml_collections

from qcs_jax.data.transforms import recipe_augment
from qcs_jax.models.qcs import NUM_BRANCHES  # images per training sample, by model name
from qcs_jax.models.shapes import DEFAULT_MODEL_CFG

NUM_CLASSES = {"rafdb": 7, "ferplus": 8, "affectnet7": 7, "affectnet8": 8, "synthetic": 7}
PAPER_DATASETS = ("rafdb", "ferplus", "affectnet7", "affectnet8")  # each has recipes/<name>*.py
# The similarity each paper model refines with (docs/ARCHITECTURE.md): DCS one S, QCS S and D.
CSA = {"qcs": "sd", "dcs": "s", "baseline": DEFAULT_MODEL_CFG["csa"]}


def base_config() -> ml_collections.ConfigDict:
  """Every field with its default (model: QCSModel's fields; the rest: QCS on RAF-DB)."""
  c = ml_collections.ConfigDict()
  c.model = dict(DEFAULT_MODEL_CFG)
  c.data = dict(
      name="rafdb", root="", train_split="train", test_split="test", batch_size=24,
      eval_batch_size=64, workers=2, on_bad_image="error", anchors="shuffle",
      negatives="random", epoch_fraction=1.0, rafdb_variant="aligned", list_train="",
      list_test="", csv="", class_names=(), on_missing="error",
      fer2013_csv="", ferplus_labels="",
      # augment_on: 'host' (decode + augment on the host, float32 batches), 'device'
      # (uint8 batches from an image cache in cache_dir, '' = ~/.cache/qcs_jax/images;
      # the random augmentation in the jitted step) or 'auto' (device on a GPU or TPU,
      # host on CPU: docs/ACCELERATORS.md says why).
      augment_on="auto", cache_dir="",
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


def baseline_of(dcs: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The IR50+ViT baseline (paper Table 1) trained as the DCS recipe `dcs`.

  No script for the baseline was released; the paper's ablation trains it with the
  DCS settings.
  """
  dcs.model.update(name="baseline", csa=CSA["baseline"])
  return dcs
