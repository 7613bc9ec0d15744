"""IR50+ViT baseline on affectnet7 (paper Table 1): no released script; the DCS recipe."""
from qcs_jax.recipes import base, affectnet7_dcs


def get_config():
  return base.baseline_of(affectnet7_dcs.get_config())
