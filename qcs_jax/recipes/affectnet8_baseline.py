"""IR50+ViT baseline on affectnet8 (paper Table 1): no released script; the DCS recipe."""
from qcs_jax.recipes import base, affectnet8_dcs


def get_config():
  return base.baseline_of(affectnet8_dcs.get_config())
