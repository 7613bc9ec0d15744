"""Faults in the training loop: kills at random moments (fault-injection script, small N),
the eval row of a resumed epoch, torn metrics lines, an unreadable latest checkpoint,
a full disk while saving."""
import errno
import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from qcs_jax.training import checkpoints, faults, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "tiny_train_config.py")
sys.path.insert(0, os.path.join(ROOT, "tests"))
import tiny_train_config  # noqa: E402  pylint: disable=wrong-import-position


def _rows(path):
  return [json.loads(l) for l in open(path)]


def test_truncate_keeps_the_eval_row_of_the_epoch_a_checkpoint_follows(tmp_path, caplog):
  """The bug of issue 19: meta epoch 1 (saved after epoch 1's evaluation) dropped that row."""
  path = str(tmp_path / "metrics.jsonl")
  rows = ([{"kind": "train", "step": s, "epoch": (s - 1) // 3} for s in (1, 2, 3)]
          + [{"kind": "eval", "step": 3, "epoch": 1}]
          + [{"kind": "train", "step": s, "epoch": 1} for s in (4, 5)])
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
    f.write('{"kind": "train", "st')  # a write cut short by a kill
  with caplog.at_level(logging.WARNING, logger=checkpoints.log.name):
    checkpoints.truncate_metrics(path, global_step=3, epoch=1)
  assert _rows(path) == rows[:4]
  assert [r.getMessage() for r in caplog.records] == [
      f"{path}: dropping a torn last line (a write was interrupted)"]
  checkpoints.truncate_metrics(path, global_step=2, epoch=0)  # mid epoch 1: its eval redone
  assert _rows(path) == rows[:2]


def test_truncate_refuses_a_broken_line_in_the_middle(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"kind": "train", "step": 1, "epoch": 0}\nnot json\n'
                  '{"kind": "train", "step": 2, "epoch": 0}\n')
  with pytest.raises(ValueError, match="metrics.jsonl line 2"):
    checkpoints.truncate_metrics(str(path), 2, 0)
  assert "not json" in path.read_text()  # nothing lost


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ref") / "run")
  loop.train_and_evaluate(tiny_train_config.get_config(), workdir)
  return workdir


def _stopped(after):
  cfg = tiny_train_config.get_config()
  cfg.train.stop_after_steps = after
  return cfg


def test_unreadable_latest_checkpoint_falls_back_and_is_kept(reference, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(_stopped(4), workdir)  # checkpoints at steps 2 and 4
  ck4 = os.path.join(workdir, "checkpoints", "4")
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(ck4, "state")) for f in fs]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:  # a half-written file
    f.truncate(os.path.getsize(biggest) // 2)
  loop.train_and_evaluate(tiny_train_config.get_config(), workdir)
  out = capsys.readouterr().out
  assert "checkpoint step 4 is unreadable" in out and "resuming from step 2" in out
  aside = os.listdir(os.path.join(workdir, "unreadable_checkpoints"))
  assert len(aside) == 1 and aside[0].startswith("4.")  # kept, not deleted
  got = faults.compare(reference, workdir)
  assert got["weights_exact"] and got["best_exact"] and got["rows_equal"] == got["rows"], got


def _fill(path):
  """Writes zeros to path until the file system is full.

  Unbuffered on purpose: a buffered file keeps the bytes a short write left behind
  and raises ENOSPC again when it is closed (that failed CI once)."""
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
  block = b"\0" * (1 << 16)
  try:
    while True:
      os.write(fd, block)  # a short write is fine: the next one raises ENOSPC
  except OSError as e:
    assert e.errno == errno.ENOSPC, e
  finally:
    os.close(fd)


def _tmpfs(where, size="64m"):
  os.makedirs(where)
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", where],
                        capture_output=True, check=False)
  return done.returncode == 0


def test_full_disk_while_saving_is_a_clear_error_and_resumes(reference, tmp_path, monkeypatch):
  """A real full disk (a tmpfs) where mounting one is allowed (root); otherwise the
  checkpoint write is made to fail with ENOSPC."""
  mnt = str(tmp_path / "disk")
  real = _tmpfs(mnt)
  workdir = os.path.join(mnt, "run")
  try:
    loop.train_and_evaluate(_stopped(2), workdir)
    resume = _stopped(4)
    resume.train.log_every = 100  # the next write is the checkpoint of step 4
    if real:
      _fill(os.path.join(mnt, "ballast"))
    else:
      import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

      def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
      monkeypatch.setattr(ocp.args, "StandardSave", no_space)
    with pytest.raises(OSError, match=r"no space left on the device of .*steps \[2\]"):
      loop.train_and_evaluate(resume, workdir)
    latest = checkpoints.latest_variables(workdir)  # the previous one, intact
    leaves = jax.tree.leaves(latest["params"])
    assert leaves and all(np.isfinite(np.asarray(x)).all() for x in leaves)
    if real:
      os.remove(os.path.join(mnt, "ballast"))
    else:
      monkeypatch.undo()
    loop.train_and_evaluate(tiny_train_config.get_config(), workdir)
    got = faults.compare(reference, workdir)
    assert got["weights_exact"] and got["rows_equal"] == got["rows"], got
  finally:
    if real:
      if subprocess.run(["umount", mnt], check=False).returncode:
        subprocess.run(["umount", "-l", mnt], check=False)  # still busy: detach it


def test_fault_injection_script_small_n(tmp_path):
  """The documented script with N=3 kills (one of them inside a checkpoint save)."""
  root = str(tmp_path / "faults")
  env = dict(os.environ, PYTHONPATH=ROOT)
  done = subprocess.run([sys.executable, "-m", "qcs_jax.training.faults", f"--config={CONFIG}",
                         f"--root={root}", "--kills=3", "--seed=1", "--max_delay_s=1"],
                        env=env, cwd=ROOT, capture_output=True, text=True, timeout=1500,
                        check=False)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert "3 kills, resumed 3 times: exact" in done.stdout, done.stdout[-2000:]
  assert "inside a checkpoint save" in done.stdout
