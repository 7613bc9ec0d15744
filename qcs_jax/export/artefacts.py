"""Export of the inference path: a serialized jax.export artefact and an ONNX model.

Both take the tensor `LoadedModel.logits` takes, float32 (batch, S, S, 3) NHWC
RGB normalised by the eval transform, with a symbolic batch, and return
logits (batch, K). `export_checkpoint` writes DIR/model.jax_export,
DIR/model.onnx and DIR/export.json (preprocessing, classes, parity), and
checks each artefact, reloaded from its file, against the JAX model on
synthetic faces at batch 1 and 8: the max relative logits error,
max |got - ref| / max |ref| over the batch, must stay <= the tolerance.

ONNX and onnxruntime are optional dependencies (extra `export`): they are
imported where an ONNX file is built or run, so the jax.export artefact
needs neither.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax import export

from qcs_jax.apps.recognizer import class_names_of
from qcs_jax.data import synthetic, transforms
from qcs_jax.model_files.model_dir import load_checkpoint
from qcs_jax.models import build_model

JAX_FILE, ONNX_FILE, META_FILE = "model.jax_export", "model.onnx", "export.json"
FORMATS = ("jax", "onnx")
TOLERANCE = 1e-4
VERIFY_BATCHES = (1, 8)


class ExportError(RuntimeError):
  """An export that could not be written or failed its parity check."""


def preprocessing(img_size: int) -> dict[str, Any]:
  """How a user in any language turns a face photo into the model input."""
  return {
      "input": "images", "output": "logits",
      "input_shape": ["batch", img_size, img_size, 3], "dtype": "float32",
      "layout": "NHWC (batch, height, width, channel)", "channel_order": "RGB",
      "face_crop": ("square crop around the detected face box, 0.25 x its side added on "
                    "each side, outside the photo filled with black (qcs_jax.apps.faces)"),
      "resize": f"{img_size}x{img_size}, bilinear with antialiasing (PIL Image.BILINEAR)",
      "scale": "pixel / 255",
      "mean": [round(float(v), 6) for v in transforms.IMAGENET_MEAN],
      "std": [round(float(v), 6) for v in transforms.IMAGENET_STD],
      "normalise": "(pixel / 255 - mean[c]) / std[c]",
      "probabilities": "softmax(logits) over the last axis",
  }


def metadata(loaded: Any) -> dict[str, Any]:
  cfg = dict(loaded.model_cfg)
  return {"format": "qcs_jax.export/1", "model": "QCS inference path (IR50 -> neck -> VIT_base)",
          "class_names": class_names_of(loaded), "preprocessing": preprocessing(
              int(cfg["img_size"])),
          "model_config": json.loads(json.dumps(cfg))}


def float32_model(loaded: Any) -> Any:
  """`loaded` with float32 compute: the artefacts are float32 whatever the training dtype."""
  if loaded.model_cfg.get("dtype", "float32") == "float32":
    return loaded
  cfg = dict(loaded.model_cfg, dtype="float32")
  model = build_model(cfg)
  return dataclasses.replace(loaded, module=model, model_cfg=cfg, _infer=jax.jit(
      lambda v, x: model.apply(v, x, method="infer")))


def sample_faces(img_size: int, n: int, seed: int = 0) -> np.ndarray:
  """n synthetic faces (all expressions) through the eval transform: (n, S, S, 3) float32."""
  tf = transforms.build_transform(None, img_size, train=False)
  out = np.zeros((n, img_size, img_size, 3), np.float32)
  for i in range(n):
    tf(synthetic.render_face(i % len(synthetic.CLASS_NAMES), 96, seed=seed + i), None,
       out=out[i])
  return out


def relative_error(got: Any, ref: Any) -> float:
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  if got.shape != ref.shape:
    raise ExportError(f"logits of shape {got.shape}, expected {ref.shape}")
  return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-12))


# ------------------------------------------------------------------ writers and runners


def export_jax(loaded: Any) -> bytes:
  """Serialized jax.export of images -> logits, weights embedded, symbolic batch `b`."""
  size = int(loaded.model_cfg["img_size"])
  model, variables = loaded.model, loaded.variables
  fn = jax.jit(lambda x: model.apply(variables, x, method="infer"))
  (b,) = export.symbolic_shape("b")
  exp = export.export(fn, platforms=("cpu", "cuda"))(
      jax.ShapeDtypeStruct((b, size, size, 3), np.float32))
  return bytes(exp.serialize())


def load_jax_runner(path: str | os.PathLike) -> Callable[[np.ndarray], np.ndarray]:
  """The file written by export_jax as a function, without the model code."""
  exp = export.deserialize(bytearray(pathlib.Path(path).read_bytes()))
  return lambda x: np.asarray(exp.call(np.asarray(x, np.float32)))


def export_onnx(loaded: Any, meta: Mapping[str, Any]) -> bytes:
  from qcs_jax.export import onnx_graph  # pylint: disable=import-outside-toplevel
  props = {"qcs_jax.export": json.dumps(meta)}
  for k, v in meta["preprocessing"].items():
    props[f"preprocessing.{k}"] = v if isinstance(v, str) else json.dumps(v)
  props["class_names"] = json.dumps(meta["class_names"])
  variables = {k: loaded.variables[k] for k in ("params", "batch_stats")}
  return onnx_graph.build_onnx(variables, loaded.model_cfg, props).SerializeToString()


def load_onnx_runner(path: str | os.PathLike, threads: int = 0
                     ) -> Callable[[np.ndarray], np.ndarray]:
  """onnxruntime (CPU) session of the ONNX file as a function."""
  import onnxruntime as ort  # pylint: disable=import-outside-toplevel
  opts = ort.SessionOptions()
  if threads:
    opts.intra_op_num_threads = threads
  sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
  return lambda x: sess.run(["logits"], {"images": np.asarray(x, np.float32)})[0]


# ------------------------------------------------------------------ checks


def verify(run: Callable[[np.ndarray], np.ndarray], loaded: Any,
           batches: Sequence[int] = VERIFY_BATCHES, tolerance: float = TOLERANCE,
           what: str = "export") -> dict[int, float]:
  """{batch: max relative logits error} of `run` against the JAX model; ExportError above tol."""
  size = int(loaded.model_cfg["img_size"])
  faces = sample_faces(size, max(batches))
  errors = {}
  for bs in batches:
    x = faces[:bs]
    errors[bs] = relative_error(run(x), loaded.logits(x))
  bad = {b: e for b, e in errors.items() if not e <= tolerance}
  if bad:
    raise ExportError(f"{what}: max relative logits error "
                      + ", ".join(f"{e:.2e} at batch {b}" for b, e in bad.items())
                      + f" is above the tolerance {tolerance:g}")
  return errors


def export_checkpoint(checkpoint: str, out_dir: str, formats: Sequence[str] = FORMATS,
                      tolerance: float = TOLERANCE, force: bool = False,
                      log: Callable[[str], None] = print) -> dict[str, Any]:
  """Writes the requested artefacts of `checkpoint` into out_dir, verified; returns export.json.

  A failed parity check removes the artefact it wrote, nothing else in out_dir
  is touched, and existing artefacts are kept unless `force`.
  """
  unknown = sorted(set(formats) - set(FORMATS))
  if unknown or not formats:
    raise ExportError(f"formats must be some of {FORMATS}, got {list(formats)}")
  out = pathlib.Path(out_dir)
  targets = {"jax": out / JAX_FILE, "onnx": out / ONNX_FILE}
  existing = [str(targets[f]) for f in formats if targets[f].exists()]
  if existing and not force:
    raise ExportError(f"{', '.join(existing)} already exist(s); pass --force to overwrite")
  loaded = float32_model(load_checkpoint(checkpoint))
  meta = metadata(loaded)
  meta.update(checkpoint=os.path.abspath(checkpoint), tolerance=tolerance,
              relative_error="max |export - jax| / max |jax| over the logits of the batch",
              artefacts={})
  out.mkdir(parents=True, exist_ok=True)
  for fmt in formats:
    t0 = time.perf_counter()
    data = export_jax(loaded) if fmt == "jax" else export_onnx(loaded, meta)
    seconds = time.perf_counter() - t0
    tmp = targets[fmt].with_name(targets[fmt].name + ".tmp")
    tmp.write_bytes(data)
    try:
      runner = load_jax_runner(tmp) if fmt == "jax" else load_onnx_runner(tmp)
      errors = verify(runner, loaded, tolerance=tolerance, what=f"{fmt} export")
    except BaseException:
      tmp.unlink(missing_ok=True)
      raise
    tmp.replace(targets[fmt])
    meta["artefacts"][fmt] = {"file": targets[fmt].name, "bytes": len(data),
                              "export_seconds": round(seconds, 2),
                              "max_relative_error": {str(b): e for b, e in errors.items()}}
    log(f"{fmt}: wrote {targets[fmt]} ({len(data) / 1e6:.1f} MB, {seconds:.1f} s); max "
        "relative logits error vs JAX " + ", ".join(f"{e:.2e} at batch {b}"
                                                  for b, e in errors.items())
        + f" (tolerance {tolerance:g})")
  meta_path = out / META_FILE
  old = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
  if old.get("checkpoint") == meta["checkpoint"]:  # keep the other format's record
    meta["artefacts"] = {**old.get("artefacts", {}), **meta["artefacts"]}
  meta_path.write_text(json.dumps(meta, indent=2) + "\n")
  log(f"wrote {meta_path} (preprocessing, class names, parity)")
  return meta


def time_runners(runners: Mapping[str, Callable[[np.ndarray], Any]], img_size: int,
                 batch_sizes: Sequence[int] = (1, 16), rounds: int = 3,
                 min_seconds: float = 1.0) -> dict[str, dict[int, dict[str, float]]]:
  """{runner: {batch: images_per_s, cpu_s_per_image}}, rounds interleaved (A, B, A, B, ...).

  Best round of each. CPU seconds (all threads of this process) per image tell
  a slow runner from a busy machine: wall-clock rates drop with the load, CPU
  time much less.
  """
  best: dict[str, dict[int, dict[str, float]]] = {k: {} for k in runners}
  for bs in batch_sizes:
    x = np.random.default_rng(0).standard_normal((bs, img_size, img_size, 3)).astype(np.float32)
    for run in runners.values():
      np.asarray(run(x))  # compile / warm up
    for _ in range(rounds):
      for name, run in runners.items():
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while n < 2 or time.perf_counter() - t0 < min_seconds:
          np.asarray(run(x))
          n += 1
        rate = n * bs / (time.perf_counter() - t0)
        cpu = (time.process_time() - c0) / (n * bs)
        old = best[name].get(bs, {"images_per_s": 0.0, "cpu_s_per_image": float("inf")})
        best[name][bs] = {"images_per_s": max(old["images_per_s"], rate),
                          "cpu_s_per_image": min(old["cpu_s_per_image"], cpu)}
  return best
