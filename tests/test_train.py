"""Training: sharded step (8 devices == 1 device), end-to-end runs in a temp workdir,
exact resume after a kill, config-change refusal, NaN stop, init from converted weights."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import TINY_MODEL, tree_rel_err
from qcs_jax import recipes as config_lib
from qcs_jax.apps import evaluation as evaluate
from qcs_jax.model_files import model_dir as ckpt_io
from qcs_jax.training import checkpoints, loop, optim, state as train_state, step as train_step
from qcs_jax.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(model="qcs"):
  c = config_lib.synthetic(model)
  c.model.update(TINY_MODEL, stage_channels=(8, 16, 16))
  c.data.update(batch_size=8, eval_batch_size=32, workers=0)
  c.data.synthetic.update(num_train=72, num_test=24, image_size=64)
  c.train.update(epochs=2, log_every=1, checkpoint_every=2, progress=False)
  c.optim.update(warmup_steps=0, gamma=0.9)  # the released schedule (warm-up: test_optim)
  return c


def test_step_on_8_devices_equals_1_device(x64):
  """float64: in float32 Adam's first step amplifies rounding (docs/ARCHITECTURE.md section 9)."""
  assert jax.device_count() == 8
  cfg = tiny_config("qcs")
  m = build_model(cfg.model)
  tx = optim.make_optimizer(cfg.optim, steps_per_epoch=10)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(8, 4, 64, 64, 3))
  labels = rng.integers(0, 7, size=(8, 4)).astype(np.int32)
  variables = jax.tree.map(lambda x: np.asarray(x, np.float64), train_state.init_variables(
      m, cfg, jax.random.PRNGKey(0)))
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = train_state.make_mesh(devices)
    state = train_state.create_state(variables, tx, jax.random.PRNGKey(1), mesh)
    step = train_step.make_train_step(m, tx, mesh)
    state, metrics = step(state, train_step.shard_batch(images, mesh),
                          train_step.shard_batch(labels, mesh))
    results.append(jax.device_get((state.params, state.batch_stats, metrics["loss"])))
  (p1, s1, l1), (p8, s8, l8) = results
  assert jax.tree.leaves(p8)[0].dtype == np.float64
  assert tree_rel_err(p8, p1) <= 1e-10
  assert tree_rel_err(s8, s1) <= 1e-10
  assert abs(float(l8) - float(l1)) <= 1e-10 * abs(float(l1))
  # The step moved the weights (so the comparison means something).
  assert tree_rel_err(p1, jax.device_get(variables["params"])) > 1e-4


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  """One uninterrupted 2-epoch run of the tiny QCS: the reference for the resume tests."""
  workdir = str(tmp_path_factory.mktemp("full") / "run")
  best = loop.train_and_evaluate(tiny_config(), workdir)
  return workdir, best


def test_train_end_to_end_writes_outputs(full_run):
  workdir, best = full_run
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  evals = [r for r in rows if r["kind"] == "eval"]
  # best/ is the first epoch with the highest test accuracy, as logged.
  accs = [r["accuracy"] for r in evals]
  assert best["best_epoch"] == 1 + accs.index(max(accs))
  assert best["best_accuracy"] == max(accs)
  train = [r for r in rows if r["kind"] == "train"]
  assert [r["step"] for r in train] == list(range(1, 19))  # 72 // 8 = 9 steps per epoch
  assert [r["epoch"] for r in rows if r["kind"] == "eval"] == [1, 2]
  assert all(np.isfinite(r["loss"]) and r["lr"] > 0 for r in train)
  np.testing.assert_allclose(train[-1]["lr"], train[0]["lr"] * 0.9, rtol=1e-6)  # gamma, epoch 2
  for f in ("best_confusion.png", "curves.png", "best_confusion.json", "config.json"):
    assert os.path.getsize(os.path.join(workdir, f)) > 0, f
  assert os.listdir(os.path.join(workdir, "tb"))
  cm = np.asarray(json.load(open(os.path.join(workdir, "best_confusion.json")))["matrix"])
  assert cm.sum() == 24 and np.trace(cm) == round(24 * best["best_accuracy"])
  # The saved best model, re-evaluated by qcs_jax.evaluate, gives the same matrix.
  again = evaluate.evaluate_checkpoint(tiny_config(), workdir, progress=False)
  np.testing.assert_array_equal(np.asarray(again["confusion_matrix"]), cm)
  assert again["accuracy"] == best["best_accuracy"]
  # Its logits are the model's on the checkpoint's variables; best/ holds the last epoch's
  # state (the latest orbax checkpoint) exactly when the best epoch is the last one.
  loaded = ckpt_io.load_model(os.path.join(workdir, "best"))
  x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  logits = np.asarray(loaded.logits(x))
  want = build_model(tiny_config().model).apply(loaded.variables, x, method="infer")
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(again["preds"], np.argmax(again["probs"], -1))
  last = checkpoints.latest_variables(workdir)
  assert (tree_rel_err(loaded.variables, last) == 0.0) == (best["best_epoch"] == 2), best


def _assert_same_variables(workdir_a, workdir_b):
  a, b = checkpoints.latest_variables(workdir_a), checkpoints.latest_variables(workdir_b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def _checkpoint_steps(workdir):
  ck = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(ck) if d.isdigit()) if os.path.isdir(ck) else []


def _assert_restored(out: str, workdir: str, step: int) -> None:
  """The rerun restored `step` (it says so), and set no checkpoint aside: deterministic
  training started over would reproduce the same weights and rows, so equality alone
  proves nothing."""
  assert f"(global step {step})" in out and "resuming" in out, out[-2000:]
  assert not os.path.exists(os.path.join(workdir, "unreadable_checkpoints"))
  assert "unreadable" not in out


def test_resume_after_stop_is_exact(full_run, tmp_path, capsys):
  part = str(tmp_path / "part")
  stopped = tiny_config()
  stopped.train.stop_after_steps = 13  # mid epoch 2 (9 steps per epoch), after a save at 12
  loop.train_and_evaluate(stopped, part)
  assert _checkpoint_steps(part)[-1] == 12
  capsys.readouterr()
  loop.train_and_evaluate(tiny_config(), part)  # the same command again resumes
  _assert_restored(capsys.readouterr().out, part, 12)
  _assert_same_variables(full_run[0], part)
  rows = [json.loads(l) for l in open(os.path.join(part, "metrics.jsonl"))]
  steps = [r["step"] for r in rows if r["kind"] == "train"]
  assert steps == list(range(1, 19))  # no duplicated or missing rows after the resume


def test_resume_after_sigkill_is_exact(full_run, tmp_path):
  """A real kill (SIGKILL) of `python -m qcs_jax.train` after a few steps, then a rerun."""
  cfg_path = tmp_path / "tiny.py"
  cfg_path.write_text(
      "import sys\nsys.path.insert(0, %r)\nfrom test_train import tiny_config\n"
      "def get_config():\n  return tiny_config()\n" % os.path.join(ROOT, "tests"))
  env = dict(os.environ, PYTHONPATH=ROOT)  # same 8 devices: same program, same cache
  killed = str(tmp_path / "killed")
  cmd = [sys.executable, "-m", "qcs_jax.train", f"--config={cfg_path}", f"--workdir={killed}"]
  proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  metrics = os.path.join(killed, "metrics.jsonl")
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 5:
      break
    time.sleep(0.02)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  steps = _checkpoint_steps(killed)
  assert steps and steps[-1] >= 2, steps  # 5 rows logged: a checkpoint every 2 steps
  rerun = subprocess.run(cmd, env=env, check=True, cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
  _assert_restored(rerun.stdout + rerun.stderr, killed, steps[-1])
  _assert_same_variables(full_run[0], killed)


def test_changed_config_is_refused(tmp_path):
  cfg = tiny_config()
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  checkpoints.check_config(workdir, cfg)
  other = tiny_config()
  other.optim.lr = 0.5
  with pytest.raises(ValueError, match="optim.lr"):
    checkpoints.check_config(workdir, other)
  other.train.allow_config_change = True
  checkpoints.check_config(workdir, other)  # asked for: accepted
  more = tiny_config()
  more.train.epochs = 50  # extending a run is not a config change
  checkpoints.check_config(workdir, more)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  cfg = tiny_config("baseline")
  cfg.optim.lr = float("nan")
  cfg.optim.sam = False
  cfg.train.checkpoint_every = 1
  workdir = str(tmp_path / "run")
  with pytest.raises(FloatingPointError, match="step 1"):
    loop.train_and_evaluate(cfg, workdir)
  assert not os.path.exists(os.path.join(workdir, "checkpoints", "1"))


def test_init_from_converted_backbone_and_mismatch(tmp_path):
  cfg = tiny_config()
  m = build_model(cfg.model)
  src = train_state.init_variables(m, cfg, jax.random.PRNGKey(5))
  backbone = {c: {"ir_back": src[c]["ir_back"]} for c in ("params", "batch_stats")}
  ckpt_io.save_variables(str(tmp_path / "ir50"), jax.device_get(backbone), cfg.model.to_dict())
  cfg.init.backbone = str(tmp_path / "ir50")
  fresh = train_state.init_variables(m, cfg, jax.random.PRNGKey(6))
  got = train_state.apply_init(fresh, cfg.init)
  for x, y in zip(jax.tree.leaves(got["params"]["ir_back"]),
                  jax.tree.leaves(src["params"]["ir_back"])):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(got["params"]["VIT_base"]["cls_token"],
                                fresh["params"]["VIT_base"]["cls_token"])
  wide = tiny_config()
  wide.model.stage_channels = (8, 16, 32)
  with pytest.raises(ValueError, match="does not fit the configured model"):
    train_state.apply_init(train_state.init_variables(build_model(wide.model), wide,
                                                  jax.random.PRNGKey(0)), cfg.init)
