"""qcs-demo: try a model in your browser, a local web page that recognises expressions in photos.

  qcs-demo [--checkpoint DIR] [--host 127.0.0.1] [--port 7860] \
      [--max_upload_mb 10]

Without --checkpoint it runs the embedded demo model (qcs_jax/assets/demo_model:
the inference path of configs/synthetic.py:baseline trained on the synthetic
faces, so its labels on real photos are only a demonstration). Works offline: the page has
no external resources. Stop it with Ctrl-C.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any, Sequence

import numpy as np

from qcs_jax import runtime
from qcs_jax.apps import webdemo
from qcs_jax.apps.recognizer import Recognizer
from qcs_jax.model_files.model_dir import CheckpointError, load_checkpoint

DEMO_MODEL = pathlib.Path(__file__).parent.parent / "assets" / "demo_model"
BATCH = 8  # faces per model call: one compiled shape


def recognize(model: Any, image: np.ndarray, detect: bool = True,
              max_faces: int | None = None) -> list[dict]:
  """THE adapter between the demo and the model: photo -> [{box, label, score, probabilities}].

  `model`: a Recognizer (faces found and aligned exactly as qcs-predict does), or a
  loaded checkpoint, for which one is built. detect=False: the photo is one face.
  max_faces: only the largest ones are classified (bounds the model time of one photo).
  """
  rec = model if isinstance(model, Recognizer) else Recognizer(model, max_batch=BATCH)
  h, w = image.shape[:2]
  if not detect:
    return [{"box": [0, 0, w, h], **row} for row in rec.predict_faces(image)]
  if min(h, w) < rec.min_face:  # too small to hold a face: the page says "no face found"
    return []
  rgb, dets = rec.detect(image)   # largest first
  dets = dets[:max_faces]
  if not dets:
    return []
  probs = rec.classify([rec.crop(rgb, d) for d in dets])
  return [{"box": list(d.box.as_tuple()), **rec.result(p)} for d, p in zip(dets, probs)]


def load(checkpoint: str | None) -> tuple[Any, str]:
  """(loaded model, description) of --checkpoint or of the embedded demo model."""
  if checkpoint:
    return load_checkpoint(checkpoint), f"Model: {checkpoint}."
  if not (DEMO_MODEL / "model.json").is_file():
    raise CheckpointError(f"the embedded demo model is missing ({DEMO_MODEL}); pass "
                          "--checkpoint DIR")
  model = load_checkpoint(str(DEMO_MODEL))
  acc = (model.metadata.get("extra") or {}).get("accuracy")
  score = f", {100 * acc:.1f}% test accuracy there" if isinstance(acc, float) else ""
  return model, ("Model: the embedded demo model (the small network of configs/synthetic.py "
                 f"trained on synthetic cartoon faces{score}: its labels on real photos are a "
                 "demonstration, not a measurement).")


def build_app(checkpoint: str | None, max_upload_mb: float = 10.0) -> Any:
  """The DemoApp of a checkpoint (None: the embedded model), compiled and ready."""
  model, description = load(checkpoint)
  rec = Recognizer(model, max_batch=BATCH)
  rec.warmup((1,))  # compile now: the first photo is answered at once
  info = {"description": description, "class_names": rec.class_names,
          "img_size": rec.img_size}
  return webdemo.DemoApp(lambda image, detect: recognize(rec, image, detect,
                                                        max_faces=webdemo.MAX_FACES), info,
                         max_bytes=int(max_upload_mb * 1024 * 1024))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(prog="qcs-demo",
                               description=__doc__.split("\n\n")[0])
  ap.add_argument("--checkpoint", help="checkpoint dir or training workdir (default: the "
                                       "embedded demo model)")
  ap.add_argument("--host", default="127.0.0.1",
                  help="address to listen on (default: this computer only)")
  ap.add_argument("--port", type=int, default=7860, help="port (0: any free port)")
  ap.add_argument("--max_upload_mb", type=float, default=10.0, help="largest upload (MB)")
  return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  if not args.max_upload_mb > 0:
    print(f"error: --max_upload_mb must be > 0, got {args.max_upload_mb}", file=sys.stderr)
    return 2
  try:
    app = build_app(args.checkpoint, args.max_upload_mb)
    server = webdemo.make_server(app, args.host, args.port)
  except (CheckpointError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  host, port = server.server_address[:2]
  print(f"QCS demo on http://{host}:{port}/  (Ctrl-C stops it)", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
  return 0


def run() -> None:
  """Console script `qcs-demo`."""
  runtime.set_cpu_xla_defaults()
  sys.exit(main())


if __name__ == "__main__":
  run()
