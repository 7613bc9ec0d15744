"""The embedded demo: QCS with a small network on the synthetic faces (no download).

`--config=configs/synthetic.py:dcs` or `:baseline` picks the other models.
"""
from qcs_jax.config import synthetic


def get_config(model: str = "qcs"):
  return synthetic(model or "qcs")
