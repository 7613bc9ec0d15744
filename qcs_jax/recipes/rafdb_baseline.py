"""IR50+ViT baseline on rafdb (paper Table 1): no released script; the DCS recipe."""
from qcs_jax import config as base


def get_config():
  return base.baseline_of(__file__, "rafdb_dcs.py")
