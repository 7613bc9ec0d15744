"""The browser demo: a standard-library HTTP server and one self-contained HTML page.

Why not Gradio: it pulls ~40 packages, fetches fonts and front-end code from
CDNs unless configured otherwise and phones home for analytics; the demo needs
one page, one upload endpoint and no network, which http.server serves with
no dependency at all (and a plain page is easy to drive from a test browser).

  GET  /             the page (file upload, webcam snapshot, results)
  GET  /api/info     model description, class names, upload limits (JSON)
  POST /api/predict  body: the image file's bytes; ?detect=0 treats the photo
                     as one cropped face. 200 {faces, image (annotated JPEG as
                     a data URL), width, height}; 4xx {error} for a bad upload,
                     503 {error} (Retry-After) while the demo is busy.

Every request must carry a Host (and, from a browser, an Origin) naming this
server, a strict Content-Length on POST, and arrive within a deadline; the
limits (threads, pixels decoded at once, faces per photo, the wait for the
model) are DemoApp fields, the defences http_guard.py. Client messages are
generic; details of a failure go to the log (logger qcs_jax.apps.webdemo).
See docs/RELIABILITY.md.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import os
import pathlib
import tempfile
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageOps

from qcs_jax.apps import http_guard
from qcs_jax.apps.annotate import draw_annotations
from qcs_jax.apps.http_guard import RequestError
from qcs_jax.data.base import decode_rgb

PAGE = pathlib.Path(__file__).with_name("webdemo.html")
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_PIXELS = 40_000_000
MAX_SIDE = 65_500          # JPEG's largest side: the annotated answer must be encodable
MAX_FACES = 32             # faces analysed per photo (the largest): bounds one request's model time
MAX_THREADS = 32           # connections served at once; more get 503
PIXEL_BUDGET = MAX_PIXELS  # pixels decoded at once over all requests (~17 bytes each, peak)
IO_TIMEOUT_S = 10.0        # one recv/send
REQUEST_TIMEOUT_S = 30.0   # the whole request (line, headers, body) must arrive by then
BUSY_TIMEOUT_S = 20.0      # waiting for pixel room or for the model, then 503
log = logging.getLogger(__name__)


def _mb(n: int) -> str:
  return f"{n / 2**20:.3g}"


class UploadError(ValueError):
  """An upload the demo cannot use; its message is shown in the page."""


class Busy(RuntimeError):
  """The demo cannot take this request now (503, Retry-After)."""


def open_upload(data: bytes, max_bytes: int = MAX_UPLOAD_BYTES,
                max_pixels: int = MAX_PIXELS) -> Any:
  """Uploaded bytes -> a lazily decoded PIL image whose size passed the limits."""
  if not data:
    raise UploadError("the uploaded file is empty")
  if len(data) > max_bytes:
    raise UploadError(f"the file is {_mb(len(data))} MB; the limit is {_mb(max_bytes)} MB")
  try:
    im = Image.open(io.BytesIO(data))
  except Exception as e:  # PIL raises many types for non-images and corrupt data
    raise _not_an_image(e) from e
  w, h = im.size
  if w * h > max_pixels:
    im.close()
    raise UploadError(f"the image is {w}x{h} pixels; the limit is "
                      f"{max_pixels / 1e6:.0f} megapixels")
  if max(w, h) > MAX_SIDE:
    im.close()
    raise UploadError(f"the image is {w}x{h} pixels; its longest side may be at most "
                      f"{MAX_SIDE} pixels")
  return im


def _not_an_image(e: Exception) -> UploadError:
  return UploadError(f"this file is not an image the demo can read (JPEG, PNG, WebP, BMP, "
                     f"GIF): {type(e).__name__}")


def to_rgb_array(im: Any) -> np.ndarray:
  """An opened upload -> uint8 RGB (H, W, 3), upright by EXIF; UploadError if it will not decode."""
  try:
    with im:
      return np.asarray(ImageOps.exif_transpose(im).convert("RGB"), np.uint8)
  except Exception as e:  # pylint: disable=broad-except  # truncated / corrupt data
    raise _not_an_image(e) from e


def decode_upload(data: bytes, max_bytes: int = MAX_UPLOAD_BYTES,
                  max_pixels: int = MAX_PIXELS) -> np.ndarray:
  """Uploaded bytes -> uint8 RGB (H, W, 3), upright by EXIF; UploadError says what is wrong."""
  return to_rgb_array(open_upload(data, max_bytes, max_pixels))


def encode_jpeg(image: np.ndarray, quality: int = 90) -> str:
  """uint8 RGB -> 'data:image/jpeg;base64,...'."""
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, "JPEG", quality=quality)
  return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def annotate(image: np.ndarray, rows: list[dict]) -> np.ndarray:
  """The photo with each face's box and 'label score' (predict.draw_annotations' drawing)."""
  with tempfile.TemporaryDirectory() as d:
    path = draw_annotations(image, rows, os.path.join(d, "annotated.png"))
    return decode_rgb(path)


# Analyse: (uint8 RGB photo, detect) -> faces [{box, label, score, probabilities}].
Analyse = Callable[[np.ndarray, bool], list[dict]]


@dataclasses.dataclass
class DemoApp:
  """What the handler needs: the model call, a description and the limits."""

  analyse: Analyse
  info: dict[str, Any]
  max_bytes: int = MAX_UPLOAD_BYTES
  max_pixels: int = MAX_PIXELS
  max_faces: int = MAX_FACES
  max_threads: int = MAX_THREADS
  pixel_budget: int = PIXEL_BUDGET
  io_timeout_s: float = IO_TIMEOUT_S
  request_timeout_s: float = REQUEST_TIMEOUT_S
  busy_timeout_s: float = BUSY_TIMEOUT_S
  allowed_hosts: tuple[str, ...] = ()
  lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
  budget: http_guard.PixelBudget = dataclasses.field(init=False)

  def __post_init__(self) -> None:
    self.budget = http_guard.PixelBudget(max(self.pixel_budget, 1))

  def predict(self, data: bytes, detect: bool) -> dict[str, Any]:
    """One upload -> the JSON answer (UploadError for bad input or no face, Busy)."""
    im = open_upload(data, self.max_bytes, self.max_pixels)
    pixels = im.size[0] * im.size[1]
    if not self.budget.acquire(pixels, self.busy_timeout_s):
      im.close()
      raise Busy(f"no room to decode {pixels} pixels within {self.busy_timeout_s:g} s")
    try:
      image = to_rgb_array(im)
      if not self.lock.acquire(timeout=self.busy_timeout_s):
        raise Busy(f"the model stayed busy for {self.busy_timeout_s:g} s")
      try:
        rows = self.analyse(image, detect)
      finally:
        self.lock.release()
      if not rows:
        raise UploadError("no face found in this photo; if it is already a cropped face, "
                          "tick 'the photo is one face' and try again")
      faces = [{k: r[k] for k in ("box", "label", "score", "probabilities")}
               for r in rows[:self.max_faces]]
      return {"faces": faces, "image": encode_jpeg(annotate(image, rows[:self.max_faces])),
              "width": int(image.shape[1]), "height": int(image.shape[0]),
              "max_faces": self.max_faces}
    finally:
      self.budget.release(pixels)


def make_handler(app: DemoApp, policy: http_guard.HostPolicy) -> type[BaseHTTPRequestHandler]:
  page = PAGE.read_bytes()
  headers = http_guard.security_headers(page.decode())

  class Handler(BaseHTTPRequestHandler):
    """Routes of the demo; every answer has a status line, an explicit length and type."""

    server_version = "qcs-demo"
    default_request_version = "HTTP/1.0"  # a garbage request line still gets a status line
    timeout = app.io_timeout_s

    def setup(self) -> None:
      super().setup()
      self.reader = http_guard.DeadlineReader(self.connection, app.io_timeout_s)
      self.reader.start(app.request_timeout_s)
      self.rfile.close()
      self.rfile = io.BufferedReader(self.reader, 1 << 16)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
      log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, ctype: str,
              extra: dict[str, str] | None = None) -> None:
      self.connection.settimeout(app.io_timeout_s)
      self.send_response(status)
      self.send_header("Content-Type", ctype)
      self.send_header("Content-Length", str(len(body)))
      for k, v in {**headers, **(extra or {})}.items():
        self.send_header(k, v)
      self.end_headers()
      if self.command != "HEAD":
        self.wfile.write(body)

    def _json(self, status: int, obj: Any, extra: dict[str, str] | None = None) -> None:
      self._send(status, json.dumps(obj).encode(), "application/json", extra)

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
      """BaseHTTPRequestHandler's refusals (bad request line, 414, 431, 501) as JSON."""
      del explain
      self.close_connection = True
      try:
        self._json(code, {"error": message or HTTPStatus(code).phrase})
      except OSError:
        pass

    def _guard(self) -> bool:
      """The Host / Origin checks; False once an answer was sent."""
      if not policy.allows_host(self.headers.get("Host")):
        log.warning("refused Host %r from %s", self.headers.get("Host"), self.address_string())
        self._json(HTTPStatus.MISDIRECTED_REQUEST,
                   {"error": "this server answers only to its own address"})
        return False
      if not policy.allows_origin(self.headers.get("Origin")):
        log.warning("refused Origin %r", self.headers.get("Origin"))
        self._json(HTTPStatus.FORBIDDEN, {"error": "requests from other sites are refused"})
        return False
      return True

    def do_GET(self) -> None:  # noqa: N802
      if not self._guard():
        return
      path = urllib.parse.urlparse(self.path).path
      if path in ("/", "/index.html"):
        self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
      elif path == "/api/info":
        self._json(HTTPStatus.OK, dict(app.info, max_upload_bytes=app.max_bytes,
                                       max_pixels=app.max_pixels, max_faces=app.max_faces))
      else:
        self._json(HTTPStatus.NOT_FOUND, {"error": "no such page"})

    def do_POST(self) -> None:  # noqa: N802
      self.close_connection = True
      if not self._guard():
        return
      url = urllib.parse.urlparse(self.path)
      try:
        length = http_guard.content_length(
            self.headers.get_all("Content-Length"),
            "chunked" in (self.headers.get("Transfer-Encoding") or "").lower())
      except RequestError as e:
        self._json(e.status, {"error": str(e)})
        return
      if url.path != "/api/predict":
        self._json(HTTPStatus.NOT_FOUND, {"error": "no such endpoint"})
        return
      if length > app.max_bytes:  # refuse before reading it
        self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {
            "error": f"the file is {_mb(length)} MB; the limit is {_mb(app.max_bytes)} MB"})
        return
      try:
        data = http_guard.read_body(self.rfile, length)
      except TimeoutError:
        self._json(HTTPStatus.REQUEST_TIMEOUT, {"error": "the upload did not arrive in time"})
        return
      except (EOFError, OSError):
        return  # the client went away
      detect = urllib.parse.parse_qs(url.query).get("detect", ["1"])[0] != "0"
      try:
        self._json(HTTPStatus.OK, app.predict(data, detect))
      except UploadError as e:
        self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
      except Busy as e:
        log.warning("503: %s", e)
        self._json(HTTPStatus.SERVICE_UNAVAILABLE,
                   {"error": "the demo is busy; try again in a moment"}, {"Retry-After": "2"})
      except Exception:  # pylint: disable=broad-except  # details to the log, not the client
        log.exception("the request failed")
        self._json(HTTPStatus.INTERNAL_SERVER_ERROR,
                   {"error": "the demo failed on this photo (details are in the server's log)"})

  return Handler


def make_server(app: DemoApp, host: str = "127.0.0.1",
                port: int = 0) -> http_guard.BoundedServer:
  """A bound server (port 0: a free one; see server.server_address); call serve_forever()."""
  server = http_guard.BoundedServer((host, port), None, app.max_threads)
  policy = http_guard.HostPolicy(host, server.server_address[1], app.allowed_hosts)
  server.RequestHandlerClass = make_handler(app, policy)
  return server
