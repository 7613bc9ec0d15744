"""End-to-end training images/s: the recipe's real input pipeline feeding the train step.

  python tools/benchmark_e2e.py --recipe rafdb --batch 24 --steps 10 --augment_on host,device
  python tools/benchmark_e2e.py --help
"""
from qcs_jax.bench.e2e import main

if __name__ == "__main__":
  main()
