"""IR50+ViT baseline on ferplus (paper Table 1): no released script; the DCS recipe."""
from qcs_jax.recipes import base, ferplus_dcs


def get_config():
  return base.baseline_of(ferplus_dcs.get_config())
