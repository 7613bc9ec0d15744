"""Config mistakes: one `error:` line naming the key, exit 2, nothing written."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qcs_jax import recipes
from qcs_jax.model_files import model_dir as checkpoint
from qcs_jax.recipes import checks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_checkpoint(d) -> str:
  """A directory read_metadata accepts (the check reads only model.json)."""
  d.mkdir()
  (d / "variables").mkdir()
  (d / "model.json").write_text(json.dumps({"format": checkpoint.FORMAT, "model": {}}))
  return str(d)


def test_valid_configs_pass(tmp_path):
  cfg = recipes.synthetic()
  checks.check_config(cfg, device_count=8)  # batch 32 on 8 devices
  checks.check_config(recipes.recipe("qcs", "rafdb"), device_count=1)
  cfg.init.backbone = _fake_checkpoint(tmp_path / "ir50")
  checks.check_config(cfg, device_count=1)
  cfg.init.backbone = "scratch"  # a random IR50 on purpose
  checks.check_config(cfg, device_count=1)


@pytest.mark.parametrize("key,value,said", [
    ("data.batch_size", 3, r"data.batch_size=3 is not a multiple of the 8 devices.*=8"),
    ("data.batch_size", 0, r"data.batch_size=0 must be > 0"),
    ("data.on_bad_image", "ignore", r"data.on_bad_image='ignore' is not one of 'error', 'skip'"),
    ("data.name", "raf", r"data.name='raf' is not one of"),
    ("model.name", "qqs", r"model.name='qqs'"),
    ("data.epoch_fraction", 1.5, r"data.epoch_fraction=1.5 must be in \(0, 1\]"),
    ("optim.lr", -1e-3, r"optim.lr=-0.001 must be > 0"),
    ("data.workers", -1, r"data.workers=-1 must be >= 0"),
    ("init.backbone", "/no/such/ir50", r"config.init.backbone=/no/such/ir50: no such file"),
    ("init.checkpoint", __file__, r"init.checkpoint=.* is a file; it must be a checkpoint "
                                  r"directory"),
    ("init.checkpoint", REPO, r"init.checkpoint=.*not a qcs_jax checkpoint \(no model.json\)"),
])
def test_each_mistake_names_its_key(key, value, said):
  cfg = recipes.synthetic()
  section, field = key.split(".")
  cfg[section][field] = value
  with pytest.raises(checks.ConfigError, match=said) as e:
    checks.check_config(cfg, device_count=8)
  assert "\n" not in str(e.value)


def test_all_problems_are_reported_together():
  cfg = recipes.synthetic()
  cfg.data.batch_size = 3
  cfg.init.backbone = "/nope"
  with pytest.raises(checks.ConfigError, match=r"config.init.backbone=/nope.*; data.batch_size=3"):
    checks.check_config(cfg, device_count=2)
  checks.check_config(recipes.synthetic(), device_count=None)  # multi-host: checked later


def _run(module: str, *args: str, devices: int = 1) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("override,said,devices", [
    ("--config.data.batchsize=3",
     "unknown config key 'data.batchsize' (in --config.data.batchsize=3); did you mean "
     "'batch_size'?", 1),
    ("--config.data.batch_size=abc", "--config.data.batch_size=abc: invalid literal", 1),
    ("--config.data.batch_size=3", "data.batch_size=3 is not a multiple of the 2 devices", 2),
    ("--config.init.backbone=/no/ir50", "config.init.backbone=/no/ir50: no such file or directory",
     1),
])
def test_train_cli_refuses_before_writing(tmp_path, override, said, devices):
  workdir = tmp_path / "run"
  p = _run("qcs_jax.train", "--config", "configs/synthetic.py", "--workdir", str(workdir),
           override, devices=devices)
  assert p.returncode == 2, p.stderr[-2000:]
  assert "Traceback" not in p.stderr
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and said in last, p.stderr[-2000:]
  assert not workdir.exists()


def test_train_cli_missing_config_file(tmp_path):
  p = _run("qcs_jax.train", "--config", str(tmp_path / "nope.py"), "--workdir",
           str(tmp_path / "run"))
  assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
  assert p.stderr.strip().splitlines()[-1] == (
      f"error: cannot load --config: [Errno 2] No such file or directory: "
      f"'{tmp_path / 'nope.py'}'")
  assert not (tmp_path / "run").exists()


def test_train_cli_config_file_with_a_syntax_error(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config(:\n  pass\n")
  p = _run("qcs_jax.train", "--config", str(bad), "--workdir", str(tmp_path / "run"))
  assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "SyntaxError" in last and "bad.py" in last, last
  assert not (tmp_path / "run").exists()


def test_evaluate_cli_names_unknown_override(tmp_path):
  p = _run("qcs_jax.cli.evaluate", "--config", "configs/synthetic.py", "--checkpoint",
           str(tmp_path), "--config.data.on_bad_imag=skip")
  assert p.returncode == 2 and "Traceback" not in p.stderr
  assert p.stderr.strip().splitlines()[-1] == (
      "error: unknown config key 'data.on_bad_imag' (in --config.data.on_bad_imag=skip); "
      "did you mean 'on_bad_image'?")
