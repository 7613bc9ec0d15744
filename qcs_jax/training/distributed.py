"""Multi-process (multi-host) training: joining a job, and a local launcher.

A job is P processes, each with the same number of local devices; the mesh is
all P x D devices along ``data``. Process 0 writes files and logs; every process
builds only its own rows of each global batch (pipeline ``part``).

Joining: ``maybe_initialize_distributed`` calls ``jax.distributed.initialize``
when JAX_COORDINATOR_ADDRESS is set (with JAX_NUM_PROCESSES and JAX_PROCESS_ID,
as the launcher below and the README's plain-environment recipe set them) or
when SLURM describes a job of several tasks (JAX reads SLURM's own variables).

Launcher: ``python -m qcs_jax.training.distributed --processes 2 -- --config
configs/synthetic.py --workdir runs/x`` starts P local ``qcs_jax.train``
processes on CPU over 127.0.0.1 (gloo collectives); if one dies, the others are
stopped, so a rerun of the same command resumes the whole job (``--restarts N``
does that rerun itself, up to N times).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Sequence

import jax

ENV_ADDRESS, ENV_NUM, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def _env_int(environ, name: str) -> int:
  value = environ.get(name)
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{ENV_ADDRESS} is set, so {name} must be an integer; got "
                     f"{value!r}") from None


def maybe_initialize_distributed(environ=os.environ) -> bool:
  """Joins the job the environment describes; False (and nothing done) if none."""
  if environ.get(ENV_ADDRESS):
    num, pid = _env_int(environ, ENV_NUM), _env_int(environ, ENV_ID)
    if not 0 <= pid < num:
      raise ValueError(f"{ENV_ID}={pid} must lie in 0..{ENV_NUM}-1 = 0..{num - 1}")
    jax.distributed.initialize(coordinator_address=environ[ENV_ADDRESS], num_processes=num,
                               process_id=pid)
    return True
  if environ.get("SLURM_NTASKS", "1") != "1":
    jax.distributed.initialize()
    return True
  return False


def barrier(name: str, timeout_s: int = 1800) -> None:
  """Waits until every process of the job gets here (no-op with one process).

  Through the coordination service, not a collective: a loaded machine can put
  processes minutes apart (compiles, data generation), past gloo's 30 s
  context set-up deadline, which the first collective would otherwise hit.
  """
  if jax.process_count() == 1:
    return
  # JAX's distributed client has no public barrier: its private module, looked up
  # only by a multi-process run.
  from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel
  jax_distributed.global_state.client.wait_at_barrier(f"qcs_jax:{name}", timeout_s * 1000)


def is_writer() -> bool:
  """True in the one process that writes files and logs (process 0)."""
  return jax.process_index() == 0


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _xla_flags(flags: str, devices: int) -> str:
  """flags with the host device count set to `devices` (replacing any earlier count)."""
  name = "--xla_force_host_platform_device_count"
  kept = [f for f in flags.split() if not f.startswith(name + "=")]
  return " ".join(kept + [f"{name}={devices}"])


def process_env(i: int, n: int, devices: int, port: int, base=None) -> dict:
  """The environment of local process i of n."""
  env = dict(os.environ if base is None else base)
  env.update({ENV_ADDRESS: f"127.0.0.1:{port}", ENV_NUM: str(n), ENV_ID: str(i),
              "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
              "XLA_FLAGS": _xla_flags(env.get("XLA_FLAGS", ""), devices)})
  return env


def start_local(command: Sequence[str], processes: int, devices_per_process: int = 1,
                port: int | None = None, base_env=None, **popen_kw) -> list[subprocess.Popen]:
  """Starts `processes` copies of command (argv), process i with process_env(i, ...)."""
  if processes < 1 or devices_per_process < 1:
    raise ValueError(f"need processes >= 1 and devices per process >= 1, got "
                     f"{processes} and {devices_per_process}")
  port = port or free_port()
  return [subprocess.Popen(list(command), env=process_env(i, processes, devices_per_process,
                                                          port, base_env), **popen_kw)
          for i in range(processes)]


def stop(procs: Sequence[subprocess.Popen], grace_s: float = 10.0) -> None:
  """SIGTERM to the processes still running, SIGKILL to those left after grace_s."""
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  deadline = time.monotonic() + grace_s
  for p in procs:
    try:
      p.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def wait_all(procs: Sequence[subprocess.Popen], timeout_s: float | None = None) -> int:
  """Waits for every process; when one fails, stops the rest (they would block in
  collectives). Returns 0, or the first failing process's exit status."""
  deadline = None if timeout_s is None else time.monotonic() + timeout_s
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = [c for c in codes if c not in (None, 0)]
      if failed:
        stop(procs)
        return failed[0]
      if all(c == 0 for c in codes):
        return 0
      if deadline is not None and time.monotonic() > deadline:
        stop(procs)
        raise TimeoutError(f"the {len(procs)} processes did not finish in {timeout_s} s")
      time.sleep(0.2)
  except KeyboardInterrupt:
    stop(procs)
    raise


def run_local(command: Sequence[str], processes: int, devices_per_process: int = 1,
              restarts: int = 0, port: int | None = None, **popen_kw) -> int:
  """Runs the job; when a process fails, stops the others and, up to `restarts`
  times, starts them all again (training resumes from its last checkpoint).

  Each start takes a fresh coordinator port unless `port` is given. Returns 0 or
  the last failing status.
  """
  if restarts < 0:
    raise ValueError(f"restarts must be >= 0, got {restarts}")
  attempt = 0
  while True:
    code = wait_all(start_local(command, processes, devices_per_process, port, **popen_kw))
    if code == 0 or attempt == restarts:
      return code
    attempt += 1
    print(f"a training process exited with status {code}; the others were stopped; "
          f"starting all {processes} again ({attempt} of {restarts} restarts)",
          file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m qcs_jax.training.distributed",
      description="Runs qcs_jax.train as N local processes (CPU, 127.0.0.1); the "
                  "arguments after -- go to qcs_jax.train.")
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=1)
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
  parser.add_argument("--restarts", type=int, default=0,
                      help="when a process dies, start all again (resuming) up to N times")
  parser.add_argument("train_args", nargs=argparse.REMAINDER)
  args = parser.parse_args(argv)
  rest = [a for a in args.train_args if a != "--"]
  try:
    code = run_local([sys.executable, "-m", "qcs_jax.train", *rest], args.processes,
                     args.devices_per_process, args.restarts, args.port or None)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if code:
    print(f"error: a training process exited with status {code}; the others were "
          f"stopped. Rerun the same command to resume.", file=sys.stderr)
  return code


if __name__ == "__main__":
  sys.exit(main())
