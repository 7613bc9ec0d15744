"""The card's command as typed: `python -m qcs_jax.train --config configs/rafdb.py`.

No --workdir needed (runs/<config name>); a missing data root or a paper recipe
without the pretrained IR50 is one `error:` line, exit code 2, no traceback and
nothing written.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from qcs_jax import recipes as config
from qcs_jax.model_files import model_dir as checkpoint
from qcs_jax.cli.train import default_workdir
from qcs_jax.training import state as train_state

REPO = pathlib.Path(__file__).resolve().parents[1]


def _train(cwd, *args) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, "-m", "qcs_jax.train", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300, check=False)


def test_default_workdir():
  assert default_workdir("configs/rafdb.py") == os.path.join("runs", "rafdb")
  assert default_workdir("/x/configs/synthetic.py:dcs") == os.path.join("runs", "synthetic_dcs")


def test_card_command_without_data_root_says_what_to_set(tmp_path):
  r = _train(tmp_path, "--config", str(REPO / "configs" / "rafdb.py"))
  assert r.returncode == 2, r.stderr
  assert "workdir: runs/rafdb" in r.stdout
  assert "error: data.root is empty: set --config.data.root" in r.stderr
  assert "RAF-DB is given out by its authors" in r.stderr
  assert "Traceback" not in r.stderr + r.stdout
  assert list(tmp_path.iterdir()) == []  # nothing left behind


def _tiny_rafdb(root: pathlib.Path) -> None:
  """The official RAF-DB layout with 4 train and 1 test image per class."""
  img_dir = root / "basic" / "Image" / "aligned"
  img_dir.mkdir(parents=True)
  lines = []
  for label in range(1, 8):
    for split, n in (("train", 4), ("test", 1)):
      for i in range(n):
        name = f"{split}_{label}{i:04d}.jpg"
        Image.fromarray(np.full((100, 100, 3), 30 * label, np.uint8)).save(
            img_dir / name.replace(".jpg", "_aligned.jpg"))
        lines.append(f"{name} {label}")
  (root / "basic" / "EmoLabel").mkdir()
  (root / "basic" / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines))


def test_paper_recipe_refuses_a_random_ir50(tmp_path):
  _tiny_rafdb(tmp_path / "raf")
  work = tmp_path / "work"
  r = _train(tmp_path, "--config", str(REPO / "configs" / "rafdb.py"),
             f"--config.data.root={tmp_path / 'raf'}", f"--workdir={work}")
  assert r.returncode == 2, r.stderr
  assert "config.init.backbone is empty" in r.stderr
  assert "qcs-convert --input ir50.pth --output runs/ir50" in r.stderr
  assert "--config.init.backbone=scratch" in r.stderr
  assert "Traceback" not in r.stderr and not work.exists()


def _init_cfg(**init) -> ml_collections.ConfigDict:
  c = config.recipe("qcs", "rafdb")
  c.init.update(init)
  return c


def test_check_init():
  with pytest.raises(checkpoint.CheckpointError, match="config.init.backbone is empty"):
    train_state.check_init(_init_cfg())
  train_state.check_init(_init_cfg(backbone="scratch"))  # opted out: no error
  train_state.check_init(_init_cfg(checkpoint="runs/x"))  # a whole-model init will do
  demo = config.synthetic()
  assert not demo.init.require_backbone
  train_state.check_init(demo)  # the demo trains from scratch
