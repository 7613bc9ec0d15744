"""The training recipes, as code inside the package (so an installed wheel has them).

One module per recipe, each a ``get_config()`` that reads as the released training
script it reproduces: ``<data set>`` (QCS), ``<data set>_dcs``, ``<data set>_baseline``
for the four paper data sets, and ``demo`` (the synthetic faces). A checkout's
``configs/<name>.py`` files are one-line imports of these, for ``--config``.
"""
from __future__ import annotations

import importlib.util
import os

import ml_collections

from qcs_jax.recipes import (affectnet7, affectnet7_baseline, affectnet7_dcs, affectnet8,
                             affectnet8_baseline, affectnet8_dcs, demo, ferplus,
                             ferplus_baseline, ferplus_dcs, rafdb, rafdb_baseline, rafdb_dcs)
from qcs_jax.recipes.base import (CSA, NUM_BRANCHES, NUM_CLASSES, PAPER_DATASETS, base_config,
                                  paper_config)

__all__ = ["RECIPES", "recipe", "recipe_file", "name_of", "synthetic", "load_config_file", "CSA", "NUM_BRANCHES",
           "NUM_CLASSES", "PAPER_DATASETS", "base_config", "paper_config"]

# Recipe name (the configs/ file's) -> its module.
RECIPES = {
    "rafdb": rafdb, "rafdb_dcs": rafdb_dcs, "rafdb_baseline": rafdb_baseline,
    "ferplus": ferplus, "ferplus_dcs": ferplus_dcs, "ferplus_baseline": ferplus_baseline,
    "affectnet7": affectnet7, "affectnet7_dcs": affectnet7_dcs,
    "affectnet7_baseline": affectnet7_baseline,
    "affectnet8": affectnet8, "affectnet8_dcs": affectnet8_dcs,
    "affectnet8_baseline": affectnet8_baseline,
    "synthetic": demo,
}
synthetic = demo.get_config  # the embedded demo's config: synthetic(model="qcs")


def recipe(model: str, dataset: str) -> ml_collections.ConfigDict:
  """The config of a paper recipe: `model` ('qcs', 'dcs', 'baseline') on `dataset`."""
  paper_config(model, dataset)  # names checked
  return RECIPES[dataset + ("" if model == "qcs" else "_" + model)].get_config()


def recipe_file(name: str) -> str:
  """The packaged file of recipe `name` (what configs/<name>.py imports), for --config."""
  return os.path.abspath(RECIPES[name].__file__)


def name_of(path: str) -> str:
  """The recipe name of a config file: configs/<name>.py, or a packaged recipe's file
  (recipes/demo.py -> 'synthetic'); otherwise the file's own name."""
  for name, module in RECIPES.items():
    if os.path.abspath(path) == os.path.abspath(module.__file__):
      return name
  return os.path.splitext(os.path.basename(path))[0]


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """get_config() of a config file given by path (as --config loads it)."""
  if not os.path.isfile(path):
    raise ValueError(f"config file {path}: no such file")
  spec = importlib.util.spec_from_file_location(
      "qcs_config_" + os.path.splitext(os.path.basename(path))[0], path)
  if spec is None or spec.loader is None:
    raise ValueError(f"cannot load config file {path}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
