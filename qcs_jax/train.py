"""`python -m qcs_jax.train --config configs/rafdb.py`: the same program as qcs-train.

The card's command; the program itself is qcs_jax/cli/train.py.
"""
from qcs_jax.cli.train import run

if __name__ == "__main__":
  run()
