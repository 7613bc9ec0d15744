"""Command line: python -m qcs_jax.train --config configs/rafdb.py --workdir runs/rafdb.

Rerunning the same command on an existing workdir resumes it exactly.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from qcs_jax import runtime
from qcs_jax.training import distributed, loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, plots.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  distributed.maybe_initialize_distributed()
  best = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if best and distributed.is_writer():
    print(f"best test accuracy {100 * best['best_accuracy']:.2f}% at epoch "
          f"{best['best_epoch']}; model in {_WORKDIR.value}/best")


def run() -> None:
  """Console script `qcs-train`."""
  runtime.set_cpu_xla_defaults()
  app.run(main)


if __name__ == "__main__":
  run()
