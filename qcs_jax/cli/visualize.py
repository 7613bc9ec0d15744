"""qcs-visualize: the Cross Similarity Attention of a DCS (2 images) or QCS (4 images) model.

  qcs-visualize --checkpoint runs/rafdb_qcs ANCHOR POSITIVE NEG NEG2 \
      --output csa.png [--detect] [--margin 0.25] [--min_face 40] [--dpi 100]

Images are anchor, positive (same expression)[, negative, negative2 (another
shared expression)]. One row per image: the face and its CSA attention at each
pyramid level; then the S / D token x token matrices. See qcs_jax/apps/csa_maps.py.
--detect finds and aligns each face as qcs-predict does (qcs_jax.Recognizer).
"""
from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Sequence

from qcs_jax.apps import csa_maps as visualize
from qcs_jax.apps.user_images import read_image
from qcs_jax.data.errors import DataError
from qcs_jax.model_files.model_dir import CheckpointError, load_checkpoint


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="qcs-visualize", description=__doc__.split("\n\n")[0])
  ap.add_argument("images", nargs="+", help="2 (DCS) or 4 (QCS) face images, anchor first")
  ap.add_argument("--checkpoint", required=True, help="checkpoint dir or training workdir")
  ap.add_argument("--output", required=True, help="PNG to write")
  ap.add_argument("--detect", action="store_true",
                  help="crop the largest face of each image, aligned as qcs-predict does")
  ap.add_argument("--margin", type=float, default=0.25)
  ap.add_argument("--min_face", type=int, default=40)
  ap.add_argument("--dpi", type=int, default=visualize.DPI)
  args = ap.parse_args(argv)
  if len(args.images) not in (2, 4):
    ap.error(f"give 2 (DCS) or 4 (QCS) images, got {len(args.images)}")

  try:
    loaded = load_checkpoint(args.checkpoint)
    pictures = [read_image(p) for p in args.images]
    maps = visualize.visualize_csa(loaded, pictures, args.output, names=args.images,
                                   detect=args.detect, margin=args.margin,
                                   min_face=args.min_face, dpi=args.dpi)
  except (CheckpointError, DataError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.output} ({maps['grid']}x{maps['grid']} tokens per level; recomputed "
        f"attention within {maps['max_attention_error']:.1e} of the model's)")
  return 0


def run() -> None:
  """Console script `qcs-visualize`."""
  sys.exit(main())


if __name__ == "__main__":
  run()
