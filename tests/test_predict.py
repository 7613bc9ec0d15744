"""qcs_jax.predict and qcs_jax.apps (faces, batch): photos, folders, videos, problems, CLI."""
import csv
import json

import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image

from qcs_jax.apps import predict_files, throughput
from qcs_jax.cli import predict
from qcs_jax.model_files import model_dir as checkpoint
from qcs_jax.apps import faces
from qcs_jax.data import synthetic, transforms
from qcs_jax.models import build_model

TINY = dict(name="qcs", csa="sd", num_classes=7, img_size=32, stage_channels=(8, 8, 16),
            stage_units=(1, 1, 1), embed_dim=16, num_heads=2, base_depth=1, cross_depth=1)
NAMES = list(synthetic.CLASS_NAMES)
BATCH = 4


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
  model = build_model(TINY)
  variables = throughput.random_variables(model, 32, seed=2, inference_only=False)
  path = checkpoint.save_variables(tmp_path_factory.mktemp("ckpt") / "model", variables, TINY,
                                   extra={"class_names": NAMES})
  return checkpoint.load_model(path)


def _hand_probs(loaded, crops):
  """Softmax of the model on the eval-transformed crops (one padded batch)."""
  tf = transforms.build_transform(None, 32, train=False)
  x = np.zeros((BATCH, 32, 32, 3), np.float32)
  for i, c in enumerate(crops):
    tf(c, None, out=x[i])
  z = np.asarray(loaded.logits(x), np.float64)[:len(crops)]
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _collect():
  msgs = []
  return msgs, msgs.append


def test_no_detect_folder_of_synthetic_faces(loaded, tmp_path):
  imgs = [synthetic.render_face(e, 48, seed=e) for e in range(6)]  # 6 faces: 2 batches of 4
  (tmp_path / "sub").mkdir()
  files = [tmp_path / "sub" / f"face{i}.png" if i % 2 else tmp_path / f"face{i}.png"
           for i in range(6)]
  for im, f in zip(imgs, files):
    Image.fromarray(im).save(f)
  (tmp_path / "notes.txt").write_text("not a picture")  # ignored inside folders
  msgs, report = _collect()
  rows = predict_files.predict_paths([str(tmp_path)], loaded, detect=False, batch_size=BATCH,
                               on_problem=report)
  assert msgs == []
  order = [0, 2, 4, 1, 3, 5]  # files of the folder first, then sub/
  assert [r["file"] for r in rows] == [str(files[i]) for i in order]
  expected = _hand_probs(loaded, [imgs[i] for i in order[:4]])
  expected = np.concatenate([expected, _hand_probs(loaded, [imgs[i] for i in order[4:]])])
  for r, p in zip(rows, expected):
    assert r["box"] == [0, 0, 48, 48] and r["frame"] is None and r["time"] is None
    got = np.array([r["probabilities"][n] for n in NAMES])
    np.testing.assert_allclose(got, p, atol=2e-6)
    assert r["label"] == NAMES[int(np.argmax(p))] and r["score"] == pytest.approx(p.max(),
                                                                                  abs=1e-6)


def test_detects_the_astronaut_face_and_annotates(loaded, tmp_path):
  path = tmp_path / "astronaut.png"
  image = skimage.data.astronaut()
  Image.fromarray(image).save(path)
  rows = predict_files.predict_paths([str(path)], loaded, batch_size=BATCH, detector="haar",
                               annotate_dir=str(tmp_path / "ann"))
  assert len(rows) == 1
  x, y, w, h = rows[0]["box"]
  # Her face spans about x 175..270, y 65..160 of the 512x512 picture.
  assert 150 <= x and x + w <= 290 and 20 <= y and y + h <= 190 and 60 <= w <= 130
  assert 190 <= x + w / 2 <= 250 and 90 <= y + h / 2 <= 140
  crop = faces.face_crop(image, faces.Box(x, y, w, h), 0.25)
  assert crop.shape == (round(1.5 * w), round(1.5 * w), 3)
  np.testing.assert_allclose([rows[0]["probabilities"][n] for n in NAMES],
                             _hand_probs(loaded, [crop])[0], atol=2e-6)
  ann = np.asarray(Image.open(tmp_path / "ann" / "astronaut.jpg"))
  assert ann.shape == image.shape
  green = (ann[..., 1] > 200) & (ann[..., 0] < 80) & (ann[..., 2] < 80)
  assert green[y:y + h, x].mean() > 0.8  # the box's left edge is drawn
  assert not green[300:, :].any()        # nothing drawn far from the face


def test_square_crop_pads_outside_the_image():
  img = np.full((50, 60, 3), 200, np.uint8)
  box = faces.square_crop_box(faces.Box(40, 0, 20, 10), 0.5)
  assert box == faces.Box(30, -15, 40, 40)
  c = faces.crop(img, box)
  assert c.shape == (40, 40, 3)
  assert (c[:15] == 0).all() and (c[15:, 30:] == 0).all() and (c[15:, :30] == 200).all()


def test_problems_are_reported_and_skipped(loaded, tmp_path):
  Image.fromarray(skimage.data.chelsea()).save(tmp_path / "cat.jpg")  # a cat: no human face
  (tmp_path / "broken.jpg").write_bytes(b"this is not a JPEG")
  Image.fromarray(synthetic.render_face(3, 24)).save(tmp_path / "tiny.png")
  Image.fromarray(synthetic.render_face(3, 48)).save(tmp_path / "ok.png")
  paths = [str(tmp_path / n) for n in ("cat.jpg", "broken.jpg", "tiny.png", "ok.png")]
  msgs, report = _collect()
  rows = predict_files.predict_paths(paths[:3] + [str(tmp_path / "missing.png")], loaded,
                               detect=True, batch_size=BATCH, on_problem=report)
  assert rows == [] and len(msgs) == 4
  text = "\n".join(msgs)
  assert f"{paths[0]}: no face found" in text
  assert f"{paths[1]}: not an image" in text
  assert f"{paths[2]}: image is 24x24 pixels, smaller than --min_face 40" in text
  assert f"{tmp_path / 'missing.png'}: no such file or folder" in text
  msgs, report = _collect()
  rows = predict_files.predict_paths(paths, loaded, detect=False, batch_size=BATCH,
                               on_problem=report)
  assert [r["file"] for r in rows] == [paths[0], paths[3]]  # no detection: the cat is a "face"
  assert len(msgs) == 2 and "not an image" in msgs[0] and "24x24" in msgs[1]


def test_synthetic_face_is_detected(loaded, tmp_path):
  face = synthetic.render_face(0, 112, seed=0)
  canvas = np.full((200, 260, 3), 90, np.uint8)
  canvas[40:152, 100:212] = face
  Image.fromarray(canvas).save(tmp_path / "scene.png")
  rows = predict_files.predict_paths([str(tmp_path / "scene.png")], loaded, batch_size=BATCH,
                               detector="haar")
  assert len(rows) == 1
  x, y, w, h = rows[0]["box"]
  assert 100 <= x and x + w <= 212 and 40 <= y and y + h <= 152 and w >= 40


def _write_video(path, frames, fps, fourcc):
  h, w = frames[0].shape[:2]
  out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
  assert out.isOpened()
  for f in frames:
    out.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
  out.release()


def test_video_rows_per_sampled_frame_with_timestamps(loaded, tmp_path):
  face = synthetic.render_face(0, 112, seed=0)
  blank = np.full_like(face, 128)
  frames = [face, face, face, face, blank, blank, face]  # frames 4, 5 hold no face
  _write_video(tmp_path / "clip.avi", frames, 10.0, "MJPG")
  msgs, report = _collect()
  rows = predict_files.predict_paths([str(tmp_path / "clip.avi")], loaded, every=2, detector="haar",
                               batch_size=BATCH, on_problem=report,
                               annotate_dir=str(tmp_path / "ann"))
  assert [(r["frame"], r["time"]) for r in rows] == [(0, 0.0), (2, 0.2), (6, 0.6)]
  for r in rows:
    x, y, w, h = r["box"]
    assert 10 <= x <= 40 and 10 <= y <= 40 and 50 <= w <= 90
  assert msgs == [f"{tmp_path / 'clip.avi'}: 1 of 4 sampled frames gave no prediction "
                  f"(first: frame 4: no face found (faces smaller than --min_face 40 px are "
                  f"not searched; use --no-detect for an already cropped face))"]
  assert sorted(p.name for p in (tmp_path / "ann").iterdir()) == [
      "clip_frame000000.jpg", "clip_frame000002.jpg", "clip_frame000006.jpg"]
  _write_video(tmp_path / "clip.mp4", frames[:3], 25.0, "mp4v")
  rows = predict_files.predict_paths([str(tmp_path / "clip.mp4")], loaded, detect=False,
                               batch_size=BATCH)
  assert [(r["frame"], r["time"]) for r in rows] == [(0, 0.0), (1, 0.04), (2, 0.08)]
  msgs, report = _collect()
  (tmp_path / "fake.mp4").write_bytes(b"\x00" * 100)
  assert predict_files.predict_paths([str(tmp_path / "fake.mp4")], loaded, on_problem=report) == []
  assert len(msgs) == 1 and str(tmp_path / "fake.mp4") in msgs[0]


def test_cli_csv_jsonl_and_exit_status(loaded, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(checkpoint, "load_model", lambda path, **kw: loaded)
  for i in range(2):
    Image.fromarray(synthetic.render_face(i, 48, seed=i)).save(tmp_path / f"f{i}.png")
  out = tmp_path / "preds.csv"
  assert predict.main(["--checkpoint", "ck", str(tmp_path), "--no-detect", "--output",
                       str(out), "--batch_size", str(BATCH)]) == 0
  with open(out, newline="") as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == (["file", "frame", "time", "face", "x", "y", "w", "h", "label",
                            "score"] + [f"p_{n}" for n in NAMES])
  assert [r["file"] for r in rows] == [str(tmp_path / "f0.png"), str(tmp_path / "f1.png")]
  assert rows[0]["frame"] == "" and rows[0]["w"] == "48"
  assert sum(float(rows[0][f"p_{n}"]) for n in NAMES) == pytest.approx(1.0, abs=1e-5)
  capsys.readouterr()
  assert predict.main(["--checkpoint", "ck", str(tmp_path / "f0.png"), "--no-detect",
                       "--batch_size", str(BATCH)]) == 0
  row = json.loads(capsys.readouterr().out)
  assert row["file"] == str(tmp_path / "f0.png") and set(row["probabilities"]) == set(NAMES)
  (tmp_path / "bad.png").write_bytes(b"junk")
  assert predict.main(["--checkpoint", "ck", str(tmp_path / "bad.png")]) == 1
  err = capsys.readouterr().err
  assert "bad.png: not an image" in err and "nothing could be classified" in err


def test_format_rows_rejects_unknown_format():
  with pytest.raises(ValueError, match="format must be one of"):
    predict.format_rows([], "xml", NAMES)


def test_benchmark_reports_positive_rates():
  res = throughput.benchmark(dict(TINY), batch_sizes=(2,), min_seconds=0.0, min_iters=2)
  assert [r["batch_size"] for r in res] == [2] and res[0]["iterations"] >= 2
  assert res[0]["images_per_sec"] == pytest.approx(2000 / res[0]["ms_per_batch"])
