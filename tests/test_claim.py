"""The claim experiment (issue 16): equal budgets, grid, resume, report maths, --quick,
real data."""
import datetime
import hashlib
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from qcs_jax.models.qcs import NUM_BRANCHES
from qcs_jax.data import pipeline
from qcs_jax.cli import claim as claim_cli
from qcs_jax.experiments import claim, claim_report, claim_store
from qcs_jax.training import optim


class _Labels:
  def __init__(self, n):
    self.labels = np.arange(n) % 7


@pytest.mark.parametrize("settings", [claim.Settings(), claim.QUICK["settings"]])
def test_every_model_gets_the_same_images_and_schedule(settings):
  steps, lrs = set(), set()
  for model in claim.MODELS:
    c = claim.cell_config(settings, claim.Cell(model, 0.5, 1, "background+glasses"))
    nb = NUM_BRANCHES[c.model.name]
    assert c.data.batch_size * nb == settings.images_per_step
    assert claim.images_per_epoch(c, settings.num_train) == settings.num_train
    # the pipeline's own count of steps agrees, so epochs (and the lr decay) line up
    sampler = pipeline.make_sampler(_Labels(settings.num_train), c.data, nb, 1)
    n = pipeline.steps_per_epoch(sampler, c.data.batch_size)
    steps.add(n)
    lrs.add(tuple(float(optim.current_lr(c.optim, n, s)) for s in (0, n, 3 * n + 1)))
    assert c.train.epochs == settings.epochs and c.train.seed == 1
    assert c.data.synthetic.seed == 1
    assert tuple(c.data.synthetic.confound) == ("background:0.5", "glasses:0.5")
    assert (c.data.synthetic.expression_strength, c.data.synthetic.expression_jitter,
            c.optim.sam, c.optim.lr) == (settings.expression_strength,
                                         settings.expression_jitter, settings.sam, settings.lr)
    assert (c.model.name, c.model.csa) == claim.MODELS[model]
  assert len(steps) == 1 and len(lrs) == 1


def test_strength_zero_means_no_confound_and_overrides_apply():
  s = claim.Settings(overrides=("optim.lr=0.01", "model.stage_units=(1, 1, 1)"))
  c = claim.cell_config(s, claim.Cell("qcs-d", 0.0, 0))
  assert tuple(c.data.synthetic.confound) == ()
  assert c.optim.lr == 0.01 and tuple(c.model.stage_units) == (1, 1, 1)
  for bad in ("optim.nope=1", "nosuch.lr=1", "justakey"):
    with pytest.raises(ValueError, match="--set"):
      claim.cell_config(claim.Settings(overrides=(bad,)), claim.Cell("dcs", 0.0, 0))
  with pytest.raises(ValueError, match="multiple of 4"):
    claim.cell_config(claim.Settings(images_per_step=30), claim.Cell("dcs", 0.0, 0))


def test_real_data_keeps_the_released_recipe_unless_asked():
  s = claim.Settings(data="folder", root="/data/raf", epochs=0, budget="recipe")
  for model, batch in (("baseline", 48), ("dcs", 48), ("qcs-s", 24)):
    c = claim.cell_config(s, claim.Cell(model, None, 2))
    assert (c.data.name, c.data.root, c.data.batch_size, c.train.epochs) == \
        ("folder", "/data/raf", batch, 200)
    assert c.model.img_size == 224 and c.train.seed == 2
  assert claim.Cell("qcs-s", None, 2).key == "qcs-s_seed2"


def test_grid_is_seed_major_and_checked():
  cells = claim.grid(["baseline", "qcs-sd"], [0.0, 0.8], [0, 1])
  assert [c.key for c in cells[:4]] == ["baseline_p0.00_seed0", "qcs-sd_p0.00_seed0",
                                        "baseline_background_p0.80_seed0",
                                        "qcs-sd_background_p0.80_seed0"]
  # p = 0 ties nothing: one cell, shared by every nuisance's curve
  glasses = claim.grid(["dcs"], [0.0, 0.3], [2], ["glasses"])
  assert [c.key for c in glasses] == ["dcs_p0.00_seed2", "dcs_glasses_p0.30_seed2"]
  assert {c.seed for c in cells[4:]} == {1}
  with pytest.raises(ValueError, match="unknown model 'qcs'"):
    claim.grid(["qcs"], [0.0], [0])
  with pytest.raises(ValueError, match="strength"):
    claim.grid(["dcs"], [1.5], [0])


def _row(model, p, seed, acc, best=None):
  return dict(model=model, strength=p, seed=seed, final_accuracy=acc,
              best_accuracy=acc if best is None else best, images_through_backbone=640,
              settings={"data": "synthetic"})


def test_report_maths_and_table():
  rows = [_row("baseline", 0.8, s, a) for s, a in enumerate([0.50, 0.54, 0.52])]
  rows += [_row("qcs-sd", 0.8, s, a, a + 0.1) for s, a in enumerate([0.53, 0.55, 0.57])]
  rows += [_row("qcs-sd", 0.0, 0, 0.6)]
  st = claim_report.summarize(rows)
  assert st[("baseline", 0.8)]["mean"] == pytest.approx(0.52)
  assert st[("baseline", 0.8)]["std"] == pytest.approx(0.02)  # ddof=1
  assert st[("qcs-sd", 0.8)]["max_best"] == pytest.approx(0.67)
  assert st[("qcs-sd", 0.0)]["std"] == 0.0
  d = claim_report.paired(rows, "qcs-sd", "baseline", 0.8)
  np.testing.assert_allclose(d["diffs"], [0.03, 0.01, 0.05])
  assert d["wins"] == 3 and d["mean"] == pytest.approx(0.03) and d["std"] == pytest.approx(0.02)
  assert claim_report.paired(rows, "qcs-sd", "baseline", 0.0) is None
  table = claim_report.table_markdown(rows)
  # t(0.975, 2) = 4.3027: half-widths 4.3027 * 2 / sqrt(3) = 4.97 points
  assert "| baseline | – | 52.0 ± 2.0 [54.0] {47.0, 57.0} (n=3) |" in table
  assert "| qcs-sd | 60.0 | 67.0 |" in table
  assert "| qcs-sd − baseline | – | +3.0 [-2.0, +8.0] (3/3) undecided |" in table
  lo, hi = claim_report.ci95([0.03, 0.01, 0.05])
  assert (lo, hi) == pytest.approx((0.03 - 0.049683, 0.03 + 0.049683), abs=1e-6)
  assert claim_report.verdict((0.001, 0.02)) == "supported"
  assert claim_report.verdict((-0.02, -0.001)) == "contradicted"
  assert claim_report.verdict(None).startswith("undecided")


def test_report_files(tmp_path):
  rows = [_row(m, p, s, 0.3 + 0.1 * p + 0.01 * s) for m in ("dcs", "baseline")
          for p in (0.0, 0.95) for s in (0, 1)]
  table, fig = claim_report.write_report(rows, str(tmp_path))
  assert open(table).read().startswith("Settings: data=synthetic")
  with Image.open(fig) as im:
    assert im.size == (704, 924)  # accuracy above, the paired difference from baseline below
  real = [_row(m, None, s, 0.8 + 0.01 * s) for m in ("qcs-sd", "baseline") for s in (0, 1)]
  table, fig = claim_report.write_report(real, str(tmp_path))
  assert "| model | accuracy |" in open(table).read() and os.path.getsize(fig) > 1000
  with pytest.raises(ValueError, match="no finished runs"):
    claim_report.write_report([], str(tmp_path))
  # two nuisances: the p = 0 rows join both curves, one panel and one section each
  two = [dict(_row(m, p, s, 0.6 - 0.2 * p + 0.01 * s), nuisance=n if p else "")
         for m in ("dcs", "baseline") for s in (0, 1) for p, n in
         ((0.0, ""), (0.3, "background"), (0.3, "skin"))]
  assert [len(v) for v in claim_report.curves(two).values()] == [8, 8]
  table, fig = claim_report.write_report(two, str(tmp_path))
  text = open(table).read()
  assert "## Nuisance: background" in text and "## Nuisance: skin" in text
  assert "| dcs | +6.0 [+6.0, +6.0] (2/2) |" in text  # drop 0.6 -> 0.54 on both seeds
  with Image.open(fig) as im:
    assert im.size == (1408, 924)
  curve = claim_report.plot_epochs([dict(cell="a", epoch_accuracies=[0.2, 0.5])],
                                   str(tmp_path / "epochs.png"))
  with Image.open(curve) as im:
    assert im.size == (792, 484)  # the legend sits below: 0.2 inch more per line


def test_quick_grid_runs_resumes_and_reports(tmp_path, capsys):
  out = str(tmp_path / "grid")
  assert claim_cli.main(["--quick", "--out", out]) == 0
  rows = claim.read_rows(os.path.join(out, claim.RESULTS))
  assert sorted(r["cell"] for r in rows) == sorted(
      c.key for c in claim.grid(*(claim.QUICK[k] for k in ("models", "strengths", "seeds"))))
  assert len({r["images_through_backbone"] for r in rows}) == 1
  assert {r["anchors_per_step"] for r in rows} == {32, 8}
  for r in rows:
    # the row's accuracy is the one the training loop evaluated, a count out of 70 faces
    evals = [e for e in claim.read_rows(os.path.join(out, "runs", r["cell"], "metrics.jsonl"))
             if e.get("kind") == "eval"]
    assert r["final_accuracy"] == evals[-1]["accuracy"] == r["epoch_accuracies"][-1]
    assert len(r["epoch_accuracies"]) == 1 and evals[-1]["num_images"] == 70
    assert r["final_accuracy"] * 70 == pytest.approx(round(r["final_accuracy"] * 70), abs=1e-9)
    assert r["confound"] == ({"background": 0.95} if r["strength"] else {})
    assert not os.path.exists(os.path.join(out, "runs", r["cell"], "checkpoints"))
  assert os.path.getsize(os.path.join(out, "claim.png")) > 1000
  capsys.readouterr()
  # rerun: every cell is done, nothing trains; a torn last line (a kill) is ignored
  with open(os.path.join(out, claim.RESULTS), "a") as f:
    f.write('{"cell": "baseline_p0.0')
  assert claim_cli.main(["--quick", "--out", out]) == 0
  assert "4 cells: 4 done, 0 to run" in capsys.readouterr().out
  # other settings in the same folder are refused, naming what differs
  assert claim_cli.main(["--out", out, "--models", "dcs", "--seeds", "0"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "image_size" in err and "Traceback" not in err


def test_cli_errors(tmp_path, capsys):
  assert claim_cli.main(["--out", str(tmp_path), "--models", "qcs"]) == 2
  assert "error: unknown model 'qcs'" in capsys.readouterr().err
  assert claim_cli.main(["--out", str(tmp_path), "--report_only"]) == 0  # nothing yet: no report
  assert claim_cli.main(["--out", str(tmp_path), "--data", "imagenet"]) == 2
  assert "error: unknown data 'imagenet'" in capsys.readouterr().err
  assert claim_cli.main(["--out", str(tmp_path), "--until", "25:99"]) == 2
  assert "error: --until '25:99': expected HH:MM" in capsys.readouterr().err
  assert claim_cli.main(["--out", str(tmp_path), "--plan", "issue27", "--data", "rafdb"]) == 2
  assert "--plan issue27 is a synthetic-data grid" in capsys.readouterr().err
  now = datetime.datetime(2026, 12, 7, 11, 0, tzinfo=datetime.timezone.utc)
  assert claim_store.parse_until("13:35", now) == now.replace(hour=13, minute=35).timestamp()


def test_issue27_plan():
  cells = claim.plan_27()
  keys = [c.key for c in cells]
  assert len(keys) == len(set(keys)) == 165  # 21 p = 0 cells, 84 background, 60 skin
  assert all(c.strength == 0.0 for c in cells[:21]) and all(c.strength for c in cells[21:])
  count = lambda m, n: sum(c.model == m and c.nuisance == n for c in cells)
  assert (count("qcs-sd", "background"), count("qcs-d", "background"), count("dcs", "skin"),
          count("qcs-s", "skin")) == (20, 12, 20, 0)


def test_real_folder_grid(tmp_path):
  """A folder data set runs the same tool (tiny network via --set), one row per model x seed.

  One model (one compile) keeps it short; the models' configs are tested above."""
  from qcs_jax.data.synthetic import CLASS_NAMES, render_face
  root = tmp_path / "faces"
  for split, n in (("train", 4), ("test", 1)):
    for c, name in enumerate(CLASS_NAMES):
      os.makedirs(root / split / name)
      for i in range(n):
        Image.fromarray(render_face(c, 32, seed=i + 10 * (split == "test"))).save(
            root / split / name / f"{i}.png")
  tiny = ["model.img_size=32", "model.stage_channels=(8, 16, 16)", "model.stage_units=(1, 1, 1)",
          "model.embed_dim=32", "model.num_heads=2", "data.workers=0", "data.eval_batch_size=8",
          "data.augment.erase_p=0.0", "init.backbone=scratch"]
  out = str(tmp_path / "real")
  argv = ["--out", out, "--data", "folder", "--root", str(root), "--models", "baseline",
          "--seeds", "0,1", "--epochs", "1", "--budget", "images", "--images_per_step", "16"]
  for s in tiny:
    argv += ["--set", s]
  assert claim_cli.main(argv) == 0
  rows = claim.read_rows(os.path.join(out, claim.RESULTS))
  assert [r["cell"] for r in rows] == ["baseline_seed0", "baseline_seed1"]
  assert all(r["strength"] is None and r["images_through_backbone"] == 16 for r in rows)
  assert "| model | accuracy |" in open(os.path.join(out, "claim_table.md")).read()
  json.dumps(rows)


def _fake_run_cell(s, cell, workdir):
  """A result row without training (the store and the claims are under test, not jax)."""
  return {"cell": cell.key, "model": cell.model, "strength": cell.strength, "seed": cell.seed,
          "nuisance": cell.nuisance, "final_accuracy": 0.5, "best_accuracy": 0.5,
          "images_through_backbone": 64, "cpu_s": 36.0, "wall_s": 1.0, "best_epoch": 1,
          "settings": s.as_dict()}


def test_rows_file_resumes_and_refuses_other_settings(tmp_path, monkeypatch):
  ran = []
  monkeypatch.setattr(claim, "run_cell", lambda s, c, w: ran.append(c.key) or
                      _fake_run_cell(s, c, w))
  s = claim.Settings(epochs=2)
  cells = claim.grid(["baseline", "dcs"], [0.0, 0.2], [0, 1], ["glasses"])
  rows_path = str(tmp_path / "committed" / "rows.jsonl")
  logs = []
  rows, failures = claim.run_grid(s, cells, str(tmp_path / "out"), rows_path=rows_path,
                                  log=logs.append)
  assert failures == [] and ran == [c.key for c in cells] and len(rows) == 8
  r = rows[0]
  assert r["settings_hash"] == claim.settings_hash(s.as_dict()) and len(r["settings_hash"]) == 12
  assert r["cpu"] and r["date"].endswith("+00:00") and r["nuisance"] == ""
  assert rows[2]["cell"] == "baseline_glasses_p0.20_seed0" and rows[2]["nuisance"] == "glasses"
  assert "8 finished rows took 0.08 CPU-h; 0 cells left" in logs[-1]
  assert not os.listdir(tmp_path / "out" / "claims")  # released after each row
  # a kill mid-append leaves a torn line: ignored, and the next row starts a fresh line
  lines = open(rows_path).read().splitlines()
  with open(rows_path, "w") as f:
    f.write("\n".join(lines[:5]) + "\n" + lines[5][:20])
  ran.clear()
  rows, _ = claim.run_grid(s, cells, str(tmp_path / "out"), rows_path=rows_path, log=logs.append)
  assert ran == [c.key for c in cells[5:]]
  assert sorted(r["cell"] for r in rows) == sorted(c.key for c in cells)
  assert any("5 finished rows took 0.05 CPU-h; 3 cells left: ~0.03 CPU-h" in line
             for line in logs)  # 36 CPU-s a row so far
  # --until in the past: nothing starts
  ran.clear()
  claim.run_grid(s, claim.grid(["qcs-s"], [0.0], [0]), str(tmp_path / "out"),
                 rows_path=rows_path, until=0.0, log=logs.append)
  assert ran == [] and "not started" in logs[-2]
  with pytest.raises(ValueError, match=r"other settings \(epochs\)"):
    claim.run_grid(claim.Settings(epochs=3), cells, str(tmp_path / "out"), rows_path=rows_path)


def test_claims_are_exclusive_and_stale_ones_taken_over(tmp_path):
  c1 = claim_store.Claims(str(tmp_path), owner={"pid": os.getpid(), "host": "a"})
  c2 = claim_store.Claims(str(tmp_path), owner={"pid": os.getpid(), "host": "b"})
  assert c1.try_claim("x") and not c2.try_claim("x")  # fresh claim of a live owner
  c2.release("x")  # not c2's: stays
  assert c1.holder("x")["host"] == "a"
  old = time.time() - 2 * claim_store.STALE_S
  os.utime(c1.path("x"), (old, old))  # its owner stopped refreshing it
  assert c2.try_claim("x") and c2.holder("x")["host"] == "b"
  # a dead pid on this host is stale at once
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  with open(c1.path("y"), "w") as f:
    json.dump({"pid": int(dead.stdout), "host": socket.gethostname()}, f)
  assert c1.is_stale("y") and c1.try_claim("y")
  with c1.heartbeat("y", every_s=0.01):
    os.utime(c1.path("y"), (old, old))
    time.sleep(0.2)
  assert time.time() - os.stat(c1.path("y")).st_mtime < 5


def test_a_cell_finished_between_the_rows_check_and_the_claim_is_not_run_again(
    tmp_path, monkeypatch):
  """The race CI caught: another process writes a cell's row and releases its claim
  after this one read the rows and before it claims; the claim succeeds, the run must not."""
  ran = []
  monkeypatch.setattr(claim, "run_cell", lambda s, c, w: ran.append(c.key) or
                      _fake_run_cell(s, c, w))
  s = claim.Settings(epochs=2)
  cells = claim.grid(["baseline", "dcs"], [0.0], [0])
  rows_path = str(tmp_path / "rows.jsonl")
  real_try_claim = claim_store.Claims.try_claim

  def other_process_finishes_first(self, key):
    if key == cells[0].key:
      row = _fake_run_cell(s, cells[0], "")
      row.update(settings_hash=claim.settings_hash(s.as_dict()), worker="other")
      claim_store.append_row(rows_path, row)
    return real_try_claim(self, key)

  monkeypatch.setattr(claim_store.Claims, "try_claim", other_process_finishes_first)
  rows, _ = claim.run_grid(s, cells, str(tmp_path / "out"), rows_path=rows_path,
                           log=lambda *_: None)
  assert ran == [cells[1].key]
  assert sorted(r["cell"] for r in rows) == sorted(c.key for c in cells)
  assert not os.listdir(tmp_path / "out" / "claims")  # the needless claim was let go


_WORKER = """
import os, sys, time
from qcs_jax.experiments import claim
open(sys.argv[1] + ".ready" + sys.argv[2], "w").close()
while not os.path.exists(sys.argv[1] + ".go"):  # both start together
  time.sleep(0.01)
def fake(s, cell, workdir):
  time.sleep(0.1)
  return dict(cell=cell.key, model=cell.model, strength=cell.strength, seed=cell.seed,
              nuisance=cell.nuisance, final_accuracy=0.5, best_accuracy=0.5,
              images_through_backbone=64, cpu_s=1.0, wall_s=1.0, best_epoch=1,
              settings=s.as_dict(), worker=sys.argv[2])
claim.run_cell = fake
cells = claim.grid(list(claim.MODELS), [0.0, 0.1, 0.3], [0, 1])
claim.run_grid(claim.Settings(), cells, sys.argv[1], log=lambda *_: None)
"""


def test_two_processes_share_a_grid_without_running_a_cell_twice(tmp_path):
  out = str(tmp_path / "shared")
  procs = [subprocess.Popen([sys.executable, "-c", _WORKER, out, str(i)]) for i in range(2)]
  deadline = time.time() + 60
  while not all(os.path.exists(f"{out}.ready{i}") for i in range(2)) and time.time() < deadline:
    time.sleep(0.02)
  open(out + ".go", "w").close()
  assert [p.wait(timeout=120) for p in procs] == [0, 0]
  rows = claim.read_rows(os.path.join(out, claim.RESULTS))
  keys = [r["cell"] for r in rows]
  assert len(keys) == len(set(keys)) == 30
  assert {r["worker"] for r in rows} == {"0", "1"}  # both did some of the work


def _factor_digest(src) -> str:
  h = hashlib.sha256()
  for k in sorted(src.factors):
    h.update(k.encode())
    h.update(np.ascontiguousarray(src.factors[k]).tobytes())
  h.update(np.asarray(src.labels, np.int64).tobytes())
  return h.hexdigest()


def test_expression_knobs_default_to_todays_faces_and_scale_the_expression():
  from qcs_jax.data.base import DataError
  from qcs_jax.data.synthetic import _NEUTRAL, make_synthetic_split
  cfg = dict(num_train=21, num_test=7, image_size=16, seed=3, label_noise=0.1,
             confound=("background:0.5",))
  # digest of every drawing parameter from main's renderer (689dc1f, before the knobs)
  assert _factor_digest(make_synthetic_split(cfg, "train")) == \
      "ebac6e746229a957c189bc4ad9d684e9281fd59b622f5b2ae961c6b6544e7d5b"
  one, two = (make_synthetic_split({**cfg, "expression_strength": k, "expression_jitter": 1e-9},
                                   "test").factors for k in (1.0, 2.0))
  np.testing.assert_allclose(two["brow_h"] - _NEUTRAL[0], 2 * (one["brow_h"] - _NEUTRAL[0]),
                             rtol=1e-6, atol=1e-8)  # brow height is never clipped
  np.testing.assert_array_equal(one["background_u"], two["background_u"])  # nuisances stay
  with pytest.raises(DataError, match="expression_jitter must be a finite number > 0, got -1"):
    make_synthetic_split({**cfg, "expression_jitter": -1}, "train")
