"""qcs_jax.apps.webdemo and qcs_jax.demo without a browser: the server, uploads, the adapter."""
import io
import json
import re
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import skimage.data
from PIL import Image

from qcs_jax.apps import predict_files as predict, throughput
from qcs_jax.cli import demo
from qcs_jax.model_files import model_dir as checkpoint
from qcs_jax.apps import webdemo
from qcs_jax.data import synthetic
from qcs_jax.models import build_model

TINY = dict(name="qcs", csa="sd", num_classes=7, img_size=32, stage_channels=(8, 8, 16),
            stage_units=(1, 1, 1), embed_dim=16, num_heads=2, base_depth=1, cross_depth=1)
NAMES = list(synthetic.CLASS_NAMES)


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, "PNG")
  return buf.getvalue()


@pytest.fixture()
def server():
  calls = []

  def analyse(image, detect):
    calls.append((image.shape, detect))
    if image.shape[0] == 7:  # a "photo without faces"
      return []
    return [{"box": [2, 3, 20, 20], "label": "Fear", "score": 0.6,
             "probabilities": {"Fear": 0.6, "Anger": 0.4}}]

  app = webdemo.DemoApp(analyse, {"description": "fake", "class_names": ["Fear", "Anger"]},
                        max_bytes=200_000, max_pixels=1_000_000)
  srv = webdemo.make_server(app, "127.0.0.1", 0)
  threading.Thread(target=srv.serve_forever, daemon=True).start()
  yield f"http://127.0.0.1:{srv.server_address[1]}", calls
  srv.shutdown()
  srv.server_close()


def _post(url, data):
  try:
    with urllib.request.urlopen(urllib.request.Request(url, data=data, method="POST"),
                                timeout=30) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def test_page_is_self_contained(server):
  url, _ = server
  with urllib.request.urlopen(url + "/", timeout=30) as r:
    page = r.read().decode()
  assert 'type="file"' in page and "/api/predict" in page
  # Offline: no script, style, font or image from another host.
  assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page)
  assert not re.search(r"url\(\s*[\"']?(https?:)?//", page)
  with urllib.request.urlopen(url + "/api/info", timeout=30) as r:
    info = json.loads(r.read())
  assert info["class_names"] == ["Fear", "Anger"] and info["max_upload_bytes"] == 200_000


def test_predict_answers_faces_and_an_annotated_image(server):
  url, calls = server
  photo = np.full((40, 50, 3), 200, np.uint8)
  status, ans = _post(url + "/api/predict?detect=0", _png(photo))
  assert status == 200 and calls == [((40, 50, 3), False)]
  assert ans["faces"][0]["label"] == "Fear" and (ans["width"], ans["height"]) == (50, 40)
  assert ans["image"].startswith("data:image/jpeg;base64,")
  import base64
  img = np.asarray(Image.open(io.BytesIO(base64.b64decode(ans["image"].split(",", 1)[1]))))
  assert img.shape == (40, 50, 3)
  green = (img[..., 1] > 180) & (img[..., 0] < 120) & (img[..., 2] < 120)
  assert green[3:23, 2].mean() > 0.5  # the box's left edge is drawn in green
  _post(url + "/api/predict", _png(photo))
  assert calls[-1][1] is True  # detection is the default


@pytest.mark.parametrize("body, status, message", [
    (b"", 400, "empty"),
    (b"hello, I am not a picture", 400, "not an image"),
    (_png(np.zeros((1100, 1000, 3), np.uint8)), 400, "megapixels"),
    (b"x" * 300_000, 413, "the limit is 0.191 MB"),
    (_png(np.zeros((7, 9, 3), np.uint8)), 400, "no face found"),
])
def test_bad_uploads_get_a_message(server, body, status, message):
  url, _ = server
  code, ans = _post(url + "/api/predict", body)
  assert code == status and message in ans["error"]


def test_unknown_paths_are_404(server):
  url, _ = server
  assert _post(url + "/nope", b"x")[0] == 404
  with pytest.raises(urllib.error.HTTPError) as e:
    urllib.request.urlopen(url + "/nope", timeout=30)
  assert e.value.code == 404


def test_recognize_adapter_matches_predict(tmp_path):
  model = build_model(TINY)
  v = throughput.random_variables(model, 32, seed=5, inference_only=False)
  path = checkpoint.save_variables(tmp_path / "m", v, TINY, extra={"class_names": NAMES})
  loaded = checkpoint.load_model(path)
  photo = skimage.data.astronaut()
  rows = demo.recognize(loaded, photo)
  Image.fromarray(photo).save(tmp_path / "a.png")
  # The demo finds and aligns faces as qcs-predict does (one detector policy).
  want = predict.predict_paths([str(tmp_path / "a.png")], loaded, batch_size=4)
  assert len(rows) == len(want) == 1
  assert rows[0]["box"] == want[0]["box"] and rows[0]["label"] == want[0]["label"]
  for c in NAMES:
    assert rows[0]["probabilities"][c] == pytest.approx(want[0]["probabilities"][c], abs=1e-6)
  whole = demo.recognize(loaded, photo, detect=False)
  assert [r["box"] for r in whole] == [[0, 0, 512, 512]]


def test_demo_cli_refuses_a_missing_checkpoint(tmp_path, capsys):
  assert demo.main(["--checkpoint", str(tmp_path / "none"), "--port", "0"]) == 2
  assert capsys.readouterr().err.startswith("error: ")


def test_embedded_demo_model_is_trained():
  """The shipped model loads without a checkpoint and beats chance (1/7) on synthetic faces."""
  from qcs_jax.export import artefacts as export_lib
  model, description = demo.load(None)
  assert "embedded demo model" in description and model.class_names == NAMES
  assert model.model_cfg["img_size"] == 64
  x = export_lib.sample_faces(64, 70, seed=1000)
  accuracy = float(np.mean(np.asarray(model.logits(x)).argmax(-1) == np.arange(70) % 7))
  assert accuracy >= 0.25, accuracy
