"""The web demo in a real browser: headless Chromium (Debian's) driven by Selenium.

Starts `python -m qcs_jax.cli.demo --port 0` (the embedded demo model) on 127.0.0.1,
loads the page, uploads photos, waits for the answer and checks what a person
would see. Screenshots go to $QCS_TEST_ARTIFACTS (default: pytest's tmp dir).
Skipped only where chromium or chromedriver is not installed (.ci/run installs both).
"""
import base64
import io
import os
import pathlib
import queue
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import skimage.data
from PIL import Image

from qcs_jax.data import synthetic

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
MISSING = ("needs Debian's chromium and chromium-driver (apt-get install chromium "
           "chromium-driver; .ci/run installs them)")
if os.environ.get("CI") and not (CHROMIUM and DRIVER):  # CI must really run it
  raise RuntimeError(f"CI run without a browser: {MISSING}")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason=MISSING)
START_TIMEOUT_S = 300  # a loaded 2-core machine compiles the demo model slowly
ANSWER_TIMEOUT_S = 120
LABEL = re.compile(r"^Face 1: (%s) \(\d+\.\d%%\)$" % "|".join(synthetic.CLASS_NAMES))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
  d = os.environ.get("QCS_TEST_ARTIFACTS")
  path = pathlib.Path(d) if d else tmp_path_factory.mktemp("artifacts")
  path.mkdir(parents=True, exist_ok=True)
  return path


@pytest.fixture(scope="module")
def demo_url():
  proc = subprocess.Popen([sys.executable, "-m", "qcs_jax.cli.demo", "--port", "0"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=pathlib.Path(__file__).parent.parent)
  lines: queue.Queue = queue.Queue()
  threading.Thread(target=lambda: [lines.put(l) for l in proc.stdout], daemon=True).start()
  seen, url, deadline = [], None, time.monotonic() + START_TIMEOUT_S
  while url is None and time.monotonic() < deadline and proc.poll() is None:
    try:
      line = lines.get(timeout=1.0)
    except queue.Empty:
      continue
    seen.append(line)
    m = re.search(r"http://127\.0\.0\.1:\d+/", line)
    url = m.group(0) if m else None
  try:
    assert url, f"the demo did not start within {START_TIMEOUT_S} s: {''.join(seen)[-2000:]}"
    yield url
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
      proc.kill()


@pytest.fixture(scope="module")
def browser():
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  opts = webdriver.ChromeOptions()
  opts.binary_location = CHROMIUM
  for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
            "--window-size=1280,1000"):
    opts.add_argument(a)
  drv = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
  drv.set_page_load_timeout(60)
  yield drv
  drv.quit()


def _open(browser, url):
  from selenium.webdriver.support.ui import WebDriverWait
  browser.get(url)
  WebDriverWait(browser, 30).until(lambda d: "Classes:" in d.find_element("id", "model").text)
  return browser


def _upload(browser, path, whole=False):
  """Chooses the file, clicks Recognise; returns the answer ('ok') or the message shown."""
  from selenium.webdriver.support.ui import WebDriverWait
  browser.find_element("id", "file").send_keys(str(path))
  box = browser.find_element("id", "whole")
  if box.is_selected() != whole:
    box.click()
  browser.find_element("id", "run").click()

  def done(d):
    msg = d.find_element("id", "message")
    if "error" in msg.get_attribute("class"):
      return msg.text
    return "ok" if d.find_elements("css selector", ".face-label") else False

  return WebDriverWait(browser, ANSWER_TIMEOUT_S).until(done)


def test_photo_gives_boxes_labels_and_bars(demo_url, browser, artifacts, tmp_path):
  photo = skimage.data.astronaut()
  path = tmp_path / "astronaut.png"
  Image.fromarray(photo).save(path)
  _open(browser, demo_url)
  assert "embedded demo model" in browser.find_element("id", "model").text
  assert _upload(browser, path) == "ok"
  labels = [e.text for e in browser.find_elements("css selector", ".face-label")]
  assert len(labels) == 1 and LABEL.match(labels[0]), labels
  # The bar chart: one bar per class, widths = probabilities (sum 100%), the top one marked.
  rows = browser.find_elements("css selector", ".face .bar-row")
  assert [r.find_element("css selector", ".bar-name").text for r in rows] == list(
      synthetic.CLASS_NAMES)
  values = [float(r.find_element("css selector", ".bar-value").text.rstrip("%")) for r in rows]
  assert abs(sum(values) - 100) < 0.5
  top = browser.find_element("css selector", ".bar-row.top .bar-name").text
  assert labels[0].startswith(f"Face 1: {top} ")
  # The annotated image as the page shows it: the photo with a green box around her face.
  img = browser.find_element("id", "annotated")
  assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth",
                                img) == 512
  data = base64.b64decode(img.get_attribute("src").split(",", 1)[1])
  shown = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
  green = (shown[..., 1] > 180) & (shown[..., 0] < 110) & (shown[..., 2] < 110)
  changed = np.abs(shown - photo).sum(-1) > 120
  ys, xs = np.nonzero(green & changed)
  assert len(xs) > 200  # box outline and label background
  assert 140 <= np.median(xs) <= 300 and 20 <= np.median(ys) <= 200  # around her face
  shot = artifacts / "demo_astronaut.png"
  browser.save_screenshot(str(shot))
  assert Image.open(shot).size[0] >= 1000


def test_one_cropped_face_without_detection(demo_url, browser, tmp_path):
  path = tmp_path / "face.png"
  Image.fromarray(synthetic.render_face("Happiness", 96, seed=1)).save(path)
  _open(browser, demo_url)
  assert _upload(browser, path, whole=True) == "ok"
  assert LABEL.match(browser.find_element("css selector", ".face-label").text)


@pytest.mark.parametrize("name, content, message", [
    ("notes.txt", b"this is not a photo", "not an image"),
    ("empty.jpg", b"", "empty"),
    ("huge.png", "pixels", "megapixels"),
    ("big.jpg", "bytes", "the limit is 10 MB"),
    ("sky.png", "sky", "no face found"),
])
def test_bad_uploads_show_a_message(demo_url, browser, artifacts, tmp_path, name, content,
                                    message):
  path = tmp_path / name
  if content == "pixels":  # 48 megapixels of black, a small file
    Image.new("L", (8000, 6000)).save(path, optimize=True)
  elif content == "bytes":  # 11 MB
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 11 << 20, np.uint8).tobytes())
  elif content == "sky":
    Image.fromarray(np.full((200, 300, 3), (120, 160, 220), np.uint8)).save(path)
  else:
    path.write_bytes(content)
  _open(browser, demo_url)
  shown = _upload(browser, path)
  assert shown != "ok" and message in shown, shown
  assert not browser.find_elements("css selector", ".face-label")
  if name == "notes.txt":
    browser.save_screenshot(str(artifacts / "demo_bad_upload.png"))
