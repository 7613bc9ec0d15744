"""Cross Similarity Attention figure of a DCS/QCS model (same as `qcs-visualize`)."""
import sys

from qcs_jax.cli.visualize import main

if __name__ == "__main__":
  sys.exit(main())
