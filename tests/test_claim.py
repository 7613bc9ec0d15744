"""The claim experiment (issue 16): equal budgets, grid, resume, report maths, --quick,
real data."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from qcs_jax.models.qcs import NUM_BRANCHES
from qcs_jax.data import pipeline
from qcs_jax.experiments import claim, claim_report
from qcs_jax.training import optim


class _Labels:
  def __init__(self, n):
    self.labels = np.arange(n) % 7


@pytest.mark.parametrize("settings", [claim.Settings(), claim.QUICK["settings"]])
def test_every_model_gets_the_same_images_and_schedule(settings):
  steps, lrs = set(), set()
  for model in claim.MODELS:
    c = claim.cell_config(settings, claim.Cell(model, 0.5, 1))
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
    assert tuple(c.data.synthetic.confound) == tuple(f"{x}:0.5" for x in settings.nuisances)
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
                                        "baseline_p0.80_seed0", "qcs-sd_p0.80_seed0"]
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
  assert "| baseline | – | 52.0 ± 2.0 [54.0] (n=3) |" in table
  assert "| qcs-sd | 60.0 | 67.0 |" in table
  assert "| qcs-sd − baseline | – | +3.0 ± 2.0 (3/3) |" in table


def test_report_files(tmp_path):
  rows = [_row(m, p, s, 0.3 + 0.1 * p + 0.01 * s) for m in ("dcs", "baseline")
          for p in (0.0, 0.95) for s in (0, 1)]
  table, fig = claim_report.write_report(rows, str(tmp_path))
  assert open(table).read().startswith("Settings: data=synthetic")
  with Image.open(fig) as im:
    assert im.size == (704, 462)
  real = [_row(m, None, s, 0.8 + 0.01 * s) for m in ("qcs-sd", "baseline") for s in (0, 1)]
  table, fig = claim_report.write_report(real, str(tmp_path))
  assert "| model | accuracy |" in open(table).read() and os.path.getsize(fig) > 1000
  with pytest.raises(ValueError, match="no finished runs"):
    claim_report.write_report([], str(tmp_path))


def test_quick_grid_runs_resumes_and_reports(tmp_path, capsys):
  out = str(tmp_path / "grid")
  assert claim.main(["--quick", "--out", out]) == 0
  rows = claim.read_rows(os.path.join(out, claim.RESULTS))
  assert sorted(r["cell"] for r in rows) == sorted(
      c.key for c in claim.grid(*(claim.QUICK[k] for k in ("models", "strengths", "seeds"))))
  assert len({r["images_through_backbone"] for r in rows}) == 1
  assert {r["anchors_per_step"] for r in rows} == {32, 8}
  for r in rows:
    assert 0.0 <= r["final_accuracy"] <= 1.0 and len(r["epoch_accuracies"]) == 1
    assert r["confound"] == ({"background": 0.95} if r["strength"] else {})
    assert not os.path.exists(os.path.join(out, "runs", r["cell"], "checkpoints"))
  assert os.path.getsize(os.path.join(out, "claim.png")) > 1000
  capsys.readouterr()
  # rerun: every cell is done, nothing trains; a torn last line (a kill) is ignored
  with open(os.path.join(out, claim.RESULTS), "a") as f:
    f.write('{"cell": "baseline_p0.0')
  assert claim.main(["--quick", "--out", out]) == 0
  assert "4 cells: 4 done, 0 to run" in capsys.readouterr().out
  # other settings in the same folder are refused, naming what differs
  assert claim.main(["--out", out, "--models", "dcs", "--seeds", "0"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "image_size" in err and "Traceback" not in err


def test_cli_errors(tmp_path, capsys):
  assert claim.main(["--out", str(tmp_path), "--models", "qcs"]) == 2
  assert "error: unknown model 'qcs'" in capsys.readouterr().err
  assert claim.main(["--out", str(tmp_path), "--report_only"]) == 0  # nothing yet: no report
  assert claim.main(["--out", str(tmp_path), "--data", "imagenet"]) == 2
  assert "error: unknown data 'imagenet'" in capsys.readouterr().err


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
  assert claim.main(argv) == 0
  rows = claim.read_rows(os.path.join(out, claim.RESULTS))
  assert [r["cell"] for r in rows] == ["baseline_seed0", "baseline_seed1"]
  assert all(r["strength"] is None and r["images_through_backbone"] == 16 for r in rows)
  assert "| model | accuracy |" in open(os.path.join(out, "claim_table.md")).read()
  json.dumps(rows)
