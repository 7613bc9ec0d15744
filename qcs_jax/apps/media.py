"""Finding photos and videos, reading video frames, and reading ahead in a background thread."""
from __future__ import annotations

import os
import queue
import threading
from typing import Callable, Iterable, Iterator, Sequence, TypeVar


from qcs_jax.data.base import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
T = TypeVar("T")


def find_inputs(paths: Sequence[str], on_problem: Callable[[str], None]) -> list[str]:
  """Files as given, folders expanded (recursively, sorted) to their photos and videos."""
  out = []
  for p in paths:
    if os.path.isdir(p):
      found = []
      for dirpath, dirnames, filenames in os.walk(p):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if not f.startswith(".") and
                  f.lower().endswith(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)]
      if not found:
        on_problem(f"{p}: no photos ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) or videos "
                   f"({'/'.join(e[1:] for e in VIDEO_EXTENSIONS)}) in this folder")
      out += found
    elif os.path.isfile(p):
      out.append(p)
    else:
      on_problem(f"{p}: no such file or folder")
  return out


def is_video(path: str) -> bool:
  return path.lower().endswith(VIDEO_EXTENSIONS)


_DONE = object()


def read_ahead(items: Iterable[T], depth: int = 8) -> Iterator[T]:
  """Iterates `items` in a background thread, up to `depth` ahead of the consumer.

  Decoding (PIL, OpenCV) and OpenCV's detectors release the GIL, so they
  overlap with the model running in the caller's thread. An exception in the
  background is raised in the caller; closing the iterator stops the thread.
  """
  q: queue.Queue = queue.Queue(maxsize=max(1, depth))
  stop = threading.Event()

  def put(entry: tuple) -> bool:
    while not stop.is_set():
      try:
        q.put(entry, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def work() -> None:
    try:
      for item in items:
        if not put((item, None)):
          return
      put((_DONE, None))
    except BaseException as e:  # pylint: disable=broad-except
      put((_DONE, e))

  t = threading.Thread(target=work, name="qcs-read-ahead", daemon=True)
  t.start()
  try:
    while True:
      item, err = q.get()
      if item is _DONE:
        if err is not None:
          raise err
        return
      yield item
  finally:
    stop.set()
    t.join(timeout=5)
