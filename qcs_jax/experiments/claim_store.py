"""Where a claim grid's results live: the committed rows file and the cell claims.

Rows: one JSON line per finished cell, appended under an exclusive lock and fsynced,
so a kill leaves at most a torn last line (ignored on reading) and several processes
can append to one file. The file is meant to be committed (experiments/claim_rows.jsonl):
a later session, on this machine or another, resumes from it.

Claims: a process runs a cell only after creating OUT/claims/<cell>.claim with
O_CREAT|O_EXCL (atomic on a local or NFSv3+ file system), holding its pid, host
and start time; it refreshes the file's mtime every HEARTBEAT_S while training
and deletes it after the row is written; having claimed, it reads the rows again,
since the last owner may have finished the cell and let go since its first look.
A claim is stale (its owner died) when its host is this host and its pid is gone,
or when it has not been refreshed for stale_s seconds (another host's owner cannot
be probed). A stale claim is taken
over by renaming it away first: only one of two racing processes wins the rename.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import platform
import socket
import threading
from typing import Iterator, Sequence

HEARTBEAT_S = 60.0
STALE_S = 900.0  # 15 heartbeats missed


def settings_hash(settings: dict) -> str:
  """12 hex digits of the SHA-256 of the settings' canonical JSON (keys sorted)."""
  text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def cpu_model() -> str:
  """The CPU's model name and this machine's core count (rows say where they ran)."""
  name = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          name = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return f"{name} x{os.cpu_count()}"


def utc_now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read_rows(path: str) -> list[dict]:
  """The rows of a JSONL file (a torn line from a kill is ignored; no file: none)."""
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(row, dict):
        rows.append(row)
  return rows


def append_row(path: str, row: dict) -> None:
  """Appends one row under an exclusive lock, starting a new line after a torn one."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a+") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      f.seek(0, os.SEEK_END)
      if f.tell() > 0:
        f.seek(f.tell() - 1)
        torn = f.read(1) != "\n"
        f.seek(0, os.SEEK_END)
        if torn:
          f.write("\n")
      f.write(json.dumps(row) + "\n")
      f.flush()
      os.fsync(f.fileno())
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def cost_line(rows: Sequence[dict], todo: Sequence) -> str:
  """CPU-hours spent on the finished rows, and an estimate for the cells left (each
  model's mean CPU time so far; the overall mean for a model without rows)."""
  spent = sum(r.get("cpu_s", 0.0) for r in rows)
  by_model: dict[str, list[float]] = {}
  for r in rows:
    by_model.setdefault(r["model"], []).append(r.get("cpu_s", 0.0))
  overall = spent / len(rows) if rows else 0.0
  left = sum(sum(by_model[c.model]) / len(by_model[c.model]) if c.model in by_model else overall
             for c in todo)
  est = f"~{left / 3600:.2f} CPU-h" if rows else "unknown (no rows yet)"
  return (f"cost: {len(rows)} finished rows took {spent / 3600:.2f} CPU-h; "
          f"{len(todo)} cells left: {est}")


def parse_until(text: str, now: datetime.datetime | None = None) -> float:
  """--until as seconds since the epoch: 'HH:MM' (UTC, today) or an ISO date-time."""
  now = now or datetime.datetime.now(datetime.timezone.utc)
  try:
    if len(text) <= 5 and ":" in text:
      hh, mm = (int(x) for x in text.split(":"))
      t = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
    else:
      t = datetime.datetime.fromisoformat(text)
      if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.timezone.utc)
  except ValueError:
    raise ValueError(f"--until {text!r}: expected HH:MM (UTC) or an ISO date-time") from None
  return t.timestamp()


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class Claims:
  """Atomic per-cell claims in a folder shared by the processes that run one grid."""

  def __init__(self, folder: str, stale_s: float = STALE_S, owner: dict | None = None):
    self.folder = folder
    self.stale_s = stale_s
    self.owner = owner or {"pid": os.getpid(), "host": socket.gethostname()}
    os.makedirs(folder, exist_ok=True)

  def path(self, key: str) -> str:
    return os.path.join(self.folder, key + ".claim")

  def holder(self, key: str) -> dict | None:
    """The claim's content, or None when unclaimed (an unreadable claim reads as {})."""
    try:
      with open(self.path(key)) as f:
        return json.loads(f.read() or "{}")
    except FileNotFoundError:
      return None
    except (OSError, json.JSONDecodeError):
      return {}

  def is_stale(self, key: str, now: float | None = None) -> bool:
    try:
      mtime = os.stat(self.path(key)).st_mtime
    except FileNotFoundError:
      return False
    h = self.holder(key) or {}
    if h.get("host") == socket.gethostname() and isinstance(h.get("pid"), int):
      if not _pid_alive(h["pid"]):
        return True
    now = datetime.datetime.now().timestamp() if now is None else now
    return now - mtime > self.stale_s

  def try_claim(self, key: str) -> bool:
    """True if this process now owns the cell (a stale claim is taken over)."""
    path = self.path(key)
    if os.path.exists(path) and self.is_stale(key):
      grave = f"{path}.stale.{self.owner['host']}.{self.owner['pid']}"
      try:
        os.rename(path, grave)  # only one racer's rename finds the file
        os.remove(grave)
      except FileNotFoundError:
        pass
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      json.dump({**self.owner, "since": utc_now()}, f)
    return True

  def release(self, key: str) -> None:
    h = self.holder(key)
    if h is not None and h.get("pid") == self.owner["pid"] and h.get("host") == self.owner["host"]:
      with contextlib.suppress(FileNotFoundError):
        os.remove(self.path(key))

  @contextlib.contextmanager
  def heartbeat(self, key: str, every_s: float = HEARTBEAT_S) -> Iterator[None]:
    """Refreshes the claim's mtime every ``every_s`` seconds while the block runs."""
    stop = threading.Event()

    def beat() -> None:
      while not stop.wait(every_s):
        with contextlib.suppress(OSError):
          os.utime(self.path(key))

    t = threading.Thread(target=beat, daemon=True)
    t.start()
    try:
      yield
    finally:
      stop.set()
      t.join()
