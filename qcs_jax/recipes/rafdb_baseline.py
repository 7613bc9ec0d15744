"""IR50+ViT baseline on rafdb (paper Table 1): no released script; the DCS recipe."""
from qcs_jax.recipes import base, rafdb_dcs


def get_config():
  return base.baseline_of(rafdb_dcs.get_config())
