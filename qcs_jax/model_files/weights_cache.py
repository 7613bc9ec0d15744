"""A saved model's arrays read with tensorstore alone: no orbax, no JAX.

`checkpoint.save_variables` writes orbax's StandardCheckpointer layout. Reading
it back through orbax costs ~0.5-1 s of imports before the first byte, a large
part of a warm `predict`; and since this module does not import JAX, a caller
can read the arrays in a thread (`start`) while JAX itself is being imported.

`start(DIR, cache_dir)` also keeps an uncompressed copy of the arrays in the
cache folder (`qcs_jax_weights/<key>.npw`, keyed by the checkpoint's path and
its files' sizes and times) and maps it on later loads: decompressing the
weights took 0.6-0.8 CPU-s of a ~2.5 s warm start on a 2-core machine, mapping
them takes milliseconds (JAX's CPU backend uses the mapped pages in place).
tensorstore is imported by `read_arrays`, in that thread, so that its import
overlaps JAX's too.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import pathlib
import struct
import tempfile
from typing import Any

import numpy as np

from qcs_jax.model_files.locate import CheckpointError


def read_arrays(path: str | os.PathLike) -> dict[str, Any] | None:
  """The arrays of an orbax StandardCheckpointer folder, read with tensorstore alone.

  Importing orbax costs ~0.5-1 s, a third of a warm `predict`; the layout
  save_variables writes (OCDBT, zarr v2, a tree of dict keys, numpy leaves) is
  simple enough to read directly. None for any other layout (the caller then
  restores through orbax). A file of this layout that cannot be read (truncated,
  missing) raises CheckpointError here: orbax, given it, would leave its reads'
  callbacks to run on a closed event loop (two 'Event loop is closed' tracebacks
  after the error line).
  """
  path = pathlib.Path(path).absolute()
  try:
    import tensorstore as ts  # pylint: disable=import-outside-toplevel
    meta = json.loads((path / '_METADATA').read_text())
    if not meta.get('use_ocdbt') or meta.get('use_zarr3'):
      return None
    keys = []
    for entry in meta['tree_metadata'].values():
      if entry['value_metadata'].get('value_type') != 'np.ndarray' or any(
          k.get('key_type') != 2 for k in entry['key_metadata']):
        return None
      keys.append(tuple(str(k['key']) for k in entry['key_metadata']))
    base = {'driver': 'ocdbt', 'base': path.as_uri() + '/'}
    ctx = ts.Context()
    opened = [ts.open({'driver': 'zarr', 'kvstore': dict(base, path='.'.join(k) + '/')},
                      open=True, read=True, context=ctx) for k in keys]
    reads = [o.result().read() for o in opened]
  except Exception:  # pylint: disable=broad-except
    return None
  out: dict[str, Any] = {}
  for k, r in zip(keys, reads):
    try:
      _nest(out, k, np.asarray(r.result()))
    except Exception as e:  # pylint: disable=broad-except  # tensorstore's read errors
      raise CheckpointError(f'{path}: cannot restore ({type(e).__name__}: {e})') from None
  return out


COPY_DIR = "qcs_jax_weights"  # beside the compiled programs, in the cache folder
COPY_MAGIC = b"qcs_jax.weights/1\n"
MAX_COPIES = 4  # weight copies kept; the least recently used go first
_ALIGN = 64  # XLA's CPU buffers alias host memory aligned like this, without a copy


def copy_key(variables: str | os.PathLike) -> str | None:
  """A digest of the checkpoint folder's identity: its path and every file's size and times.

  save_variables replaces a checkpoint by renaming a new folder into place, so
  rewritten weights always get a new key. None when the folder cannot be listed.
  """
  root = pathlib.Path(variables).absolute()
  try:
    sig = [str(root)]
    for dirpath, dirnames, files in os.walk(root):
      dirnames.sort()
      for name in sorted(files):
        st = os.stat(os.path.join(dirpath, name))
        sig.append([os.path.relpath(os.path.join(dirpath, name), root), st.st_size,
                    st.st_mtime_ns, st.st_ino])
  except OSError:
    return None
  if len(sig) == 1:
    return None
  return hashlib.sha256(json.dumps(sig).encode()).hexdigest()[:32]


def _nest(tree: dict, keys: Any, value: Any) -> None:
  """tree[k0][k1]...[kn] = value, making the inner dicts (the inverse of _leaves)."""
  for part in keys[:-1]:
    tree = tree.setdefault(part, {})
  tree[keys[-1]] = value


def _leaves(tree: dict, prefix: tuple = ()) -> list[tuple[tuple, np.ndarray]]:
  out = []
  for k in sorted(tree):
    v = tree[k]
    out += _leaves(v, prefix + (k,)) if isinstance(v, dict) else [(prefix + (k,), v)]
  return out


def write_copy(path: str | os.PathLike, key: str, arrays: dict[str, Any]) -> bool:
  """Writes arrays uncompressed to path (atomically; a full or read-only disk is skipped)."""
  leaves, index, offset = _leaves(arrays), [], 0
  if any(np.asarray(a).dtype.kind not in "biuf" for _, a in leaves):
    return False  # e.g. bfloat16 (no portable dtype string): read from the checkpoint
  for k, a in leaves:
    offset += -offset % _ALIGN
    index.append([list(k), list(a.shape), a.dtype.str, offset])
    offset += a.nbytes
  header = json.dumps({"key": key, "arrays": index, "data_bytes": offset}).encode()
  start = len(COPY_MAGIC) + 8 + len(header)
  start += -start % 4096  # the data begins on a page, so offsets keep their alignment
  path = pathlib.Path(path)
  tmp = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
      f.write(COPY_MAGIC + struct.pack("<Q", len(header)) + header)
      for (_, a), (_, _, _, off) in zip(leaves, index):
        f.seek(start + off)
        f.write(np.ascontiguousarray(a).tobytes())
      f.truncate(start + offset)
    os.replace(tmp, path)
    _prune(path.parent)
    return True
  except OSError:
    if tmp and os.path.exists(tmp):
      os.remove(tmp)
    return False


def read_copy(path: str | os.PathLike, key: str) -> dict[str, Any] | None:
  """The arrays write_copy saved, mapped read-only; None if absent, for another key or
  of the wrong size (a damaged or truncated file)."""
  try:
    with open(path, "rb") as f:
      head = f.read(len(COPY_MAGIC) + 8)
      if head[:len(COPY_MAGIC)] != COPY_MAGIC:
        return None
      (n,) = struct.unpack("<Q", head[len(COPY_MAGIC):])
      meta = json.loads(f.read(n))
    start = len(COPY_MAGIC) + 8 + n
    start += -start % 4096
    if meta.get("key") != key or os.path.getsize(path) != start + meta["data_bytes"]:
      return None
    data = np.memmap(path, np.uint8, "r", offset=start, shape=(meta["data_bytes"],))
    out: dict[str, Any] = {}
    for k, shape, dtype, off in meta["arrays"]:
      dt = np.dtype(dtype)
      count = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
      _nest(out, k, data[off:off + count].view(dt).reshape(shape))
    os.utime(path)  # recently used: kept by _prune
    return out
  except (OSError, ValueError, KeyError, TypeError, struct.error):
    return None


def _prune(folder: pathlib.Path) -> None:
  """Keeps the MAX_COPIES most recently used copies (a mapped copy outlives its removal)."""
  try:
    files = sorted(folder.glob("*.npw"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in files[MAX_COPIES:]:
      old.unlink()
  except OSError:
    pass


def read_cached(directory: str | os.PathLike, cache_dir: str | None) -> dict[str, Any] | None:
  """DIR/variables' arrays: from the uncompressed copy in cache_dir when there is a good
  one, else read_arrays (then the copy is written for next time); None as read_arrays."""
  variables = pathlib.Path(directory) / "variables"
  key = copy_key(variables) if cache_dir else None
  path = os.path.join(cache_dir, COPY_DIR, f"{key}.npw") if key else None
  if path:
    found = read_copy(path, key)
    if found is not None:
      return found
  arrays = read_arrays(variables)
  if arrays is not None and path:
    write_copy(path, key, arrays)
  return arrays


def start(directory: str | os.PathLike,
          cache_dir: str | None = None) -> concurrent.futures.Future:
  """read_cached(DIR, cache_dir) in a background thread; .result() gives its value."""
  pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qcs_read")
  future = pool.submit(read_cached, directory, cache_dir)
  pool.shutdown(wait=False)
  return future
