"""Export a checkpoint's inference path to a jax.export artefact and an ONNX model.

  python -m qcs_jax.export --checkpoint runs/rafdb --out exported/rafdb \
      [--formats jax,onnx] [--tolerance 1e-4] [--force] [--benchmark]

Writes OUT/model.jax_export (serialized StableHLO, weights inside, symbolic
batch; `jax.export.deserialize(bytes).call(images)`), OUT/model.onnx (run it
with onnxruntime) and OUT/export.json (preprocessing, class names, parity).
Each artefact is reloaded from its file and checked against the JAX model on
synthetic faces at batch 1 and 8; the export fails (exit 1, the failing file
removed) when the max relative logits error is above --tolerance.
--benchmark then times onnxruntime and the jitted JAX model, interleaved.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from qcs_jax import runtime


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(prog="python -m qcs_jax.export",
                               description=__doc__.split("\n\n")[0])
  ap.add_argument("--checkpoint", required=True, help="checkpoint dir or training workdir")
  ap.add_argument("--out", required=True, help="output folder")
  ap.add_argument("--formats", default="jax,onnx", help="comma-separated: jax, onnx")
  ap.add_argument("--tolerance", type=float, default=1e-4,
                  help="largest accepted max relative logits error")
  ap.add_argument("--force", action="store_true", help="overwrite existing artefacts")
  ap.add_argument("--benchmark", action="store_true",
                  help="time onnxruntime vs JAX (images/s, interleaved) after exporting")
  ap.add_argument("--benchmark_batch_sizes", default="1,16")
  ap.add_argument("--benchmark_rounds", type=int, default=3,
                  help="interleaved rounds per runner and batch size (best one reported)")
  return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  from qcs_jax.apps import export_lib  # pylint: disable=import-outside-toplevel
  from qcs_jax.checkpoint import CheckpointError  # pylint: disable=import-outside-toplevel
  formats = [f.strip() for f in args.formats.split(",") if f.strip()]
  if not args.tolerance > 0:
    print(f"error: --tolerance must be > 0, got {args.tolerance}", file=sys.stderr)
    return 2
  try:
    meta = export_lib.export_checkpoint(args.checkpoint, args.out, formats, args.tolerance,
                                        args.force)
  except (CheckpointError, export_lib.ExportError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1 if isinstance(e, export_lib.ExportError) else 2
  if args.benchmark:
    from qcs_jax.evaluate import load_checkpoint  # pylint: disable=import-outside-toplevel
    loaded = load_checkpoint(args.checkpoint)
    runners = {"jax": loaded.logits}
    if "onnx" in meta["artefacts"]:
      runners["onnxruntime"] = export_lib.load_onnx_runner(
          os.path.join(args.out, export_lib.ONNX_FILE))
    sizes = [int(s) for s in args.benchmark_batch_sizes.split(",") if s]
    rates = export_lib.time_runners(runners, int(loaded.model_cfg["img_size"]), sizes,
                                    args.benchmark_rounds)
    for bs in sizes:
      print(f"batch {bs:3d}: " + ", ".join(
          f"{k} {r[bs]['images_per_s']:.2f} images/s ({r[bs]['cpu_s_per_image']:.3f} CPU-s/image)"
          for k, r in rates.items()))
    print(f"({os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f})")
  return 0


def run() -> None:
  """Console script `qcs-export`."""
  runtime.set_cpu_xla_defaults()
  sys.exit(main())


if __name__ == "__main__":
  run()
