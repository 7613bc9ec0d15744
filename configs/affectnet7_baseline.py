"""BASELINE on affectnet7 (released recipe; see qcs_jax/config.py RECIPES)."""
from qcs_jax.config import recipe


def get_config():
  return recipe("baseline", "affectnet7")
