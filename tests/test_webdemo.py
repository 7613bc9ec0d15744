"""qcs_jax.apps.webdemo and qcs_jax.cli.demo without a browser: the server, uploads, the adapter."""
import base64
import hashlib
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
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


def _fake_analyse(calls):
  def analyse(image, detect):
    calls.append((image.shape, detect))
    if image.shape[0] == 7:  # a "photo without faces"
      return []
    return [{"box": [2, 3, 20, 20], "label": "Fear", "score": 0.6,
             "probabilities": {"Fear": 0.6, "Anger": 0.4}}]
  return analyse


def _start(analyse, **limits):
  limits = dict(dict(max_bytes=200_000, max_pixels=1_000_000), **limits)
  app = webdemo.DemoApp(analyse, {"description": "fake", "class_names": ["Fear", "Anger"]},
                        **limits)
  srv = webdemo.make_server(app, "127.0.0.1", 0)
  threading.Thread(target=srv.serve_forever, kwargs=dict(poll_interval=0.05),
                   daemon=True).start()
  return srv, app


@pytest.fixture()
def serve():
  """serve(analyse, **DemoApp limits) -> (server, app); every server is shut down after."""
  servers = []

  def start(analyse, **limits):
    srv, app = _start(analyse, **limits)
    servers.append(srv)
    return srv, app

  yield start
  for srv in servers:
    srv.shutdown()
    srv.server_close()


@pytest.fixture()
def server(serve):
  calls = []
  srv, _ = serve(_fake_analyse(calls))
  yield f"http://127.0.0.1:{srv.server_address[1]}", calls


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


def test_recognize_adapter_matches_predict(tmp_path, monkeypatch):
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
  from qcs_jax import Recognizer
  from qcs_jax.apps import detectors, faces
  # A photo of 40 faces (largest first, as detectors give them): only the 3 largest
  # reach the model.
  many = [detectors.Detection(faces.Box(10 * k, 0, 200 - k, 200 - k)) for k in range(40)]
  rec = Recognizer(loaded, detector=lambda image: list(many))
  seen = []
  classify = rec.classify
  monkeypatch.setattr(rec, "classify", lambda crops: seen.append(len(crops)) or classify(crops))
  assert [r["box"] for r in demo.recognize(rec, photo, max_faces=3)] == [
      list(d.box.as_tuple()) for d in many[:3]]
  assert seen == [3]


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


# ------------------------------------------------------------------ the server under attack
# A real server on 127.0.0.1 (an ephemeral port), raw sockets where urllib would not send
# the request; every wait is bounded.
def _raw(port: int, data: bytes, timeout: float = 10.0, close_write: bool = False) -> bytes:
  """Sends `data`, returns everything the server sent until it closed (or `timeout`)."""
  with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
    s.sendall(data)
    if close_write:
      s.shutdown(socket.SHUT_WR)
    return _read_all(s, timeout)


def _read_all(s: socket.socket, timeout: float) -> bytes:
  out, deadline = b"", time.monotonic() + timeout
  while time.monotonic() < deadline:
    s.settimeout(max(0.01, deadline - time.monotonic()))
    try:
      chunk = s.recv(65536)
    except (TimeoutError, ConnectionResetError):
      break
    if not chunk:
      break
    out += chunk
  return out


def _status(answer: bytes) -> int:
  m = re.match(rb"HTTP/1\.[01] (\d{3}) ", answer)
  assert m, answer[:200]
  return int(m.group(1))


def _body(answer: bytes) -> dict:
  return json.loads(answer.split(b"\r\n\r\n", 1)[1])


def _port(srv) -> int:
  return srv.server_address[1]


@pytest.mark.parametrize("headers, status, said", [
    (b"Content-Length: -1\r\n", 400, "non-negative whole number"),
    (b"Content-Length: abc\r\n", 400, "non-negative whole number"),
    (b"Content-Length: 1e3\r\n", 400, "non-negative whole number"),
    (b"Content-Length: +5\r\n", 400, "non-negative whole number"),
    (b"", 411, "Content-Length header is required"),
    (b"Transfer-Encoding: chunked\r\n", 411, "chunked"),
    (b"Content-Length: 5\r\nContent-Length: 6\r\n", 400, "conflicting"),
])
def test_content_length_is_parsed_strictly(serve, headers, status, said):
  calls = []
  srv, _ = serve(_fake_analyse(calls))
  t0 = time.monotonic()
  ans = _raw(_port(srv), b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%s\r\nhello"
             % (_port(srv), headers))
  assert time.monotonic() - t0 < 5  # answered at once, not after reading "the whole body"
  assert _status(ans) == status and said in _body(ans)["error"]
  assert calls == []


@pytest.mark.parametrize("line, status", [
    (b"HELLO\r\n\r\n", 400), (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
    (b"GET / HTTP/9.9\r\n\r\n", 505), (b"BREW /pot HTTP/1.1\r\n\r\n", 501),
])
def test_garbage_request_lines_get_a_status_line(serve, line, status):
  srv, _ = serve(_fake_analyse([]))
  ans = _raw(_port(srv), line)
  assert _status(ans) == status and "error" in _body(ans)


def test_half_sent_requests_time_out(serve):
  """A body that stops and headers trickled below the recv timeout are both cut off."""
  srv, _ = serve(_fake_analyse([]), io_timeout_s=0.5, request_timeout_s=1.5)
  host = b"Host: 127.0.0.1:%d\r\n" % _port(srv)
  t0 = time.monotonic()
  ans = _raw(_port(srv), b"POST /api/predict HTTP/1.1\r\n" + host
             + b"Content-Length: 1000\r\n\r\nonly this", timeout=10)
  assert _status(ans) == 408 and time.monotonic() - t0 < 3
  with socket.create_connection(("127.0.0.1", _port(srv)), timeout=10) as s:
    t0 = time.monotonic()
    s.sendall(b"GET / HTTP/1.1\r\n" + host)
    closed = False
    for _ in range(40):  # one header byte every 0.2 s: each recv is in time, the sum is not
      try:
        s.sendall(b"X")
      except OSError:
        closed = True
        break
      s.settimeout(0.2)
      try:
        if s.recv(1024) == b"":
          closed = True
          break
      except TimeoutError:
        pass
    assert closed and time.monotonic() - t0 < 4, time.monotonic() - t0


def test_connections_over_the_thread_cap_get_503(serve):
  srv, _ = serve(_fake_analyse([]), max_threads=2, io_timeout_s=5, request_timeout_s=5)
  idle = [socket.create_connection(("127.0.0.1", _port(srv)), timeout=10) for _ in range(2)]
  try:
    time.sleep(0.2)  # both are accepted and hold their threads
    with socket.create_connection(("127.0.0.1", _port(srv)), timeout=10) as s:
      ans = _read_all(s, 5)
    assert _status(ans) == 503 and "busy" in _body(ans)["error"] and srv.refused == 1
  finally:
    for s in idle:
      s.close()
  for _ in range(50):  # the slots come back once those connections end
    ans = _raw(_port(srv), b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % _port(srv))
    if _status(ans) == 200:
      break
    time.sleep(0.1)
  assert _status(ans) == 200


def _blocking_analyse(started: threading.Event, release: threading.Event):
  def analyse(image, detect):
    started.set()
    assert release.wait(10)
    return _fake_analyse([])(image, detect)
  return analyse


def _post_in_thread(url, data, results):
  t = threading.Thread(target=lambda: results.append(_post(url, data)), daemon=True)
  t.start()
  return t


def test_pixels_decoded_at_once_are_capped(serve):
  started, release = threading.Event(), threading.Event()
  photo = _png(np.full((100, 100, 3), 90, np.uint8))  # 10,000 pixels
  srv, app = serve(_blocking_analyse(started, release), pixel_budget=15_000,
                   busy_timeout_s=0.3)
  url = f"http://127.0.0.1:{_port(srv)}/api/predict?detect=0"
  first = []
  t = _post_in_thread(url, photo, first)
  assert started.wait(10)
  assert app.budget.in_use == 10_000
  t0 = time.monotonic()
  assert _post(url, photo) == (503, {"error": "the demo is busy; try again in a moment"})
  assert 0.25 < time.monotonic() - t0 < 3
  release.set()
  t.join(10)
  assert first[0][0] == 200 and app.budget.peak == 10_000 and app.budget.in_use == 0
  assert _post(url, photo)[0] == 200  # room again


def test_a_request_waits_for_the_model_only_so_long(serve):
  started, release = threading.Event(), threading.Event()
  srv, _ = serve(_blocking_analyse(started, release), busy_timeout_s=0.3)
  url = f"http://127.0.0.1:{_port(srv)}/api/predict?detect=0"
  photo, first = _png(np.full((20, 20, 3), 90, np.uint8)), []
  t = _post_in_thread(url, photo, first)
  assert started.wait(10)
  t0 = time.monotonic()
  code, ans = _post(url, photo)
  assert code == 503 and 0.25 < time.monotonic() - t0 < 3
  release.set()
  t.join(10)
  assert first[0][0] == 200


def test_faces_per_photo_are_capped(serve):
  many = [{"box": [i, i, 5, 5], "label": "Fear", "score": 0.6,
           "probabilities": {"Fear": 0.6, "Anger": 0.4}} for i in range(50)]
  srv, _ = serve(lambda image, detect: many, max_faces=4)
  code, ans = _post(f"http://127.0.0.1:{_port(srv)}/api/predict?detect=0",
                    _png(np.zeros((60, 60, 3), np.uint8)))
  assert code == 200 and [f["box"][0] for f in ans["faces"]] == [0, 1, 2, 3]
  assert ans["max_faces"] == 4


def test_failures_give_a_generic_message_and_log_the_details(serve, caplog):
  def broken(image, detect):
    raise RuntimeError("cannot write /tmp/secret-dir/annotated.png")
  srv, _ = serve(broken)
  with caplog.at_level(logging.ERROR, logger="qcs_jax.apps.webdemo"):
    code, ans = _post(f"http://127.0.0.1:{_port(srv)}/api/predict?detect=0",
                      _png(np.zeros((20, 20, 3), np.uint8)))
  assert code == 500 and "/tmp" not in ans["error"] and "RuntimeError" not in ans["error"]
  assert "server's log" in ans["error"]
  assert any("secret-dir" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


def test_an_image_the_encoder_cannot_answer_is_refused_before_the_model(serve):
  calls = []
  srv, _ = serve(_fake_analyse(calls))
  code, ans = _post(f"http://127.0.0.1:{_port(srv)}/api/predict?detect=0",
                    _png(np.zeros((1, 66_000, 3), np.uint8)))
  assert code == 400 and "longest side may be at most 65500" in ans["error"] and calls == []


@pytest.mark.parametrize("host, origin, status", [
    ("127.0.0.1:{port}", None, 200), ("localhost:{port}", None, 200),
    ("127.0.0.1:{port}", "http://127.0.0.1:{port}", 200),
    ("evil.example:{port}", None, 421), ("evil.example", None, 421),
    ("127.0.0.1:{other}", None, 421), (None, None, 421), ("127.0.0.1:{port}@evil", None, 421),
    ("127.0.0.1:{port}", "http://evil.example", 403),
    ("127.0.0.1:{port}", "http://evil.example:{port}", 403),
    ("127.0.0.1:{port}", "null", 403),
])
def test_host_and_origin_must_name_this_server(serve, host, origin, status):
  srv, _ = serve(_fake_analyse([]))
  port = _port(srv)
  fill = dict(port=port, other=port + 1 if port < 65535 else port - 1)
  head = b"GET /api/info HTTP/1.1\r\n"
  if host is not None:
    head += b"Host: " + host.format(**fill).encode() + b"\r\n"
  if origin is not None:
    head += b"Origin: " + origin.format(**fill).encode() + b"\r\n"
  assert _status(_raw(port, head + b"\r\n")) == status


def test_host_policy_of_a_wildcard_bind():
  from qcs_jax.apps.http_guard import HostPolicy
  p = HostPolicy("0.0.0.0", 7860, extra=("demo.lan",))
  assert p.allows_host("192.168.1.5:7860") and p.allows_host("[fe80::1]:7860")
  assert p.allows_host("demo.lan:7860") and not p.allows_host("evil.example:7860")
  assert p.allows_host("localhost:7860") and p.allows_host(f"{socket.gethostname()}:7860")
  assert not p.allows_host("192.168.1.5:80") and not HostPolicy("10.0.0.2", 80).allows_host(
      "localhost")


def test_every_answer_carries_the_security_headers(serve):
  srv, _ = serve(_fake_analyse([]))
  with urllib.request.urlopen(f"http://127.0.0.1:{_port(srv)}/", timeout=30) as r:
    page, h = r.read().decode(), r.headers
  assert h["X-Content-Type-Options"] == "nosniff" and h["X-Frame-Options"] == "DENY"
  csp = h["Content-Security-Policy"]
  assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
  script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
  digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
  assert f"script-src 'sha256-{digest}'" in csp  # the page's own script, nothing else
  assert not re.search(r"\sstyle=|\son[a-z]+=", page)  # no inline attribute CSP would block
  garbage = _raw(_port(srv), b"HELLO\r\n\r\n")
  assert b"\r\nX-Content-Type-Options: nosniff\r\n" in garbage


def test_load_tool_drives_the_real_demo_program(tmp_path):
  """tools/load_test_demo.py starts `python -m qcs_jax.cli.demo` (the program, the
  embedded model) and reports; a stale module name there ended in 'the demo did not start'."""
  tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "tools", "load_test_demo.py")
  done = subprocess.run([sys.executable, tool, "--seconds", "4", "--good", "1",
                         "--hostile", "2"], capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  report = json.loads(done.stdout)
  assert report["server"] == "demo" and report["good_answered_200"] >= 1
  hostile = {k: v for k, v in report["statuses"].items() if k != "good"}
  assert hostile and not any("200" in v for v in hostile.values()), report["statuses"]
  assert report["threads_left"] == 0
