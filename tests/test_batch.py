"""Folder/video prediction: faces batched across frames, read-ahead thread, CLI options."""
import json
import threading
import time

import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image

from qcs_jax import Recognizer
from qcs_jax.apps import annotate, media, predict_files as batch, recognizer, user_images
from qcs_jax.cli import predict
from qcs_jax.model_files import model_dir as checkpoint
from qcs_jax.apps.throughput import random_variables
from qcs_jax.data.video import VideoFrames
from qcs_jax.data import synthetic
from qcs_jax.models import build_model

TINY = dict(name="qcs", csa="sd", num_classes=7, img_size=32, stage_channels=(8, 8, 16),
            stage_units=(1, 1, 1), embed_dim=16, num_heads=2, base_depth=1, cross_depth=1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  model = build_model(TINY)
  variables = random_variables(model, 32, seed=4, inference_only=False)
  return checkpoint.save_variables(tmp_path_factory.mktemp("b") / "m", variables, TINY,
                                   extra={"class_names": list(synthetic.CLASS_NAMES)})


class _Counting:
  """A loaded model whose logits calls are recorded (batch sizes)."""

  def __init__(self, loaded):
    self.loaded, self.calls = loaded, []
    self.model_cfg, self.class_names = loaded.model_cfg, loaded.class_names

  def logits(self, x):
    self.calls.append(len(x))
    return self.loaded.logits(x)


def test_video_faces_are_batched_across_frames(ckpt, tmp_path):
  face = synthetic.render_face(0, 112, seed=0)
  path = tmp_path / "clip.avi"
  out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (112, 112))
  for _ in range(7):
    out.write(cv2.cvtColor(face, cv2.COLOR_RGB2BGR))
  out.release()
  model = _Counting(checkpoint.load_model(ckpt))
  rec = Recognizer(model, detector="haar", max_batch=4)
  rows = batch.predict_paths([str(path)], rec, detect=False)
  assert [r["frame"] for r in rows] == list(range(7))
  assert model.calls == [4, 4]  # 4 frames, then 3 padded to 4: not one call per frame
  single = rec.predict_faces(rec_frames := [f for _, _, f in VideoFrames(str(path))])
  assert len(rec_frames) == 7
  for r, s in zip(rows, single):
    assert r["label"] == s["label"] and r["score"] == pytest.approx(s["score"], abs=1e-5)


def test_damaged_video_keeps_its_good_frames_and_names_the_frame(ckpt, tmp_path):
  """A video whose frames stop decoding halfway: the earlier frames are predicted,
  one line names the frame, and the photo after it is unaffected."""
  face = synthetic.render_face(0, 112, seed=0)
  path = tmp_path / "a_clip.avi"
  out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (112, 112))
  for k in range(20):
    out.write(cv2.cvtColor(synthetic.render_face(k % 7, 112, seed=k), cv2.COLOR_RGB2BGR))
  out.release()
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  Image.fromarray(face).save(tmp_path / "b_photo.png")
  problems: list[str] = []
  rows = batch.predict_paths([str(tmp_path)], checkpoint.load_model(ckpt), detect=False,
                             on_problem=problems.append)
  frames = [r["frame"] for r in rows if r["file"] == str(path)]
  assert 0 < len(frames) < 18 and frames == list(range(len(frames)))
  assert [r["file"] for r in rows if r["frame"] is None] == [str(tmp_path / "b_photo.png")]
  assert problems == [f"{path}: frame {len(frames)} of 20 could not be decoded; the remaining "
                      f"{20 - len(frames)} frames were skipped (damaged or truncated file)"]


def test_read_ahead_overlaps_and_propagates_errors():
  seen = []

  def slow():
    for i in range(4):
      seen.append((i, threading.current_thread().name))
      time.sleep(0.05)
      yield i

  t0 = time.perf_counter()
  out = []
  for i in media.read_ahead(slow(), depth=2):
    time.sleep(0.05)  # the consumer's work overlaps the producer's
    out.append(i)
  assert out == [0, 1, 2, 3] and time.perf_counter() - t0 < 0.38
  assert all(name == "qcs-read-ahead" for _, name in seen)

  def failing():
    yield 1
    raise OSError("disk gone")

  it = media.read_ahead(failing())
  assert next(it) == 1
  with pytest.raises(OSError, match="disk gone"):
    next(it)
  early = media.read_ahead(iter(range(1000)), depth=1)
  assert next(early) == 0
  early.close()  # stops the thread without hanging


def test_cli_detector_choice_landmarks_and_no_cache(ckpt, tmp_path, capsys):
  Image.fromarray(skimage.data.astronaut()).save(tmp_path / "a.jpg")
  assert predict.main(["--checkpoint", str(ckpt), str(tmp_path / "a.jpg"), "--detector",
                       "haar", "--no-cache"]) == 0
  row = json.loads(capsys.readouterr().out)
  assert row["landmarks"] is None and row["detection_score"] is None
  x, y, w, h = row["box"]
  assert 150 <= x and x + w <= 290 and 20 <= y and y + h <= 190
  with pytest.raises(SystemExit):
    predict.main(["--checkpoint", str(ckpt), str(tmp_path / "a.jpg"), "--detector", "yolo"])
  assert "invalid choice: 'yolo'" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    predict.main(["--checkpoint", str(ckpt), str(tmp_path / "a.jpg"), "--every", "0"])
  assert "--every must be >= 1" in capsys.readouterr().err
  assert predict.main(["--checkpoint", str(tmp_path / "nothing"), str(tmp_path / "a.jpg")]) == 2
  assert "error:" in capsys.readouterr().err


def test_old_predict_helpers_still_work(ckpt, tmp_path):
  """Callers of the old predict module (demo, export, visualize) keep working."""
  loaded = checkpoint.load_model(ckpt)
  assert recognizer.class_names_of(loaded) == list(synthetic.CLASS_NAMES)
  done = []
  clf = batch.BatchedClassifier(loaded, 2, on_done=done.append)
  faces_ = [synthetic.render_face(e, 40 + 8 * e, seed=e) for e in range(3)]
  rows = [{"i": i} for i in range(3)]
  for f, r in zip(faces_, rows):
    clf.add(f, r)
  clf.flush()
  assert [len(d) for d in done] == [2, 1]
  ref = Recognizer(loaded, detector="haar").predict_faces(faces_)
  for r, s in zip(rows, ref):
    assert r["label"] == s["label"] and r["score"] == pytest.approx(s["score"], abs=1e-5)
  # read_image and draw_annotations still do their jobs through their modules.
  photo = faces_[2]
  Image.fromarray(photo).save(tmp_path / "f.png")
  np.testing.assert_array_equal(user_images.read_image(str(tmp_path / "f.png")), photo)
  canvas = np.zeros((60, 80, 3), np.uint8)
  out = annotate.draw_annotations(canvas, [{"box": [10, 20, 30, 25], "label": "Fear",
                                           "score": 0.5}], str(tmp_path / "a.png"))
  drawn = user_images.read_image(out)
  assert (drawn[20:45, 10] == [0, 255, 0]).all()        # the box's left edge, in green
  assert (drawn[20:45, 39] == [0, 255, 0]).all()        # and its right edge
  assert (drawn[22:43, 12:37] == 0).all() and (drawn[46:] == 0).all()  # not inside, not below
