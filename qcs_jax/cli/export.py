"""qcs-export: a checkpoint's inference path to a jax.export artefact and an ONNX model.

  qcs-export --checkpoint runs/rafdb_qcs --out exported/rafdb \
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
from qcs_jax.export import artefacts
from qcs_jax.model_files.model_dir import CheckpointError, load_checkpoint


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(prog="qcs-export",
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
  formats = [f.strip() for f in args.formats.split(",") if f.strip()]
  if not args.tolerance > 0:
    print(f"error: --tolerance must be > 0, got {args.tolerance}", file=sys.stderr)
    return 2
  try:
    meta = artefacts.export_checkpoint(args.checkpoint, args.out, formats, args.tolerance,
                                        args.force)
  except (CheckpointError, artefacts.ExportError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1 if isinstance(e, artefacts.ExportError) else 2
  if args.benchmark:
    loaded = load_checkpoint(args.checkpoint)
    runners = {"jax": loaded.logits}
    if "onnx" in meta["artefacts"]:
      runners["onnxruntime"] = artefacts.load_onnx_runner(
          os.path.join(args.out, artefacts.ONNX_FILE))
    sizes = [int(s) for s in args.benchmark_batch_sizes.split(",") if s]
    rates = artefacts.time_runners(runners, int(loaded.model_cfg["img_size"]), sizes,
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
