"""PNG figures people look at: confusion matrices and training curves (matplotlib, Agg)."""
from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_confusion(cm: np.ndarray, class_names, path: str, title: str = "") -> str:
  """Row-normalised confusion matrix with counts, like the paper's figures."""
  cm = np.asarray(cm, np.float64)
  rows = cm.sum(1, keepdims=True)
  norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
  k = len(class_names)
  fig, ax = plt.subplots(figsize=(1.0 + 0.8 * k, 0.8 + 0.75 * k), dpi=110)
  ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
  for i in range(k):
    for j in range(k):
      ax.text(j, i, f"{norm[i, j]:.2f}\n({int(cm[i, j])})", ha="center", va="center",
              fontsize=7, color="white" if norm[i, j] > 0.5 else "black")
  ax.set_xticks(range(k), class_names, rotation=45, ha="right")
  ax.set_yticks(range(k), class_names)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def plot_curves(metrics_jsonl: str, path: str) -> str:
  """Training loss per logged step and test accuracy per epoch from metrics.jsonl."""
  train, test = [], []
  with open(metrics_jsonl) as f:
    for line in f:
      row = json.loads(line)
      if row.get("kind") == "train":
        train.append((row["step"], row["loss"]))
      elif row.get("kind") == "eval":
        test.append((row["epoch"], row["accuracy"]))
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
  if train:
    s, l = zip(*train)
    a.plot(s, l, lw=1)
  a.set_xlabel("step")
  a.set_ylabel("training loss")
  a.grid(alpha=0.3)
  if test:
    e, acc = zip(*test)
    b.plot(e, np.asarray(acc) * 100, marker="o")
  b.set_xlabel("epoch")
  b.set_ylabel("test accuracy (%)")
  b.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
