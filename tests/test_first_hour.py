"""The first hour of a new user, on an installed wheel, from a folder outside the checkout.

One wheel is built and installed into a fresh venv (`--no-deps`: its dependencies
are this test venv's, made visible by a .pth file; the imported qcs_jax is proved to
be the wheel's). From an empty temporary folder it then builds every recipe, runs
`qcs-convert --zoo`, every program's --help, and the README's command blocks in
order as written (those whose first line is not `# needs: ...`): the README's tour
trains the demo recipe, and its claim block runs `qcs-claim --quick`.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest

from qcs_jax.interop import reference, reference_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "pyproject.toml")) as f:  # [project.scripts]: name = "module:run"
  SCRIPTS = sorted(re.findall(r'^(qcs-[\w-]+) = "', f.read(), flags=re.M))
# A flag of each program's own, which its --help must list.
OWN_FLAG = {"qcs-train": "--workdir", "qcs-evaluate": "--checkpoint", "qcs-predict": "--no-detect",
            "qcs-convert": "--zoo", "qcs-visualize": "--detect", "qcs-export": "--formats",
            "qcs-demo": "--max_upload_mb", "qcs-claim": "--quick"}
TIMEOUT = 600


def readme_blocks() -> list[str]:
  """The README's ```bash blocks that need nothing from outside (no `# needs:` line first)."""
  with open(os.path.join(ROOT, "README.md")) as f:
    blocks = re.findall(r"^```bash\n(.*?)^```", f.read(), flags=re.S | re.M)
  return [b for b in blocks if not b.lstrip().startswith("# needs:")]


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
  """(env, folder): a fresh venv holding only the wheel, and an empty folder to run in."""
  base = tmp_path_factory.mktemp("first_hour")
  build = base / "build"
  shutil.copytree(ROOT, build, ignore=shutil.ignore_patterns(
      ".venv", "runs", ".git", "__pycache__", "*.egg-info", ".pytest_cache", "build", "dist"))
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                  "-w", str(base / "dist"), str(build)], check=True, timeout=TIMEOUT)
  wheel = next((base / "dist").glob("qcs_jax-*.whl"))
  venv = base / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                  "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                 timeout=TIMEOUT)
  site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print("
                         "sysconfig.get_paths()['purelib'])"], capture_output=True, text=True,
                        check=True).stdout.strip()
  with open(os.path.join(site, "test_venv_deps.pth"), "w") as f:
    f.write(sysconfig.get_paths()["purelib"] + "\n")  # appended after the wheel's own
  (base / "cache").mkdir()
  run_dir = base / "elsewhere"
  (run_dir / "docs").mkdir(parents=True)
  shutil.copy(os.path.join(ROOT, "docs", "synthetic_grid.jpg"), run_dir / "docs")
  # A user's environment: none of the test run's settings (conftest's 8 virtual devices,
  # its shared compilation cache) but XLA's unoptimised compiles, which only make the
  # tiny programs compile faster.
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "XLA_FLAGS")
         and not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "PYTEST"))}
  env.update(XLA_FLAGS="--xla_backend_optimization_level=0",PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", JAX_PLATFORMS="cpu",
             QCS_JAX_CACHE_DIR=str(base / "cache"))
  where = subprocess.run([str(venv / "bin" / "python"), "-c", "import qcs_jax; print(qcs_jax.__file__)"],
                         cwd=run_dir, env=env, capture_output=True, text=True, check=True)
  assert where.stdout.strip().startswith(site), where.stdout  # the wheel's, not the checkout's
  return env, run_dir, venv


def _run(cmd, env, cwd, shell=False) -> subprocess.CompletedProcess:
  p = subprocess.run(cmd, env=env, cwd=cwd, shell=shell, capture_output=True, text=True,
                     timeout=TIMEOUT, executable="/bin/bash" if shell else None)
  if p.returncode != 0 or "Traceback" in p.stderr:
    pytest.fail(f"{cmd}\nexit {p.returncode}\n--- stdout\n{p.stdout[-2000:]}\n--- stderr\n"
                f"{p.stderr[-4000:]}", pytrace=False)
  return p


def test_every_program_has_its_own_help(wheel_env):
  env, cwd, _ = wheel_env
  assert set(OWN_FLAG) == set(SCRIPTS)
  for name in SCRIPTS:
    out = _run([name, "--help"], env, cwd).stdout
    assert f"usage: {name}" in out and OWN_FLAG[name] in out, (name, out[:1500])


def test_every_recipe_and_the_zoo_build_from_the_wheel(wheel_env, tmp_path):
  env, cwd, venv = wheel_env
  code = ("from qcs_jax import recipes, zoo\n"
          "for name, module in recipes.RECIPES.items():\n"
          "  c = module.get_config(); assert c.data.name in name or name == 'synthetic'\n"
          "for r in zoo.RELEASES.values():\n"
          "  if r.model != 'ir50': assert zoo.model_config(r).name == r.model\n"
          "print(len(recipes.RECIPES), 'recipes')\n")
  assert "13 recipes" in _run([str(venv / "bin" / "python"), "-c", code], env, cwd).stdout
  # A tiny QCS file in the authors' training-checkpoint format, converted with --zoo:
  # the recipe's config (from the wheel) with the tiny widths as overrides.
  cfg = reference.make_cfg()
  reference_files.save_full_checkpoint(tmp_path / "tiny.pth", reference.build_reference(cfg))
  sizes = ["--img_size", str(cfg["img_size"]), "--embed_dim", str(cfg["embed_dim"]),
           "--num_heads", str(cfg["num_heads"]), "--base_depth", str(cfg["base_depth"]),
           "--cross_depth", str(cfg["cross_depth"]),
           "--stage_channels", ",".join(map(str, cfg["stage_channels"])),
           "--stage_units", ",".join(map(str, cfg["stage_units"]))]
  out = _run(["qcs-convert", "--zoo", "rafdb_qcs", "--input", str(tmp_path / "tiny.pth"),
              "--output", "converted", *sizes], env, cwd).stdout
  assert "the recipe of configs/rafdb.py" in out and "class names (--zoo rafdb_qcs)" in out, out


def test_readme_command_blocks_run_in_order(wheel_env):
  env, cwd, _ = wheel_env
  blocks = readme_blocks()
  assert any("qcs-train" in b for b in blocks) and any("qcs-claim --" in b for b in blocks)
  for block in blocks:
    _run("set -euo pipefail\n" + block, env, cwd, shell=True)
  assert (cwd / "runs" / "tour" / "best" / "model.json").is_file()  # the demo recipe trained
  assert (cwd / "runs" / "claim_quick" / "results.jsonl").is_file()  # qcs-claim --quick ran
