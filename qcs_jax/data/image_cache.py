"""Each image decoded and resized once, kept as uint8 in a memory-mapped file.

With ``data.augment_on='device'`` batches are gathered from this cache (no
decode, no PIL at training time); the random augmentation runs on the device.
One cache per (source split, geometry):

- a training split holds ``resize(decode(image))``, the first step of the host
  train transform (``Transform.resize_size``, bit for bit the same PIL call);
- an evaluation split holds the eval-ready ``centre_crop(resize(decode))``
  (S, S, 3), so the device only normalises.

Files in ``data.cache_dir`` (default: ``~/.cache/qcs_jax/images``, the XLA
cache's sibling): ``<name>-<train|eval>-<H>x<W>-<key>.npy`` (a plain ``.npy``
(N, H, W, 3) uint8, ``np.load(path, mmap_mode='r')``) and ``....json`` (the
index: which items are bad and why, sizes, build time). The key hashes the
source's ``fingerprint()`` (files' paths, sizes, mtime_ns, the labels; an
in-memory source's pixels), the geometry, Pillow's version and FORMAT_VERSION,
so a changed data set gets a new cache.

A build writes ``.npy.partial`` (checkpointed to ``.partial.json`` every few
seconds, after an fsync) and renames it when complete; the ``.json`` index,
renamed last, marks a cache complete, so a killed build is never used and a
rerun resumes where the last checkpoint was. An exclusive ``flock`` on
``....lock`` serialises builders: a second process waits, then uses the file.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
import time
from typing import Any, Iterator, Sequence

import numpy as np
import PIL
from PIL import Image
from tqdm import tqdm

from qcs_jax import runtime
from qcs_jax.data import transforms
from qcs_jax.data.bad_images import BAD_IMAGE_ERRORS, named_error

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PARALLEL = ("threads", "processes")
_CHUNK = 32              # images per job of a parallel build
_CHECKPOINT_S = 5.0      # seconds between resumable checkpoints of a build


def default_cache_dir(environ=os.environ) -> str:
  """~/.cache/qcs_jax/images ($XDG_CACHE_HOME honoured): beside the XLA cache's default."""
  env = {k: v for k, v in environ.items() if k != runtime.CACHE_ENV}
  return os.path.join(os.path.dirname(runtime.default_cache_dir(env)), "images")


def resolve_cache_dir(cache_dir: str | None) -> str:
  return os.path.abspath(os.path.expanduser(str(cache_dir))) if cache_dir else default_cache_dir()


@dataclasses.dataclass(frozen=True)
class Layout:
  """What one cached item is: PIL resize to `resize`, then (eval) a centre crop to `crop`."""

  train: bool
  resize: int | tuple[int, int]
  crop: int          # 0: none
  height: int
  width: int


def layout(augment_cfg: Any, img_size: int, train: bool) -> Layout:
  """The cached geometry of a recipe; ValueError where a training image has no fixed size."""
  t = transforms.build_transform(augment_cfg, img_size, train)
  a, s, size = t.augment, int(img_size), t.resize_size
  if train:
    if not isinstance(size, tuple):
      raise ValueError(f"augment.keep_aspect=True resizes the shorter side to {size}, so training "
                       "images have no fixed size to cache: use --config.data.augment_on=host")
    return Layout(True, size, 0, int(size[0]), int(size[1]))
  if a.crop:
    return Layout(False, size, s, s, s)
  return Layout(False, size, 0, int(size[0]), int(size[1]))


def prepare(image: np.ndarray, lay: Layout) -> np.ndarray:
  """One decoded uint8 image -> its cached uint8 (H, W, 3): the host transform's PIL steps."""
  img = Image.fromarray(transforms._as_rgb_uint8(image), "RGB")  # pylint: disable=protected-access
  img = transforms.resize(img, lay.resize)
  if lay.crop:
    img = transforms.center_crop(img, lay.crop)
  out = np.asarray(img, dtype=np.uint8)
  if out.shape != (lay.height, lay.width, 3):
    raise ValueError(f"cached image is {out.shape}, expected {(lay.height, lay.width, 3)}")
  return out


def disk_bytes(num_items: int, height: int, width: int) -> int:
  """Bytes of a cache of num_items images of (height, width, 3) (plus a 128-byte header)."""
  return 128 + int(num_items) * int(height) * int(width) * 3


@dataclasses.dataclass
class ImageCache:
  """A complete cache: the memory-mapped images and the bad items (index -> one line why)."""

  path: str
  num_items: int
  height: int
  width: int
  bad: dict[int, str]
  built: bool = False     # True when this call built (or finished) it
  _array: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)

  @property
  def nbytes(self) -> int:
    return os.path.getsize(self.path)

  @property
  def bad_mask(self) -> np.ndarray:
    mask = np.zeros(self.num_items, bool)
    mask[list(self.bad)] = True
    return mask

  def array(self) -> np.ndarray:
    """(N, H, W, 3) uint8, memory-mapped read-only (opened once per process)."""
    if self._array is None:
      self._array = np.load(self.path, mmap_mode="r")
    return self._array

  def __getstate__(self):  # a worker process maps the file itself; never pickle the pixels
    return dict(self.__dict__, _array=None)

  def summary(self) -> str:
    """One line for logs: where the cache is, what it holds, its size on disk."""
    return (f"image cache {self.path}: {self.num_items} images of {self.height}x{self.width}, "
            f"{self.nbytes / 2**30:.2f} GiB on disk, {len(self.bad)} bad"
            + (" (built now)" if self.built else ""))


def _safe(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "source"


def cache_key(source: Any, lay: Layout) -> str:
  fingerprint = getattr(source, "fingerprint", None)
  if fingerprint is None:
    raise ValueError(f"{getattr(source, 'name', 'source')}: {type(source).__name__} has no "
                     "fingerprint(), so its images cannot be cached; use data.augment_on='host'")
  try:
    fp = fingerprint()
  except NotImplementedError as e:
    raise ValueError(str(e)) from None
  parts = dict(format=FORMAT_VERSION, pillow=PIL.__version__, source=fp, n=len(source),
               layout=dataclasses.asdict(lay))
  return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=10).hexdigest()


def cache_base(source: Any, lay: Layout, cache_dir: str | None) -> str:
  """The path of a cache without its extension (.npy, .json, .lock, .npy.partial)."""
  kind = "train" if lay.train else "eval"
  name = f"{_safe(getattr(source, 'name', 'source'))}-{kind}-{lay.height}x{lay.width}-"
  return os.path.join(resolve_cache_dir(cache_dir), name + cache_key(source, lay))


def _read_json(path: str) -> dict | None:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _write_json(path: str, obj: dict) -> None:
  """Atomically: a temp file, fsync, rename."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
  fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _complete(base: str, key: str, n: int, lay: Layout) -> ImageCache | None:
  """The cache at base if its index says it is complete and the file has the right size."""
  index = _read_json(base + ".json")
  if not index or index.get("key") != key or index.get("format") != FORMAT_VERSION:
    return None
  path = base + ".npy"
  try:
    size = os.path.getsize(path)
  except OSError:
    return None
  if index.get("bytes") != size or index.get("shape") != [n, lay.height, lay.width, 3]:
    return None
  return ImageCache(path, n, lay.height, lay.width, {int(i): r for i, r in index["bad"].items()})


@contextlib.contextmanager
def _locked(path: str, what: str) -> Iterator[None]:
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      log.warning("waiting for another process to finish the image cache %s", what)
      fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # releases the lock


class _Filler:
  """Chunk (lo, hi) -> prepares items lo..hi-1 and pwrites them; returns {bad index: why}."""

  def __init__(self, source: Any, lay: Layout, path: str, offset: int):
    self.source, self.lay, self.path, self.offset = source, lay, path, offset
    self._fd = None

  def __getstate__(self):
    return dict(self.__dict__, _fd=None)

  def open(self) -> None:
    """Opens the file here (threads share one descriptor; a process opens its own)."""
    if self._fd is None:
      self._fd = os.open(self.path, os.O_WRONLY)

  def __call__(self, chunk: tuple[int, int]) -> dict[int, str]:
    lo, hi = chunk
    lay = self.lay
    out = np.zeros((hi - lo, lay.height, lay.width, 3), np.uint8)
    bad = {}
    for i in range(lo, hi):
      try:
        out[i - lo] = prepare(self.source[i]["image"], lay)
      except BAD_IMAGE_ERRORS as e:
        bad[i] = str(named_error(self.source, i, e)).splitlines()[0]
    self.open()
    view, at = memoryview(out).cast("B"), self.offset + lo * out[0].nbytes
    while view:  # pwrite may write less than asked
      written = os.pwrite(self._fd, view, at)
      view, at = view[written:], at + written
    return bad

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


_WORKER_FILLER: _Filler | None = None


def _init_worker(filler: _Filler) -> None:
  global _WORKER_FILLER
  _WORKER_FILLER = filler


def _fill_in_worker(chunk: tuple[int, int]) -> dict[int, str]:
  return _WORKER_FILLER(chunk)


def _run_chunks(filler: _Filler, chunks: list, workers: int, parallel: str):
  """Results of filler over chunks, in order: in-process, or over `workers` threads/processes."""
  if workers <= 0 or len(chunks) <= 1:
    return contextlib.nullcontext(map(filler, chunks))
  if parallel == "threads":
    pool = concurrent.futures.ThreadPoolExecutor(workers)
    return _closing(pool, pool.map(filler, chunks))
  pool = concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
      initargs=(filler,))
  return _closing(pool, pool.map(_fill_in_worker, chunks))


@contextlib.contextmanager
def _closing(pool, results):
  try:
    yield results
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def _build(source: Any, lay: Layout, base: str, key: str, workers: int, parallel: str,
           progress: bool) -> None:
  """Fills base.npy.partial (resuming a checkpoint of the same key), then renames it complete."""
  n = len(source)
  partial, state_path = base + ".npy.partial", base + ".partial.json"
  state = _read_json(state_path)
  done, bad = 0, {}
  if (state and state.get("key") == key and os.path.exists(partial)
      and os.path.getsize(partial) == state.get("bytes")):
    done, bad = int(state["done"]), {int(i): r for i, r in state["bad"].items()}
    log.info("resuming the image cache %s at item %d of %d", base, done, n)
  else:
    need, free = disk_bytes(n, lay.height, lay.width), shutil.disk_usage(os.path.dirname(base)).free
    if need > free:
      raise OSError(f"image cache {base}.npy needs {need / 2**30:.2f} GiB, {os.path.dirname(base)} "
                    f"has {free / 2**30:.2f} GiB free: set data.cache_dir to a larger disk")
    np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8,
                              shape=(n, lay.height, lay.width, 3))  # sparse until written
  size = os.path.getsize(partial)
  filler = _Filler(source, lay, partial, int(np.load(partial, mmap_mode="r").offset))
  filler.open()
  chunks = [(lo, min(lo + _CHUNK, n)) for lo in range(done, n, _CHUNK)]
  t0 = last = time.monotonic()

  def checkpoint() -> None:
    fd = os.open(partial, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
    _write_json(state_path, dict(key=key, done=done, bytes=size, bad=bad))

  bar = tqdm(total=n, initial=done, unit="img", disable=not progress, dynamic_ncols=True,
             desc=f"caching {getattr(source, 'name', 'images')} at {lay.height}x{lay.width}")
  try:
    with _run_chunks(filler, chunks, workers, parallel) as results:
      for (lo, hi), chunk_bad in zip(chunks, results):
        bad.update(chunk_bad)
        done = hi
        bar.update(hi - lo)
        if time.monotonic() - last >= _CHECKPOINT_S:
          checkpoint()
          last = time.monotonic()
  finally:
    filler.close()
    bar.close()
    if done < n and done > 0:
      checkpoint()  # interrupted (an exception, Ctrl-C): the next run resumes from here
  checkpoint()
  os.replace(partial, base + ".npy")
  _fsync_dir(base)
  seconds = time.monotonic() - t0
  _write_json(base + ".json", dict(
      format=FORMAT_VERSION, key=key, source=getattr(source, "name", ""), shape=[
          n, lay.height, lay.width, 3], bytes=size, layout=dataclasses.asdict(lay),
      pillow=PIL.__version__, bad={str(i): r for i, r in sorted(bad.items())},
      build_seconds=round(seconds, 3), built=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))
  _fsync_dir(base)
  os.remove(state_path)
  if bad:
    log.warning("image cache %s: %d bad image(s), e.g. %s", base, len(bad), bad[min(bad)])


def ensure_cache(source: Any, lay: Layout, cache_dir: str | None = None, workers: int = 0,
                 parallel: str = "threads", progress: bool = True) -> ImageCache:
  """The complete cache of source under lay, built (or finished) first if needed.

  workers > 0 decodes in that many threads or processes (``parallel``); the
  caller's process only writes. Safe to interrupt and to call from several
  processes at once (see the module docstring).
  """
  if parallel not in PARALLEL:
    raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
  base = cache_base(source, lay, cache_dir)
  key, n = base.rsplit("-", 1)[1], len(source)
  found = _complete(base, key, n, lay)
  if found is None:
    try:
      os.makedirs(os.path.dirname(base), exist_ok=True)
    except OSError as e:
      why = e.strerror or e
      raise OSError(f"cannot create the image cache folder {os.path.dirname(base)} ({why}): "
                    "set data.cache_dir to a writable folder") from None
    with _locked(base + ".lock", base):
      found = _complete(base, key, n, lay)  # another process may have built it meanwhile
      if found is None:
        _build(source, lay, base, key, workers, parallel, progress)
        found = _complete(base, key, n, lay)
        if found is None:
          raise OSError(f"image cache {base}: the build finished but its files do not check out")
        found.built = True
  (log.warning if found.built else log.info)("%s", found.summary())
  return found


def cache_sizes(cache_dir: str | None = None) -> list[dict]:
  """Every complete cache in cache_dir: file, source name, shape, bytes on disk, bad count."""
  d = resolve_cache_dir(cache_dir)
  rows = []
  for fn in sorted(os.listdir(d)) if os.path.isdir(d) else ():
    index = _read_json(os.path.join(d, fn)) if fn.endswith(".json") and ".partial" not in fn else None
    npy = os.path.join(d, fn[:-5] + ".npy")
    if index and "shape" in index and os.path.exists(npy):
      rows.append(dict(path=npy, source=index.get("source", ""), shape=index["shape"],
                       bytes=os.path.getsize(npy), bad=len(index.get("bad", {}))))
  return rows


def main(argv: Sequence[str] | None = None) -> None:
  """python -m qcs_jax.data.image_cache [--cache-dir D]: lists the caches and their sizes."""
  ap = argparse.ArgumentParser(description=main.__doc__)
  ap.add_argument("--cache-dir", default="", help=f"default {default_cache_dir()}")
  a = ap.parse_args(argv)
  rows = cache_sizes(a.cache_dir or None)
  for r in rows:
    n, h, w, _ = r["shape"]
    print(f"{r['bytes'] / 2**30:8.2f} GiB  {r['source']:<20} {n} x {h}x{w}  "
          f"{r['bad']} bad  {r['path']}")
  total = sum(r["bytes"] for r in rows)
  print(f"{total / 2**30:8.2f} GiB in {len(rows)} cache(s) under "
        f"{resolve_cache_dir(a.cache_dir or None)}", file=sys.stderr)


if __name__ == "__main__":
  main()
