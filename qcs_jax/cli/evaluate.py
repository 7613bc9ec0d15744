r"""qcs-evaluate: a checkpoint on a data split: accuracy, per-class metrics, confusion matrix.

  qcs-evaluate --config configs/rafdb.py --checkpoint runs/rafdb_qcs \
      [--split test] [--tta_flip] [--predictions_csv preds.csv] [--output eval/]

--checkpoint is a checkpoint directory (converted or exported: it holds
model.json) or a training workdir (its best/ checkpoint is used). The model is
built from the checkpoint's own model config; --config supplies the data set
(and is read from the workdir's config.json when omitted).
"""
from __future__ import annotations

import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from qcs_jax import runtime
from qcs_jax.apps import evaluation
from qcs_jax.cli.flags import absl_parser


def run() -> None:
  """Console script `qcs-evaluate`; its flags are defined here, so that importing this
  module beside qcs_jax.cli.train (which defines --config too) defines none."""

  config = config_flags.DEFINE_config_file(
      "config", None, "Recipe file naming the data set (configs/*.py); default: the "
      "training workdir's config.json.", lock_config=True)
  ckpt = flags.DEFINE_string("checkpoint", None, "Checkpoint dir or training workdir.")
  split = flags.DEFINE_string("split", None, "Data split (default config.data.test_split).")
  tta = flags.DEFINE_bool("tta_flip", False, "Average softmax of image and its mirror.")
  preds_csv = flags.DEFINE_string("predictions_csv", None, "Write per-image predictions.")
  output = flags.DEFINE_string("output", None, "Folder for confusion.png/json, metrics.json.")
  bs = flags.DEFINE_integer("batch_size", None, "Global eval batch (default from config).")
  progress = flags.DEFINE_bool("progress", True, "Show a progress bar.")
  flags.mark_flag_as_required("checkpoint")

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # no orbax/XLA INFO lines
    runtime.enable_compilation_cache()  # QCS_JAX_CACHE_DIR=0 turns it off
    try:
      result = evaluation.evaluate_checkpoint(
          config.value, ckpt.value, split.value, tta.value, output.value, preds_csv.value,
          bs.value, progress.value,
          on_warning=lambda w: print(f"warning: {w}", file=sys.stderr, flush=True))
    except (ValueError, OSError) as e:  # DataError, CheckpointError are ValueErrors
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    print(evaluation.format_report(result))
    if output.value:
      print(f"wrote {os.path.join(output.value, 'confusion.png')}, confusion.json, "
            f"metrics.json")
    if preds_csv.value:
      print(f"wrote {preds_csv.value}")

  runtime.set_cpu_xla_defaults()
  app.run(main, flags_parser=absl_parser("qcs-evaluate", __doc__, __name__))


if __name__ == "__main__":
  run()
