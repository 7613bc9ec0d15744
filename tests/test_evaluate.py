"""qcs_jax.evaluate: metrics against a hand computation from the model's logits."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_model_cfg
from qcs_jax import recipes as config
from qcs_jax.apps import evaluation as evaluate
from qcs_jax.model_files import locate, model_dir as checkpoint
from qcs_jax.data import synthetic, transforms
from qcs_jax.data.sources import InMemorySource
from qcs_jax.models import build_model
from qcs_jax.apps.throughput import random_variables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = tiny_model_cfg("qcs", img_size=32, stage_channels=(8, 8, 16), embed_dim=16)
N = 20


def _softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A random tiny QCS saved as a training workdir's best/, its logits on 20 faces."""
  root = tmp_path_factory.mktemp("eval")
  model = build_model(TINY)
  variables = random_variables(model, TINY["img_size"], seed=1, inference_only=False)
  ckpt = checkpoint.save_variables(root / "run" / "best", variables, TINY,
                                   extra={"class_names": list(synthetic.CLASS_NAMES)})
  (root / "run" / "checkpoints").mkdir()
  faces = synthetic.make_synthetic_split(
      dict(num_test=N, image_size=32, seed=0), "test").images
  loaded = checkpoint.load_model(ckpt)
  x = np.stack([transforms.normalize(im) for im in faces])
  logits = np.asarray(loaded.logits(x), np.float64)
  flipped = np.asarray(loaded.logits(np.ascontiguousarray(x[:, :, ::-1])), np.float64)
  preds = logits.argmax(-1)
  # Half the labels agree with the model, half are another class: accuracy 0.5.
  labels = np.where(np.arange(N) < N // 2, preds, (preds + 1 + np.arange(N) % 6) % 7)
  src = InMemorySource(labels=labels, class_names=synthetic.CLASS_NAMES, name="fixture/test",
                       images=faces)
  cfg = config.synthetic()
  cfg.data.augment.resize = 0
  cfg.data.eval_batch_size = 16  # 2 batches, the second padded
  (root / "run" / "config.json").write_text(cfg.to_json_best_effort())  # as training does
  return dict(root=root, workdir=str(root / "run"), ckpt=str(ckpt), src=src, cfg=cfg,
              logits=logits, flipped=flipped, labels=labels)


def _hand_metrics(labels, preds, k=7):
  cm = np.zeros((k, k), int)
  for y, p in zip(labels, preds):
    cm[y, p] += 1
  per = {}
  for c in range(k):
    tp = sum(1 for y, p in zip(labels, preds) if y == c and p == c)
    support = sum(1 for y in labels if y == c)
    predicted = sum(1 for p in preds if p == c)
    prec = tp / predicted if predicted else 0.0
    rec = tp / support if support else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    per[c] = (prec, rec, f1, support)
  present = [c for c in range(k) if per[c][3]]
  return cm, per, float(np.mean([per[c][1] for c in present]))


def test_metrics_files_and_csv_match_hand_computation(setup, tmp_path):
  out = tmp_path / "out"
  csv_path = tmp_path / "preds.csv"
  r = evaluate.evaluate_checkpoint(setup["cfg"], setup["workdir"], output=str(out),
                                   predictions_csv=str(csv_path), progress=False,
                                   source=setup["src"])
  probs = _softmax(setup["logits"])
  preds = probs.argmax(-1)
  labels = setup["labels"]
  np.testing.assert_array_equal(r["index"], np.arange(N))
  np.testing.assert_array_equal(r["labels"], labels)
  np.testing.assert_array_equal(r["preds"], preds)
  np.testing.assert_allclose(r["probs"], probs, atol=1e-5)
  assert r["checkpoint"] == os.path.abspath(setup["ckpt"])  # workdir -> its best/
  cm, per, mean_class = _hand_metrics(labels, preds)
  assert r["num_images"] == N
  assert r["accuracy"] == pytest.approx(np.mean(labels == preds)) == pytest.approx(0.5)
  assert r["mean_class_accuracy"] == pytest.approx(mean_class)
  np.testing.assert_array_equal(np.asarray(r["confusion_matrix"]), cm)
  for c, name in enumerate(synthetic.CLASS_NAMES):
    got = r["per_class"][name]
    assert (got["precision"], got["recall"], got["f1"]) == pytest.approx(per[c][:3])
    assert got["support"] == per[c][3]

  with Image.open(out / "confusion.png") as im:
    assert im.format == "PNG" and min(im.size) > 100
  assert json.loads((out / "confusion.json").read_text())["matrix"] == cm.tolist()
  saved = json.loads((out / "metrics.json").read_text())
  assert saved["accuracy"] == pytest.approx(0.5) and saved["split"] == "test"

  with open(csv_path, newline="") as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == (["index", "source", "label", "label_name", "prediction",
                            "prediction_name"]
                           + [f"prob_{n}" for n in synthetic.CLASS_NAMES])
  assert len(rows) == N
  for i, row in enumerate(rows):
    assert int(row["index"]) == i and row["source"] == setup["src"].describe(i)
    assert int(row["label"]) == labels[i] and int(row["prediction"]) == preds[i]
    assert row["prediction_name"] == synthetic.CLASS_NAMES[preds[i]]
    p = [float(row[f"prob_{n}"]) for n in synthetic.CLASS_NAMES]
    np.testing.assert_allclose(p, probs[i], atol=2e-6)


def test_flip_tta_averages_softmax_of_image_and_mirror(setup):
  # No config: the training workdir's config.json supplies it.
  r = evaluate.evaluate_checkpoint(None, setup["workdir"], tta_flip=True, progress=False,
                                   source=setup["src"])
  plain = _softmax(setup["logits"])
  expected = 0.5 * (plain + _softmax(setup["flipped"]))
  assert not np.allclose(expected, plain, atol=1e-4)  # the mirror images do differ
  np.testing.assert_allclose(r["probs"], expected, atol=1e-5)
  np.testing.assert_array_equal(r["preds"], expected.argmax(-1))
  assert r["tta_flip"] and r["accuracy"] == pytest.approx(
      np.mean(expected.argmax(-1) == setup["labels"]))


def test_class_count_mismatch_is_a_clear_error(setup):
  src = InMemorySource(labels=np.array([0, 1, 2]), class_names=("a", "b", "c"), name="three",
                       images=np.zeros((3, 32, 32, 3), np.uint8))
  with pytest.raises(ValueError, match="three has 3 classes.*predicts 7"):
    evaluate.evaluate_checkpoint(setup["cfg"], setup["ckpt"], progress=False, source=src)


def test_resolve_checkpoint(setup, tmp_path):
  assert locate.resolve_checkpoint(setup["workdir"]) == os.path.join(setup["workdir"], "best")
  assert locate.resolve_checkpoint(setup["ckpt"]) == setup["ckpt"]
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  with pytest.raises(checkpoint.CheckpointError, match="without a best/"):
    locate.resolve_checkpoint(str(tmp_path / "run"))
  with pytest.raises(checkpoint.CheckpointError, match="model.json"):
    locate.resolve_checkpoint(str(tmp_path))
  lone = shutil.copytree(setup["ckpt"], tmp_path / "lone")  # no config.json near it
  with pytest.raises(ValueError, match="no --config given and no config.json"):
    evaluate.evaluate_checkpoint(None, str(lone), progress=False)


def test_config_differences_names_the_fields():
  diffs = evaluate.config_differences(dict(TINY, img_size=64, dtype="bfloat16"), TINY)
  assert diffs == ["config.model.img_size=64 but the checkpoint has 32"]


def test_cli_on_synthetic_split(setup, tmp_path):
  out, preds = tmp_path / "out", tmp_path / "p.csv"
  cmd = [sys.executable, "-m", "qcs_jax.cli.evaluate", "--config", "configs/synthetic.py",
         "--config.data.synthetic.num_test=10", "--config.data.synthetic.image_size=32",
         "--config.data.augment.resize=0", "--config.data.eval_batch_size=8",
         f"--checkpoint={setup['workdir']}", f"--output={out}", f"--predictions_csv={preds}",
         "--tta_flip", "--noprogress"]
  p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr
  assert "synthetic/test (10 images, flip TTA)" in p.stdout
  assert "mean class accuracy" in p.stdout and "Happiness" in p.stdout
  assert "config.model.img_size=64 but the checkpoint has 32" in p.stderr
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["num_images"] == 10 and metrics["tta_flip"] is True
  assert sum(map(sum, metrics["confusion_matrix"])) == 10
  with open(preds, newline="") as f:
    assert len(list(csv.DictReader(f))) == 10
  assert (out / "confusion.png").is_file()
