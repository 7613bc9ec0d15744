"""A bounded load test of the web demo: good and hostile clients at once, 127.0.0.1 only.

  python tools/load_test_demo.py [--seconds 30] [--good 2] [--hostile 6] [--fake]

Starts `python -m qcs_jax.cli.demo --port 0` (the embedded model; --fake: an
in-process server whose model is a stub, for a quick check of the clients),
then for --seconds runs --good clients that upload a face photo again and again
and --hostile clients that cycle through the attacks of docs/RELIABILITY.md
(a 36 MP PNG, half-sent bodies, headers trickled byte by byte, idle
connections, negative / non-numeric Content-Length, a garbage request line, a
foreign Host). Prints one JSON object: good requests sent / answered 200,
their p50 / p95 latency, the statuses the hostile ones got, the server's peak
RSS. Every socket has a timeout and the whole run stops by itself.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable

import numpy as np
from PIL import Image

HOST = "127.0.0.1"
START_TIMEOUT_S = 600


def png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, "PNG")
  return buf.getvalue()


def request(port: int, head: str, body: bytes = b"", timeout: float = 60.0,
            trickle: float = 0.0) -> tuple[int | None, float]:
  """Sends one request; (HTTP status or None if none came, seconds)."""
  t0 = time.monotonic()
  try:
    with socket.create_connection((HOST, port), timeout=timeout) as s:
      data = head.encode() + body
      if trickle:
        for k in range(len(data)):
          s.sendall(data[k:k + 1])
          time.sleep(trickle)
      else:
        s.sendall(data)
      out = b""
      while True:
        chunk = s.recv(65536)
        if not chunk:
          break
        out += chunk
  except OSError:
    return None, time.monotonic() - t0
  m = re.match(rb"HTTP/1\.[01] (\d{3})", out)
  return (int(m.group(1)) if m else None), time.monotonic() - t0


def post_head(port: int, length: str | None, host: str | None = None) -> str:
  head = f"POST /api/predict HTTP/1.1\r\nHost: {host or f'{HOST}:{port}'}\r\n"
  if length is not None:
    head += f"Content-Length: {length}\r\n"
  return head + "\r\n"


def attacks(port: int) -> list[tuple[str, Callable[[], tuple[int | None, float]]]]:
  big = png(np.zeros((6000, 6000, 3), np.uint8))  # 36 MP, ~100 KB
  return [
      ("36 MP PNG", lambda: request(port, post_head(port, str(len(big))), big)),
      ("half-sent body", lambda: request(port, post_head(port, "100000"), b"x" * 100)),
      ("trickled headers", lambda: request(port, post_head(port, "5") + "hello",
                                           trickle=0.5, timeout=120)),
      ("idle connection", lambda: request(port, "", timeout=120)),
      ("Content-Length -1", lambda: request(port, post_head(port, "-1"), b"x" * 1000)),
      ("Content-Length abc", lambda: request(port, post_head(port, "abc"))),
      ("garbage request line", lambda: request(port, "HELLO THERE\r\n\r\n")),
      ("foreign Host", lambda: request(port, f"GET /api/info HTTP/1.1\r\nHost: evil.example:"
                                             f"{port}\r\n\r\n")),
  ]


def start_server(fake: bool) -> tuple[int, Callable[[], int], Callable[[], None]]:
  """(port, peak RSS in bytes so far, stop) of a demo server."""
  if fake:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import logging  # pylint: disable=import-outside-toplevel
    from qcs_jax.apps import webdemo  # pylint: disable=import-outside-toplevel
    logging.getLogger(webdemo.__name__).setLevel(logging.ERROR)  # refusals are expected
    rows = [{"box": [0, 0, 8, 8], "label": "Fear", "score": 0.5, "probabilities": {"Fear": 1}}]
    app = webdemo.DemoApp(lambda image, detect: rows, {"description": "fake"},
                          io_timeout_s=2.0, request_timeout_s=5.0)
    srv = webdemo.make_server(app, HOST, 0)
    threading.Thread(target=srv.serve_forever, kwargs=dict(poll_interval=0.05),
                     daemon=True).start()

    def stop_fake() -> None:
      srv.shutdown()
      srv.server_close()

    return srv.server_address[1], lambda: peak_rss(os.getpid()), stop_fake
  proc = subprocess.Popen([sys.executable, "-m", "qcs_jax.cli.demo", "--port", "0"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline, port = time.monotonic() + START_TIMEOUT_S, None
  while port is None and time.monotonic() < deadline and proc.poll() is None:
    line = proc.stdout.readline()
    m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    port = int(m.group(1)) if m else None
  if port is None:
    proc.kill()
    raise SystemExit("error: the demo did not start")
  threading.Thread(target=proc.stdout.read, daemon=True).start()  # drain its log

  def stop() -> None:
    proc.terminate()
    try:
      proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
      proc.kill()

  return port, lambda: peak_rss(proc.pid), stop


def peak_rss(pid: int) -> int:
  """VmHWM of a process, in bytes (0 if unreadable)."""
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def run(seconds: float, good: int, hostile: int, fake: bool) -> dict[str, Any]:
  port, rss, stop = start_server(fake)
  import skimage.data  # pylint: disable=import-outside-toplevel  # test requirements only
  face = png(skimage.data.astronaut())  # 512 x 512, one face found by the detector
  cases = attacks(port)  # built once, before the clock starts
  rss_start = rss()
  end = time.monotonic() + seconds
  latencies: list[float] = []
  statuses: dict[str, dict[str, int]] = {}
  sent = [0]
  lock = threading.Lock()

  def good_client() -> None:
    while time.monotonic() < end:
      code, dt = request(port, post_head(port, str(len(face))), face)
      with lock:
        sent[0] += 1
        if code == 200:
          latencies.append(dt)
        statuses.setdefault("good", {}).setdefault(str(code), 0)
        statuses["good"][str(code)] += 1

  def hostile_client(k: int) -> None:
    n = k
    while time.monotonic() < end:
      name, fn = cases[n % len(cases)]
      code, _ = fn()
      with lock:
        statuses.setdefault(name, {}).setdefault(str(code), 0)
        statuses[name][str(code)] += 1
      n += 1

  threads = [threading.Thread(target=good_client, daemon=True) for _ in range(good)]
  threads += [threading.Thread(target=hostile_client, args=(k,), daemon=True)
              for k in range(hostile)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=max(0.0, end - time.monotonic()) + 150)
  peak = rss()
  stop()
  lat = np.sort(np.asarray(latencies)) if latencies else np.zeros(1)
  return {"seconds": seconds, "good_clients": good, "hostile_clients": hostile,
          "good_sent": sent[0], "good_answered_200": len(latencies),
          "good_p50_ms": round(1e3 * float(np.percentile(lat, 50)), 1),
          "good_p95_ms": round(1e3 * float(np.percentile(lat, 95)), 1),
          "statuses": statuses, "server_rss_start_mib": round(rss_start / 2**20),
          "server_rss_peak_mib": round(peak / 2**20), "server": "fake" if fake else "demo",
          "threads_left": sum(t.is_alive() for t in threads)}


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--seconds", type=float, default=30.0)
  ap.add_argument("--good", type=int, default=2)
  ap.add_argument("--hostile", type=int, default=6)
  ap.add_argument("--fake", action="store_true", help="a stub model in this process")
  args = ap.parse_args(argv)
  if not (0 < args.seconds <= 600 and 0 <= args.good <= 16 and 0 <= args.hostile <= 64):
    print("error: --seconds in (0, 600], --good <= 16, --hostile <= 64", file=sys.stderr)
    return 2
  print(json.dumps(run(args.seconds, args.good, args.hostile, args.fake), indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
