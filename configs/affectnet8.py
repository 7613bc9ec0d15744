"""QCS on affectnet8 (released recipe; see qcs_jax/config.py RECIPES)."""
from qcs_jax.config import recipe


def get_config():
  return recipe("qcs", "affectnet8")
