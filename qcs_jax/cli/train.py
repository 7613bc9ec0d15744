"""qcs-train --config configs/rafdb.py [--workdir runs/rafdb]  (or python -m qcs_jax.train ...)

Rerunning the same command on an existing workdir resumes it exactly. Without
--workdir the run goes to runs/<config file name> (runs/synthetic_dcs for
configs/synthetic.py:dcs). Problems with the user's input (data, checkpoints,
config values) are one `error:` line and exit code 2, with nothing left behind.
"""
from __future__ import annotations

import os
import shutil
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from qcs_jax import runtime
from qcs_jax.cli.flags import absl_parser
from qcs_jax import recipes
from qcs_jax.recipes import checks
from qcs_jax.training import distributed, loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Run directory: checkpoints, metrics, plots "
                               "(default runs/<config name>).")
flags.mark_flags_as_required(["config"])


def default_workdir(config_arg: str) -> str:
  """'configs/synthetic.py:dcs' -> 'runs/synthetic_dcs' (also for the packaged recipe file)."""
  path, _, arg = config_arg.partition(":")
  name = recipes.name_of(path)
  return os.path.join("runs", f"{name}_{arg}" if arg else name)


def _created_without_checkpoint(workdir: str, existed: bool) -> bool:
  """True when this invocation created `workdir` and saved no checkpoint in it."""
  if existed or not os.path.isdir(workdir):
    return False
  ckpts = os.path.join(workdir, "checkpoints")
  return not (os.path.isdir(ckpts) and os.listdir(ckpts))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  distributed.maybe_initialize_distributed()
  workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].serialize()
                                              .split("=", 1)[-1])
  existed = os.path.exists(workdir)
  if distributed.is_writer():
    print(f"workdir: {workdir}" + (" (resuming if it holds a run)" if existed else ""),
          flush=True)
  try:
    best = loop.train_and_evaluate(_CONFIG.value, workdir)
  except (ValueError, OSError) as e:  # DataError, CheckpointError, config errors
    if distributed.is_writer() and _created_without_checkpoint(workdir, existed):
      shutil.rmtree(workdir, ignore_errors=True)
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  if best and distributed.is_writer():
    print(f"best test accuracy {100 * best['best_accuracy']:.2f}% at epoch "
          f"{best['best_epoch']}; model in {workdir}/best")


def _checked_main(argv):
  """Config mistakes -> one `error:` line naming the key, before the workdir is touched."""
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  logging.set_verbosity(logging.WARNING)
  multi_host = bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or (
      os.environ.get("SLURM_NTASKS", "1") != "1")  # jax.device_count() only after joining
  try:
    cfg = _CONFIG.value
    cfg.keys()  # a config file that failed to load raises here
  except OSError as e:  # ml_collections defers a config file's load error to here
    lines = [l.strip() for l in str(e.__cause__ or e).splitlines() if l.strip()]
    print(f"error: cannot load --config: {lines[-1]}", file=sys.stderr)
    sys.exit(2)
  try:
    if _WORKDIR.value and os.path.isfile(_WORKDIR.value):
      raise checks.ConfigError(f"--workdir={_WORKDIR.value} is a file, not a directory")
    checks.check_config(cfg, None if multi_host else jax.device_count())
  except checks.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  # A resumed (e.g. preempted) run loads its compiled train step instead of
  # compiling it again. QCS_JAX_CACHE_DIR=0: off.
  runtime.enable_compilation_cache()
  main(argv)


def run() -> None:
  """Console script `qcs-train`."""
  runtime.set_cpu_xla_defaults()
  app.run(_checked_main, flags_parser=absl_parser("qcs-train", __doc__, __name__))


if __name__ == "__main__":
  run()
