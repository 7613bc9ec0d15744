"""The machine's attainable float32 GEMM rate in both frameworks."""
# Imports wait inside the functions that need them: a benchmark worker process imports
# only its own framework's side, whose memory and start-up it measures.
from __future__ import annotations

import numpy as np

from qcs_jax.bench.workload import machine_line, timed


def roofline_main(args) -> None:
  """The machine's attainable float32 rate: the best of square GEMMs in both frameworks.

  A train step's FLOP/s against this says how much room any framework has left.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(args.threads)
  jmm = jax.jit(lambda x: x @ x)
  rows = []
  for n in args.roofline_sizes:
    a = np.random.default_rng(0).normal(size=(n, n)).astype(np.float32)
    ja, ta = jax.device_put(a), torch.from_numpy(a)
    fns = {"jax": lambda: jmm(ja).block_until_ready(), "torch": lambda: torch.mm(ta, ta)}
    for name, fn in fns.items():
      fn()  # compiles (JAX) and warms up
      best = min(timed(fn)["wall_s"] for _ in range(args.steps))
      rows.append((name, n, 2 * n ** 3 / best / 1e9))
      print(f"  {name:<6} {n}x{n} float32 GEMM: {rows[-1][2]:7.1f} GFLOP/s (best of "
            f"{args.steps})", flush=True)
  best = max(rows, key=lambda r: r[2])
  print(f"attainable float32 rate on {machine_line()}: {best[2]:.1f} GFLOP/s "
        f"({best[0]}, {best[1]}x{best[1]})")
