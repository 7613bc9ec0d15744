"""PyTorch IR50 / QCS / DCS checkpoints -> qcs_jax checkpoints (same as `qcs-convert`)."""
import sys

from qcs_jax.cli.convert import main

if __name__ == "__main__":
  sys.exit(main())
