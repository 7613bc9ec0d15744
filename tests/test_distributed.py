"""Multi-process training for real: 2 local processes over 127.0.0.1 (gloo) against one
process with the same 2 devices; per-process batch parts; kill one process, rerun all."""
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import pytest

from qcs_jax.data import pipeline, sources
from qcs_jax.training import checkpoints, distributed, faults, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "tiny_train_config.py")
sys.path.insert(0, os.path.join(ROOT, "tests"))
import tiny_train_config  # noqa: E402  pylint: disable=wrong-import-position

TIMEOUT_S = 900


# XLA:CPU starts the collectives of one program in a fixed order but lets them overlap
# (its execution graph gives them "scheduling" edges only), and gloo pairs overlapping
# messages by arrival: under heavy load two all-reduces of a train step can be crossed and
# gloo aborts ("collective mismatch"). Nothing is lost (the rerun resumes exactly, as the
# kill test shows), so a run that dies with this signature, and only this, is run again,
# once: each rerun is counted (RERUNS) and reported as a pytest warning, and a second race
# in the same test fails it (an intermittent real collective bug must not pass unseen).
GLOO_RACE = ("Received data size doesn't match expected size",
             "Is there a distributed collective mismatch")
RACE_RETRIES = 1
RERUNS: list[str] = []


class GlooRaceRerun(UserWarning):
  """A 2-process run died of the gloo race and was run again (see GLOO_RACE)."""


def _note_rerun(where: str, outs: list[str]) -> None:
  line = next((l for out in outs for l in out.splitlines() if any(s in l for s in GLOO_RACE)),
              "")
  RERUNS.append(where)
  warnings.warn(GlooRaceRerun(f"gloo race in {where}: rerun {len(RERUNS)} of this session "
                              f"({line.strip()[:200]})"))


def _finish(procs) -> tuple[int, list[str]]:
  """Waits for the processes (the launcher's rule: one fails, the rest are stopped);
  returns the exit status and what each printed."""
  code = distributed.wait_all(procs, TIMEOUT_S)
  return code, [p.stdout.read().decode(errors="replace") for p in procs]


def _gloo_race(outs: list[str]) -> bool:
  return any(sig in out for out in outs for sig in GLOO_RACE)


def _run_to_end(workdir: str, fresh: bool) -> list[str]:
  """Runs the 2-process job until it ends well; a run killed by the gloo race (and only
  that) is run again: afresh (fresh=True) or resuming. Returns what each process printed."""
  for attempt in range(RACE_RETRIES + 1):
    procs = _launch(workdir)
    code, outs = _finish(procs)
    if code == 0:
      return outs
    assert attempt < RACE_RETRIES and _gloo_race(outs), (
        f"after {attempt} rerun(s): " + _tail(procs, outs))
    _note_rerun(workdir, outs)
    if fresh:
      shutil.rmtree(workdir)
  raise AssertionError("unreachable")


def _tail(procs, outs: list[str], n=2500) -> str:
  """What each process printed before it failed: the text ahead of faulthandler's thread
  dump (whose stacks would crowd out the C++ message that says why it aborted)."""
  parts = []
  for i, (p, out) in enumerate(zip(procs, outs)):
    head, sep, rest = out.partition("Fatal Python error")
    parts.append(f"--- process {i} (exit {p.returncode}) ---\n{head[-n:]}{sep}"
                 f"{rest.splitlines()[0] if sep else ''}")
  return "\n".join(parts)


def _train_cmd(workdir, *extra):
  return [sys.executable, "-m", "qcs_jax.train", f"--config={CONFIG}", f"--workdir={workdir}",
          *extra]


def _env(devices):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = distributed._xla_flags(env.get("XLA_FLAGS", ""), devices)  # pylint: disable=protected-access
  return env


def _launch(workdir, processes=2, *extra):
  procs = distributed.start_local(_train_cmd(workdir, *extra), processes, 1, cwd=ROOT,
                                  base_env=_env(1), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
  return procs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The tiny recipe trained by 1 process with 2 devices and by 2 processes with 1 each."""
  root = tmp_path_factory.mktemp("mp")
  one, two = str(root / "one"), str(root / "two")
  single = subprocess.Popen(_train_cmd(one), env=_env(2), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
  out = _run_to_end(two, fresh=True)  # afresh: its files are compared with a clean run's
  single_out = single.communicate(timeout=TIMEOUT_S)[0].decode()
  assert single.returncode == 0, single_out[-3000:]
  return one, two, out


def test_two_processes_equal_one_process_with_two_devices(runs):
  """float32, bit-exact: same global batch, same 2-device mesh, data decoded per process."""
  one, two, _ = runs
  a, b = checkpoints.latest_variables(one), checkpoints.latest_variables(two)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  rows_one, rows_two = faults.metrics_rows(one), faults.metrics_rows(two)
  assert rows_one == rows_two
  assert [r["step"] for r in rows_two if r["kind"] == "train"] == list(range(1, 13))
  assert [r["epoch"] for r in rows_two if r["kind"] == "eval"] == [1, 2]
  assert faults.compare(one, two)["best_exact"]


def test_only_process_zero_writes(runs):
  _, two, out = runs
  assert "epoch 1: test accuracy" in out[0] and "epoch 1: test accuracy" not in out[1]
  assert "synthetic/train" not in out[1]
  names = sorted(os.listdir(two))
  assert names == sorted(["best", "best_confusion.json", "best_confusion.png", "checkpoints",
                          "config.json", "curves.png", "metrics.jsonl", "tb"]), names
  assert len(os.listdir(os.path.join(two, "tb"))) == 1  # one event file: one writer
  steps = sorted(os.listdir(os.path.join(two, "checkpoints")))
  assert steps and all(s.isdigit() for s in steps), steps  # no orbax temporaries left


def test_kill_one_process_then_rerun_all_resumes_exactly(runs, tmp_path):
  one = runs[0]
  killed = str(tmp_path / "killed")
  ck = os.path.join(killed, "checkpoints")
  for attempt in range(RACE_RETRIES + 1):
    procs = _launch(killed)
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline and all(p.poll() is None for p in procs):
      if os.path.isdir(ck) and any(d.isdigit() and int(d) >= 4 for d in os.listdir(ck)):
        break
      time.sleep(0.05)
    if all(p.poll() is None for p in procs):
      break
    code, out = _finish(procs)  # ended before the kill: only the gloo race may explain it
    assert attempt < RACE_RETRIES and _gloo_race(out), (
        f"the run ended before the kill (after {attempt} rerun(s))\n" + _tail(procs, out))
    _note_rerun(killed, out)
    shutil.rmtree(killed)
  procs[1].send_signal(signal.SIGKILL)
  code, _ = _finish(procs)  # the launcher's rule: stop the others
  assert code != 0 and all(p.returncode is not None for p in procs)
  out = _run_to_end(killed, fresh=False)[0]
  assert "resuming" in out
  got = faults.compare(one, killed)
  assert got["weights_exact"] and got["best_exact"], got
  assert got["rows_equal"] == got["rows"] == got["rows_other"], got


def test_process_parts_are_disjoint_and_make_the_global_batch():
  cfg = tiny_train_config.get_config()
  src = sources.open_split(cfg.data, cfg.data.train_split)
  whole = pipeline.train_batches(src, cfg.data, 32, 4, 3, epoch=1, start_step=2)
  parts = [pipeline.train_batches(src, cfg.data, 32, 4, 3, epoch=1, start_step=2,
                                  part=(i, 4)) for i in range(4)]
  g, ps = next(whole), [next(p) for p in parts]
  assert ps[0]["image"].shape[0] == 2
  for k in ("image", "label", "index"):
    np.testing.assert_array_equal(np.concatenate([p[k] for p in ps]), g[k])
  test = sources.open_split(cfg.data, cfg.data.test_split)
  whole = list(pipeline.eval_batches(test, cfg.data, 32, 16))
  parts = [list(pipeline.eval_batches(test, cfg.data, 32, 16, part=(i, 2))) for i in range(2)]
  for n, g in enumerate(whole):
    for k in ("image", "label", "index", "mask"):
      np.testing.assert_array_equal(np.concatenate([parts[0][n][k], parts[1][n][k]]), g[k])
  with pytest.raises(ValueError, match="batch of 8 does not divide among 3 processes"):
    pipeline.train_batches(src, cfg.data, 32, 4, 3, epoch=0, part=(0, 3))


def test_batch_not_dividing_the_devices_names_both(tmp_path):
  cfg = tiny_train_config.get_config()
  cfg.data.batch_size = 12
  with pytest.raises(ValueError, match=r"batch_size=12 does not divide among the 8 devices"):
    loop.train_and_evaluate(cfg, str(tmp_path / "run"))


def test_environment_is_checked():
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES must be an integer"):
    distributed.maybe_initialize_distributed({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"})
  with pytest.raises(ValueError, match="JAX_PROCESS_ID=2"):
    distributed.maybe_initialize_distributed({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1",
                                              "JAX_NUM_PROCESSES": "2",
                                              "JAX_PROCESS_ID": "2"})
  assert not distributed.maybe_initialize_distributed({})
  env = distributed.process_env(1, 2, 3, 1234, {"XLA_FLAGS": "--a=1 "
                                                "--xla_force_host_platform_device_count=8"})
  assert env["XLA_FLAGS"] == "--a=1 --xla_force_host_platform_device_count=3"
  assert (env["JAX_PROCESS_ID"], env["JAX_NUM_PROCESSES"]) == ("1", "2")


_FAILS_ONCE = """
import os, sys, time
marker = sys.argv[1]
if os.environ["JAX_PROCESS_ID"] == "1" and not os.path.exists(marker):
  open(marker, "w").close()
  sys.exit(3)
time.sleep(0.3)
"""


def test_launcher_restarts_all_processes_after_a_failure(tmp_path, capfd):
  marker = str(tmp_path / "failed_once")
  cmd = [sys.executable, "-c", _FAILS_ONCE, marker]
  assert distributed.run_local(cmd, 2, restarts=0) == 3  # no restarts: the failure stands
  os.remove(marker)
  assert distributed.run_local(cmd, 2, restarts=1) == 0
  assert os.path.exists(marker)
  assert "starting all 2 again (1 of 1 restarts)" in capfd.readouterr().err
  with pytest.raises(ValueError, match="restarts must be >= 0, got -1"):
    distributed.run_local(cmd, 2, restarts=-1)


def test_a_gloo_race_is_rerun_once_reported_and_a_second_one_fails(tmp_path, monkeypatch):
  """The rerun rule itself, with the launcher faked: no processes are started."""
  race = "E1207 gloo: Received data size doesn't match expected size"
  results = []
  monkeypatch.setattr(sys.modules[__name__], "_launch", lambda workdir: [])
  monkeypatch.setattr(sys.modules[__name__], "_finish", lambda procs: results.pop(0))
  monkeypatch.setattr(sys.modules[__name__], "RERUNS", [])
  workdir = tmp_path / "w"
  workdir.mkdir()
  results[:] = [(1, [race, ""]), (0, ["ok", "ok"])]
  with pytest.warns(GlooRaceRerun, match=r"rerun 1 of this session \(E1207 gloo"):
    assert _run_to_end(str(workdir), fresh=False) == ["ok", "ok"]
  assert RERUNS == [str(workdir)]
  results[:] = [(1, [race, ""]), (1, ["", race])]
  with pytest.warns(GlooRaceRerun), pytest.raises(AssertionError, match=r"after 1 rerun"):
    _run_to_end(str(workdir), fresh=False)
  results[:] = [(1, ["Segmentation fault", ""])]  # any other failure: no rerun at all
  with pytest.raises(AssertionError, match=r"after 0 rerun"):
    _run_to_end(str(workdir), fresh=False)
  assert len(RERUNS) == 2
