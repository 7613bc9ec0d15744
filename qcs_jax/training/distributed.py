"""Multi-process (multi-host) helpers: joining a job, which process writes files."""
from __future__ import annotations

import os

import jax


def maybe_initialize_distributed() -> None:
  """Multi-host: join the job when the environment describes one (coordinator set)."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_NTASKS", "1") != "1":
    jax.distributed.initialize()


def is_writer() -> bool:
  """True in the one process that writes files and logs (process 0)."""
  return jax.process_index() == 0
