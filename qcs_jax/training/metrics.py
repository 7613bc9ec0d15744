"""Classification metrics from predictions: pure numpy, shared by training and evaluation."""
from __future__ import annotations

import numpy as np


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
  """(K, K) counts; rows are true classes, columns predicted classes."""
  labels = np.asarray(labels, np.int64)
  preds = np.asarray(preds, np.int64)
  return np.bincount(labels * num_classes + preds,
                     minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def summarize(cm: np.ndarray, class_names: tuple[str, ...] | None = None) -> dict:
  """Accuracy, mean per-class accuracy (= macro recall) and per-class precision/recall/F1."""
  cm = np.asarray(cm, np.float64)
  tp = np.diag(cm)
  support = cm.sum(1)
  predicted = cm.sum(0)
  with np.errstate(divide="ignore", invalid="ignore"):
    recall = np.where(support > 0, tp / support, 0.0)
    precision = np.where(predicted > 0, tp / predicted, 0.0)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
  total = cm.sum()
  names = class_names or tuple(str(i) for i in range(len(cm)))
  present = support > 0
  return {
      "accuracy": float(tp.sum() / total) if total else 0.0,
      "mean_class_accuracy": float(recall[present].mean()) if present.any() else 0.0,
      "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
      "num_images": int(total),
      "per_class": {n: {"precision": float(p), "recall": float(r), "f1": float(f),
                        "support": int(s)}
                    for n, p, r, f, s in zip(names, precision, recall, f1, support)},
  }
