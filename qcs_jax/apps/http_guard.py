"""The demo server's defences, kept apart from its routes (webdemo.py).

- `DeadlineReader`: every request must arrive whole within a deadline; each
  recv waits at most `io_timeout_s`, and the sum at most `request_timeout_s`
  (a client sending one byte every few seconds cannot hold a thread).
- `BoundedServer`: at most `max_threads` connections are served at once; one
  more is answered 503 from the accept loop and closed.
- `PixelBudget`: at most so many decoded pixels are in memory at once (a 36 MP
  PNG costs ~600 MB from decode to the annotated answer); a request waits for
  room up to a deadline, then gets 503.
- `content_length`: the body length, strictly ASCII digits (int() would take
  '+5', ' 5', '1_0', '-1').
- `HostPolicy`: which Host / Origin a request may name (DNS rebinding: a page
  at evil.example resolved to 127.0.0.1 sends Host: evil.example).
- `security_headers`: CSP with the page's own inline script and style hashes,
  nosniff, no framing, no referrer.
"""
from __future__ import annotations

import base64
import hashlib
import io
import ipaddress
import re
import socket
import threading
import time
import urllib.parse
from http.server import ThreadingHTTPServer
from typing import Any, Iterable

_DIGITS = re.compile(r"[0-9]{1,18}")


class RequestError(ValueError):
  """A request the server refuses before routing it: (HTTP status, client message)."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


def content_length(values: list[str] | None, chunked: bool) -> int:
  """The declared body length; RequestError 411 (none, or chunked) or 400 (not digits)."""
  if chunked:
    raise RequestError(411, "chunked uploads are not accepted; send a Content-Length")
  if not values:
    raise RequestError(411, "a Content-Length header is required")
  if len(set(v.strip() for v in values)) != 1:
    raise RequestError(400, "conflicting Content-Length headers")
  text = values[0].strip()
  if not _DIGITS.fullmatch(text):
    raise RequestError(400, f"Content-Length must be a non-negative whole number, "
                            f"got {text[:20]!r}")
  return int(text)


class DeadlineReader(io.RawIOBase):
  """A socket's receive side that raises TimeoutError once the request's deadline passes."""

  def __init__(self, sock: socket.socket, io_timeout_s: float):
    super().__init__()
    self._sock, self._io_timeout = sock, io_timeout_s
    self.deadline = time.monotonic() + io_timeout_s

  def start(self, request_timeout_s: float) -> None:
    self.deadline = time.monotonic() + request_timeout_s

  def readable(self) -> bool:
    return True

  def readinto(self, b: Any) -> int:
    left = self.deadline - time.monotonic()
    if left <= 0:
      raise TimeoutError("the request did not arrive in time")
    self._sock.settimeout(min(self._io_timeout, left))
    return self._sock.recv_into(b)


def read_body(rfile: Any, length: int, chunk: int = 1 << 16) -> bytes:
  """Exactly `length` bytes (TimeoutError from the reader's deadline; EOFError if cut short)."""
  parts, left = [], length
  while left > 0:
    data = rfile.read(min(chunk, left))
    if not data:
      raise EOFError(f"the body ended after {length - left} of {length} bytes")
    parts.append(data)
    left -= len(data)
  return b"".join(parts)


class PixelBudget:
  """A counting limit on pixels held decoded at once; acquire(n) waits up to a timeout."""

  def __init__(self, capacity: int):
    self.capacity = int(capacity)
    self.in_use = 0
    self.peak = 0
    self._cond = threading.Condition()

  def acquire(self, n: int, timeout_s: float) -> bool:
    n = min(int(n), self.capacity)  # one image larger than the budget waits for all of it
    deadline = time.monotonic() + timeout_s
    with self._cond:
      while self.in_use + n > self.capacity:
        left = deadline - time.monotonic()
        if left <= 0 or not self._cond.wait(left):
          if self.in_use + n > self.capacity:
            return False
      self.in_use += n
      self.peak = max(self.peak, self.in_use)
      return True

  def release(self, n: int) -> None:
    with self._cond:
      self.in_use -= min(int(n), self.capacity)
      self._cond.notify_all()


_BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
         b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s")
_BUSY_BODY = b'{"error": "the demo is busy; try again in a moment"}'


class BoundedServer(ThreadingHTTPServer):
  """ThreadingHTTPServer with at most `max_threads` connections in service at once."""

  daemon_threads = True

  def __init__(self, address: tuple[str, int], handler: Any, max_threads: int):
    super().__init__(address, handler)
    self.max_threads = int(max_threads)
    self._slots = threading.BoundedSemaphore(self.max_threads)
    self.refused = 0

  def process_request(self, request: Any, client_address: Any) -> None:
    if not self._slots.acquire(blocking=False):
      self.refused += 1
      self._refuse(request)
      return
    try:
      super().process_request(request, client_address)
    except BaseException:
      self._slots.release()
      raise

  def process_request_thread(self, request: Any, client_address: Any) -> None:
    try:
      super().process_request_thread(request, client_address)
    finally:
      self._slots.release()

  def _refuse(self, request: socket.socket) -> None:
    """503 from the accept loop: a short send with a short timeout, what arrived is dropped."""
    try:
      request.settimeout(0.5)
      request.sendall(_BUSY % (len(_BUSY_BODY), _BUSY_BODY))
      request.setblocking(False)
      try:
        request.recv(1 << 16)  # unread input would turn the close into a reset
      except OSError:
        pass
    except OSError:
      pass
    self.shutdown_request(request)


def _split_host(text: str) -> tuple[str, int | None] | None:
  """'host:port' / '[v6]:port' / 'host' -> (lower-case host, port or None); None if malformed."""
  try:
    u = urllib.parse.urlsplit("//" + text)
    port = u.port
  except ValueError:
    return None
  if not u.hostname or u.username is not None or u.path or u.query or u.fragment:
    return None
  return u.hostname.lower().rstrip("."), port


def _is_ip(host: str) -> bool:
  try:
    ipaddress.ip_address(host)
    return True
  except ValueError:
    return False


class HostPolicy:
  """The Host names a request may carry: the bind address's own, and localhost for loopback.

  A server bound to a specific address answers only to that address (and, on
  loopback, 'localhost'); one bound to all interfaces (0.0.0.0 / ::) answers to
  any IP literal -- DNS rebinding always carries the attacker's *name* --,
  'localhost', this computer's host name and `extra` names. The port must be
  the server's.
  """

  def __init__(self, bind_host: str, port: int, extra: Iterable[str] = ()):
    self.port = int(port)
    host = bind_host.lower().strip("[]")
    self.wildcard = host in ("", "0.0.0.0", "::")
    names = {host, *(h.lower() for h in extra)}
    if self.wildcard or host == "localhost" or (
        _is_ip(host) and ipaddress.ip_address(host).is_loopback):
      names |= {"localhost", "127.0.0.1", "::1"}
    if self.wildcard:  # this computer's own name, as its users on the network type it
      names.add(socket.gethostname().lower())
    self.names = names

  def allows_host(self, value: str | None) -> bool:
    split = _split_host(value or "")
    if split is None:
      return False
    host, port = split
    if (port or 80) != self.port:
      return False
    return host in self.names or (self.wildcard and _is_ip(host))

  def allows_origin(self, value: str | None) -> bool:
    """No Origin (a non-browser client) or this server's own http origin."""
    if value is None:
      return True
    u = urllib.parse.urlsplit(value)
    return u.scheme == "http" and not u.path.strip("/") and self.allows_host(u.netloc)


def _sha256(text: str) -> str:
  return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def security_headers(page: str) -> dict[str, str]:
  """Headers for every answer; the CSP allows only the page's own inline script and style."""
  scripts = re.findall(r"<script>(.*?)</script>", page, re.S)
  styles = re.findall(r"<style>(.*?)</style>", page, re.S)
  csp = ("default-src 'none'; script-src " + (" ".join(map(_sha256, scripts)) or "'none'")
         + "; style-src " + (" ".join(map(_sha256, styles)) or "'none'")
         + "; img-src data: blob:; media-src blob: mediastream:; connect-src 'self'; "
           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
  return {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff",
          "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
          "Cross-Origin-Resource-Policy": "same-origin", "Cache-Control": "no-store"}
