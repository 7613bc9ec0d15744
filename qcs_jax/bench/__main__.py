"""python -m qcs_jax.bench: the benchmark CLI (also tools/benchmark.py)."""
from qcs_jax.bench.cli import main

if __name__ == "__main__":
  main()
