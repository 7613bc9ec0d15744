"""The browser demo: a standard-library HTTP server and one self-contained HTML page.

Why not Gradio: it pulls ~40 packages, fetches fonts and front-end code from
CDNs unless configured otherwise and phones home for analytics; the demo needs
one page, one upload endpoint and no network, which http.server serves with
no dependency at all (and a plain page is easy to drive from a test browser).

  GET  /             the page (file upload, webcam snapshot, results)
  GET  /api/info     model description, class names, upload limits (JSON)
  POST /api/predict  body: the image file's bytes; ?detect=0 treats the photo
                     as one cropped face. 200 {faces, image (annotated JPEG as
                     a data URL), width, height}; 4xx {error} for a bad upload.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import pathlib
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import numpy as np

PAGE = pathlib.Path(__file__).with_name("webdemo.html")
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_PIXELS = 40_000_000


def _mb(n: int) -> str:
  return f"{n / 2**20:.3g}"


class UploadError(ValueError):
  """An upload the demo cannot use; its message is shown in the page."""


def decode_upload(data: bytes, max_bytes: int = MAX_UPLOAD_BYTES,
                  max_pixels: int = MAX_PIXELS) -> np.ndarray:
  """Uploaded bytes -> uint8 RGB (H, W, 3), upright by EXIF; UploadError says what is wrong."""
  from PIL import Image, ImageOps  # pylint: disable=import-outside-toplevel
  if not data:
    raise UploadError("the uploaded file is empty")
  if len(data) > max_bytes:
    raise UploadError(f"the file is {_mb(len(data))} MB; the limit is {_mb(max_bytes)} MB")
  try:
    with Image.open(io.BytesIO(data)) as im:
      w, h = im.size
      if w * h > max_pixels:
        raise UploadError(f"the image is {w}x{h} pixels; the limit is "
                          f"{max_pixels / 1e6:.0f} megapixels")
      im = ImageOps.exif_transpose(im)
      return np.asarray(im.convert("RGB"), np.uint8)
  except UploadError:
    raise
  except Exception as e:  # PIL raises many types for non-images and corrupt data
    raise UploadError(f"this file is not an image the demo can read (JPEG, PNG, WebP, BMP, "
                      f"GIF): {type(e).__name__}") from e


def encode_jpeg(image: np.ndarray, quality: int = 90) -> str:
  """uint8 RGB -> 'data:image/jpeg;base64,...'."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, "JPEG", quality=quality)
  return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def annotate(image: np.ndarray, rows: list[dict]) -> np.ndarray:
  """The photo with each face's box and 'label score' (predict.draw_annotations' drawing)."""
  import os  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel
  from qcs_jax.apps.annotate import draw_annotations  # pylint: disable=import-outside-toplevel
  from qcs_jax.data.base import decode_rgb  # pylint: disable=import-outside-toplevel
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
  lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

  def predict(self, data: bytes, detect: bool) -> dict[str, Any]:
    """One upload -> the JSON answer (UploadError for bad input or no face)."""
    image = decode_upload(data, self.max_bytes, self.max_pixels)
    with self.lock:
      rows = self.analyse(image, detect)
    if not rows:
      raise UploadError("no face found in this photo; if it is already a cropped face, tick "
                        "'the photo is one face' and try again")
    faces = [{k: r[k] for k in ("box", "label", "score", "probabilities")} for r in rows]
    return {"faces": faces, "image": encode_jpeg(annotate(image, rows)),
            "width": int(image.shape[1]), "height": int(image.shape[0])}


def make_handler(app: DemoApp) -> type[BaseHTTPRequestHandler]:
  page = PAGE.read_bytes()

  class Handler(BaseHTTPRequestHandler):
    """Routes of the demo; every answer has an explicit length and type."""

    server_version = "qcs-demo"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  quiet server
      pass

    def _send(self, status: int, body: bytes, ctype: str) -> None:
      self.send_response(status)
      self.send_header("Content-Type", ctype)
      self.send_header("Content-Length", str(len(body)))
      self.send_header("Cache-Control", "no-store")
      self.end_headers()
      self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
      self._send(status, json.dumps(obj).encode(), "application/json")

    def do_GET(self) -> None:  # noqa: N802
      path = urllib.parse.urlparse(self.path).path
      if path in ("/", "/index.html"):
        self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
      elif path == "/api/info":
        self._json(HTTPStatus.OK, dict(app.info, max_upload_bytes=app.max_bytes,
                                       max_pixels=app.max_pixels))
      else:
        self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {path}"})

    def do_POST(self) -> None:  # noqa: N802
      url = urllib.parse.urlparse(self.path)
      if url.path != "/api/predict":
        self._json(HTTPStatus.NOT_FOUND, {"error": f"no endpoint {url.path}"})
        return
      length = int(self.headers.get("Content-Length") or 0)
      if length > app.max_bytes:  # refuse before reading it all
        self.close_connection = True
        self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {
            "error": f"the file is {_mb(length)} MB; the limit is {_mb(app.max_bytes)} MB"})
        return
      data = self.rfile.read(length) if length else b""
      detect = urllib.parse.parse_qs(url.query).get("detect", ["1"])[0] != "0"
      try:
        self._json(HTTPStatus.OK, app.predict(data, detect))
      except UploadError as e:
        self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
      except Exception as e:  # pylint: disable=broad-except  # the page shows it
        self._json(HTTPStatus.INTERNAL_SERVER_ERROR,
                   {"error": f"the model failed on this photo ({type(e).__name__}: {e})"})

  return Handler


def make_server(app: DemoApp, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
  """A bound server (port 0: a free one; see server.server_address); call serve_forever()."""
  server = ThreadingHTTPServer((host, port), make_handler(app))
  server.daemon_threads = True
  return server
