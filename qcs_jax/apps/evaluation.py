"""Evaluates a checkpoint on a data split: accuracy, per-class metrics, confusion matrix.

The library half of `qcs-evaluate` (qcs_jax/cli/evaluate.py). The checkpoint
is a checkpoint directory (converted or exported: it holds
model.json) or a training workdir (its best/ checkpoint is used). The model is
built from the checkpoint's own model config; --config supplies the data set
(and is read from the workdir's config.json when omitted). Only the inference
path runs, jitted and sharded over the batch on every local device.
"""
from __future__ import annotations

import csv
import json
import os
import sys
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from qcs_jax.data import pipeline, sources
from qcs_jax.model_files import model_dir
from qcs_jax.model_files.locate import resolve_checkpoint, workdir_config
from qcs_jax.training import metrics as metrics_lib, plots
from qcs_jax.training import state as train_state, step as train_step

# config.model fields that do not change the weights or the logits' meaning.
_SHOW_BAD = 20  # bad images listed in the report
_RUNTIME_FIELDS = ("dtype", "base_drop", "cross_drop", "base_proj_drop", "cross_proj_drop")


def config_differences(cfg_model: Any, ckpt_model: dict) -> list[str]:
  """config.model fields that disagree with the checkpoint's architecture."""
  cfg_model = cfg_model.to_dict() if hasattr(cfg_model, "to_dict") else dict(cfg_model or {})
  out = []
  for key, val in sorted(ckpt_model.items()):
    if key in _RUNTIME_FIELDS or key not in cfg_model:
      continue
    mine = cfg_model[key]
    if isinstance(mine, (list, tuple)) or isinstance(val, (list, tuple)):
      same = list(mine) == list(val)
    else:
      same = mine == val
    if not same:
      out.append(f"config.model.{key}={mine!r} but the checkpoint has {val!r}")
  return out


def softmax(logits: np.ndarray) -> np.ndarray:
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def make_tta_step(model, mesh):
  """jit(v, images) -> log of the mean softmax of the images and their mirror images.

  Returned as "logits" so that argmax and softmax downstream give the TTA
  prediction and probabilities (softmax(log p) = p when p sums to 1).
  """
  rep = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P("data"))

  def step(v, x):
    p = jax.nn.softmax(model.apply(v, x, method="infer").astype(jnp.float32), -1)
    p_flip = jax.nn.softmax(model.apply(v, x[:, :, ::-1, :], method="infer")
                            .astype(jnp.float32), -1)
    return jnp.log(jnp.maximum(0.5 * (p + p_flip), jnp.finfo(jnp.float32).tiny))

  return jax.jit(step, in_shardings=(rep, data), out_shardings=data)


def _with_progress(batches, total: int, enabled: bool, desc: str) -> Iterator[dict]:
  """Yields the batches and advances a tqdm bar (images, with the rate) after each."""
  with tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True,
            file=sys.stderr) as bar:
    for b in batches:
      yield b
      bar.update(int(np.sum(np.asarray(b["index"]) >= 0)))


def write_predictions_csv(path: str, source: Any, index: np.ndarray, labels: np.ndarray,
                          preds: np.ndarray, probs: np.ndarray,
                          class_names: tuple[str, ...]) -> str:
  """One row per image: index, source, label(_name), prediction(_name), prob_<class>..."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["index", "source", "label", "label_name", "prediction", "prediction_name"]
               + [f"prob_{n}" for n in class_names])
    for i, y, p, pr in zip(index.tolist(), labels.tolist(), preds.tolist(), probs):
      w.writerow([i, source.describe(i), y, class_names[y], p, class_names[p]]
                 + [f"{v:.6f}" for v in pr])
  return path


def evaluate_checkpoint(cfg: ml_collections.ConfigDict | None, checkpoint: str,
                        split: str | None = None, tta_flip: bool = False,
                        output: str | None = None, predictions_csv: str | None = None,
                        batch_size: int | None = None, progress: bool = True,
                        source: Any = None,
                        on_warning: Callable[[str], None] | None = None) -> dict:
  """Evaluates `checkpoint` on `split` of cfg.data; returns metrics and per-image arrays.

  Args:
    cfg: the run config (its data section is used); None reads the training
      workdir's config.json.
    checkpoint: a checkpoint directory or a training workdir (-> best/).
    split: data split, default cfg.data.test_split.
    tta_flip: average the softmax of each image and its mirror image.
    output: folder for confusion.png, confusion.json and metrics.json (None: none).
    predictions_csv: path of a per-image CSV (None: none).
    batch_size: global eval batch (default cfg.data.eval_batch_size), rounded up
      to a multiple of the device count.
    progress: show a tqdm bar.
    source: an already opened FERSource to use instead of opening `split`.
    on_warning: called with each warning as soon as it is known (they are
      also returned under 'warnings').

  Returns:
    metrics.summarize(...) fields plus confusion_matrix, class_names, split,
    checkpoint, tta_flip, images_per_sec, num_skipped, bad_images (one line per
    skipped file), warnings, and numpy arrays
    index, labels, preds, probs (not JSON-written).
  """
  ckpt_dir = resolve_checkpoint(checkpoint)
  if cfg is None:
    cfg = workdir_config(ckpt_dir)
    if cfg is None:
      raise ValueError(f"no --config given and no config.json beside {ckpt_dir}: pass the "
                       f"recipe that names the data set (e.g. --config configs/rafdb.py)")
  loaded = model_dir.load_model(ckpt_dir)
  mcfg = loaded.model_cfg
  warnings = config_differences(cfg.get("model", {}), mcfg)
  split = split or cfg.data.get("test_split", "test")
  src = source if source is not None else sources.open_split(cfg.data, split)
  num_classes = int(mcfg.get("num_classes", 7))
  if src.num_classes != num_classes:
    raise ValueError(f"{src.name} has {src.num_classes} classes {list(src.class_names)} but "
                     f"the checkpoint {ckpt_dir} predicts {num_classes} "
                     f"(model.num_classes): wrong data set or wrong checkpoint?")
  class_names = tuple(src.class_names)
  if loaded.class_names and tuple(loaded.class_names) != class_names:
    warnings.append(f"the checkpoint's class names {list(loaded.class_names)} differ from "
                    f"{src.name}'s {list(class_names)}; labels are compared by index")
  for w in warnings if on_warning else ():
    on_warning(w)

  mesh = train_state.make_mesh()
  ndev = mesh.devices.size
  bs = int(batch_size or cfg.data.get("eval_batch_size", 64))
  bs = -(-bs // ndev) * ndev
  img_size = int(mcfg.get("img_size", 224))
  variables = jax.device_put(loaded.variables, NamedSharding(mesh, P()))
  step = (make_tta_step(loaded.model, mesh) if tta_flip
          else train_step.make_eval_step(loaded.model, mesh))
  try:
    # Host preprocessing (resize, centre crop, normalise) whatever data.augment_on says:
    # an evaluation reads each image once; the image cache serves training.
    data_cfg = dict(cfg.data.to_dict() if hasattr(cfg.data, "to_dict") else cfg.data,
                    augment_on="host")
    batches = pipeline.eval_batches(src, data_cfg, img_size, bs)
  except ValueError as e:
    raise ValueError(f"config.data.augment does not fit the checkpoint's img_size "
                     f"{img_size}: {e}") from e
  t0 = time.perf_counter()
  try:
    labels, preds, index, logits = train_step.evaluate(
        step, variables, _with_progress(batches, len(src), progress, f"eval {src.name}"),
        num_classes, mesh)
  finally:
    if hasattr(batches, "close"):
      batches.close()
  seconds = time.perf_counter() - t0
  probs = softmax(logits)
  cm = metrics_lib.confusion_matrix(labels, preds, num_classes)
  result = metrics_lib.summarize(cm, class_names)
  result.update(
      confusion_matrix=cm.tolist(), class_names=list(class_names), split=split,
      data=src.name, checkpoint=os.path.abspath(ckpt_dir), tta_flip=bool(tta_flip),
      seconds=seconds, images_per_sec=len(labels) / seconds if seconds > 0 else 0.0,
      num_skipped=int(getattr(batches, "num_skipped", 0)), warnings=warnings,
      bad_images=[r for _, r in sorted(getattr(batches, "bad_reasons", {}).items())])
  if output:
    os.makedirs(output, exist_ok=True)
    tag = " (flip TTA)" if tta_flip else ""
    plots.plot_confusion(cm, class_names, os.path.join(output, "confusion.png"),
                         f"{src.name}: {100 * result['accuracy']:.2f}%{tag}")
    with open(os.path.join(output, "confusion.json"), "w") as f:
      json.dump({"class_names": list(class_names), "matrix": cm.tolist()}, f, indent=1)
    with open(os.path.join(output, "metrics.json"), "w") as f:
      json.dump(result, f, indent=1)
  if predictions_csv:
    write_predictions_csv(predictions_csv, src, index, labels, preds, probs, class_names)
    result["predictions_csv"] = predictions_csv
  result.update(index=index, labels=labels, preds=preds, probs=probs)
  return result


def format_report(result: dict) -> str:
  """A human-readable table of the headline numbers and the per-class metrics."""
  lines = [f"{result['data']} ({result['num_images']} images"
           + (", flip TTA" if result["tta_flip"] else "") + f") with {result['checkpoint']}",
           f"accuracy            {100 * result['accuracy']:6.2f}%",
           f"mean class accuracy {100 * result['mean_class_accuracy']:6.2f}%",
           f"macro F1            {100 * result['macro_f1']:6.2f}%",
           f"{'class':<14}{'precision':>10}{'recall':>10}{'F1':>10}{'support':>9}"]
  for name, m in result["per_class"].items():
    lines.append(f"{name:<14}{100 * m['precision']:9.2f}%{100 * m['recall']:9.2f}%"
                 f"{100 * m['f1']:9.2f}%{m['support']:9d}")
  lines.append(f"{result['images_per_sec']:.1f} images/s (including compilation)")
  if result.get("num_skipped"):
    lines.append(f"{result['num_skipped']} bad images skipped (data.on_bad_image='skip'), "
                 "not counted in the metrics:")
    bad = result.get("bad_images") or []
    lines += [f"  {r}" for r in bad[:_SHOW_BAD]]
    if len(bad) > _SHOW_BAD:
      lines.append(f"  ... and {len(bad) - _SHOW_BAD} more")
  return "\n".join(lines)
