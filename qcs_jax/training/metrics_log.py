"""metrics.jsonl plus TensorBoard event files (written by process 0 only)."""
from __future__ import annotations

import json
import os

from tensorboardX import SummaryWriter


class MetricsLog:
  """metrics.jsonl plus TensorBoard event files, both in the workdir."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, row: dict) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    step = row["step"]
    for k, v in row.items():
      if isinstance(v, (int, float)) and k not in ("step", "epoch"):
        self.tb.add_scalar(f"{row['kind']}/{k}", v, step)

  def close(self) -> None:
    self.tb.close()


class NullLog:
  """MetricsLog's stand-in in processes other than 0 of a multi-process job."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")

  def write(self, row: dict) -> None:
    del row

  def close(self) -> None:
    pass
