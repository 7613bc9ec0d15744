"""Speed of qcs_jax against the PyTorch reference (see qcs_jax/bench/cli.py for the options).

  python tools/benchmark.py --framework both --model qcs --batch 2 --mode train
  python tools/benchmark.py --help
"""
from qcs_jax.bench.cli import main

if __name__ == "__main__":
  main()
