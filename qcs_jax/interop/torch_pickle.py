"""Reads `torch.save` files (.pth) into numpy state dicts without running their code.

Every file is first checked torch-free (`check_torch_file`): the pickle may only
name the harmless set of `pickle_safety` (a refusal names the global, e.g.
`posix.system (os.system)`), and zip entry sizes, storage sizes and tensor
shapes must fit the file and `pickle_safety.LIMITS` -- before any tensor
memory is allocated. Then plain state dicts go through
`torch.load(weights_only=True)` when torch is installed; full training
checkpoints (whose pickles name classes of the authors' `__main__` script)
and every file when torch is absent go through the restricted unpickler:
tensors become numpy arrays, script classes inert placeholders. Both the zip
format (torch >= 1.6) and the legacy format are read. See docs/CONVERTER.md.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import re
import reprlib
import struct
import zipfile
from typing import Any, Mapping

import numpy as np

from qcs_jax.interop import pickle_safety as ps
from qcs_jax.interop import unpickler
from qcs_jax.interop.pickle_safety import (  # pylint: disable=unused-import
    ConversionError, Inert, UnsafePickleError)

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_MIB = 1 << 20


class _Bounded(io.RawIOBase):
  """A file view that never reads past `end`: a pickle's length fields cannot size a read."""

  def __init__(self, f, end: int):
    super().__init__()
    self._f, self._end, self._pos = f, end, f.tell()

  def readable(self) -> bool:
    return True

  def _room(self, n: int | None) -> int:
    left = max(0, self._end - self._pos)
    return left if n is None or n < 0 else min(n, left)

  def read(self, n: int = -1) -> bytes:
    data = self._f.read(self._room(n))
    self._pos += len(data)
    return data

  def readinto(self, b) -> int:
    data = self.read(len(b))
    b[:len(data)] = data
    return len(data)

  def readline(self, n: int = -1) -> bytes:
    data = self._f.readline(self._room(n))
    self._pos += len(data)
    return data

  def tell(self) -> int:
    return self._pos

  def seek(self, pos: int, whence: int = 0) -> int:
    self._pos = self._f.seek(pos, whence)
    return self._pos


def _check_zip(zf: zipfile.ZipFile, path: str, limits: ps.Limits) -> str:
  """Declared entry sizes against the limits (zip bombs); returns the data.pkl name."""
  infos = zf.infolist()
  if len(infos) > limits.max_zip_entries:
    raise UnsafePickleError(f'{path}: {len(infos)} zip entries (limit '
                            f'{limits.max_zip_entries})')
  total = sum(i.file_size for i in infos)
  if total > limits.max_total_bytes:
    raise UnsafePickleError(
        f'{path}: the zip entries declare {total} bytes uncompressed, over the '
        f'{limits.max_total_bytes}-byte limit (a zip bomb?)')
  for i in infos:
    if i.file_size > _MIB and i.file_size > limits.max_zip_ratio * max(i.compress_size, 1):
      raise UnsafePickleError(
          f'{path}: entry {i.filename} expands {i.compress_size} -> {i.file_size} bytes, '
          f'over the {limits.max_zip_ratio:g}x ratio limit (a zip bomb?)')
  pkls = [i for i in infos if i.filename.endswith('data.pkl')]
  if len(pkls) != 1:
    raise ConversionError(f'{path}: a zip file but not a torch.save file (no data.pkl)')
  if pkls[0].file_size > limits.max_pickle_bytes:
    raise UnsafePickleError(f'{path}: {pkls[0].filename} is {pkls[0].file_size} bytes, over '
                            f'the {limits.max_pickle_bytes}-byte limit')
  return pkls[0].filename


def _read_zip(path: str, dry: bool) -> tuple[Any, set[str]]:
  """The torch >= 1.6 zip format: <prefix>/data.pkl + <prefix>/data/<key>."""
  with zipfile.ZipFile(path) as zf:
    pkl = _check_zip(zf, path, ps.LIMITS)
    prefix = pkl[:-len('data.pkl')]
    names = set(zf.namelist())
    order = '<'
    if prefix + 'byteorder' in names:
      order = '>' if zf.read(prefix + 'byteorder').strip() == b'big' else '<'
    cache: dict[str, np.ndarray] = {}

    def load(dtype, key, numel, view):
      name = f'{prefix}data/{key}'
      if name not in names:
        raise ConversionError(f'{path}: tensor storage {name} missing from the archive')
      have = zf.getinfo(name).file_size // dtype.itemsize
      if numel is not None and numel > have:
        raise ConversionError(f'{path}: storage {key} declares {numel} elements but its '
                              f'entry holds {have}: corrupt file')
      if dry:
        return _storage_view(ps.DryStorage(have, dtype), view)
      if key not in cache:
        cache[key] = _from_bytes(zf.read(name), dtype, order)
      return _storage_view(cache[key], view)

    with zf.open(pkl) as f:
      return unpickler.unpickle(io.BytesIO(f.read()), load)


def _from_bytes(raw: bytes, dtype: np.dtype, order: str) -> np.ndarray:
  """A storage's raw bytes -> a native-order numpy array."""
  native = '<' if np.little_endian else '>'
  usable = len(raw) - len(raw) % dtype.itemsize
  if order == native or dtype.itemsize == 1:
    return np.frombuffer(raw[:usable], dtype).copy()
  return np.frombuffer(raw[:usable], dtype.newbyteorder(order)).astype(dtype)


def _storage_view(storage, view):
  if view is None:
    return storage
  _, offset, size = view
  if isinstance(storage, ps.DryStorage):
    if offset < 0 or size < 0 or offset + size > storage.size:
      raise ConversionError(f'storage view {view!r} past its storage: corrupt file')
    return ps.DryStorage(size, storage.dtype)
  return storage[offset:offset + size]


def _read_legacy(path: str, dry: bool) -> tuple[Any, set[str]]:
  """The pre-1.6 format: magic, protocol, sys_info, object, keys, raw storages."""
  end = os.path.getsize(path)
  with open(path, 'rb') as raw_f:
    f = _Bounded(raw_f, end)

    def read_meta():
      obj, _ = unpickler.unpickle(f, lambda *a: None)
      return obj

    if read_meta() != _LEGACY_MAGIC:
      raise ConversionError(f'{path}: not a PyTorch checkpoint (bad magic number)')
    read_meta()  # protocol version
    sys_info = read_meta()
    little = not isinstance(sys_info, dict) or sys_info.get('little_endian', True)
    start = f.tell()
    # Pass 1 finds the end of the object pickle and the storages it names.
    seen: dict[str, tuple[np.dtype, int | None]] = {}

    def note(dtype, key, numel, view):
      seen[key] = (dtype, numel)
      return _storage_view(ps.DryStorage(numel or 0, dtype), view)

    _, placeholders = unpickler.unpickle(f, note)
    keys = read_meta()
    if not isinstance(keys, (list, tuple)):
      raise ConversionError(f'{path}: corrupt storage key list')
    storages, where, total = {}, {}, 0
    for key in keys:
      key = str(key)
      (numel,) = struct.unpack('<q' if little else '>q', f.read(8))
      if key not in seen:
        raise ConversionError(f'{path}: storage {key} is not named by the pickle')
      dtype, declared = seen[key]
      if declared is not None and declared > max(numel, 0):
        raise ConversionError(f'{path}: storage {key} declares {declared} elements but the '
                              f'file holds {numel}: corrupt file')
      nbytes = numel * dtype.itemsize
      total += max(nbytes, 0)
      if numel < 0 or nbytes > end - f.tell() or total > ps.LIMITS.max_total_bytes:
        raise UnsafePickleError(
            f'{path}: storage {key} declares {numel} elements ({nbytes} bytes) but '
            f'{end - f.tell()} bytes are left in the file (limit '
            f'{ps.LIMITS.max_total_bytes} in all)')
      where[key] = (f.tell(), numel, dtype)
      f.seek(nbytes, os.SEEK_CUR)
    if dry:  # pass 1 checked the tensors against the declared sizes, just checked above
      return None, placeholders
    for key, (pos, numel, dtype) in where.items():
      f.seek(pos)
      storages[key] = _from_bytes(f.read(numel * dtype.itemsize), dtype,
                                  '<' if little else '>')
    f.seek(start)

    def load(dtype, key, numel, view):
      del dtype, numel
      if key not in storages:
        raise ConversionError(f'{path}: storage {key} missing from the file')
      return _storage_view(storages[key], view)

    return unpickler.unpickle(f, load)


def check_torch_file(path: str | os.PathLike) -> set[str]:
  """Checks a .pth file without torch and without reading tensor data.

  Raises UnsafePickleError for a global outside the harmless set or a size
  over the limits, ConversionError for a corrupt file; returns the classes
  that will become inert placeholders.
  """
  return _read_restricted(os.fspath(path), dry=True)[1]


def read_torch_file_restricted(path: str) -> tuple[Any, set[str]]:
  """Unpickles a torch.save file with no torch and no foreign code.

  Returns the object (tensors as numpy arrays) and the qualified names of the
  classes that became inert placeholders.
  """
  return _read_restricted(os.fspath(path), dry=False)


def _read_restricted(path: str, dry: bool) -> tuple[Any, set[str]]:
  kind = _sniff(path)
  try:
    return _read_zip(path, dry) if kind == 'zip' else _read_legacy(path, dry)
  except ConversionError as e:  # UnsafePickleError too: the same type, naming the file
    msg = one_line(e, 300)
    raise type(e)(msg if msg.startswith(path) else f'{path}: {msg}') from None
  except (EOFError, zipfile.BadZipFile, struct.error) as e:
    raise ConversionError(f'{path}: truncated or corrupt file ({e})') from e
  except Exception as e:  # pylint: disable=broad-except  # every other failure: one line
    raise ConversionError(
        f'{path}: corrupt or not a PyTorch checkpoint ({type(e).__name__}: '
        f'{one_line(e)})') from e


def one_line(e: BaseException | str, limit: int = 200) -> str:
  """An exception's text on one line, at most `limit` characters."""
  text = ' '.join(str(e).split())
  return text if len(text) <= limit else text[:limit - 3] + '...'


def _sniff(path: str) -> str:
  """'zip' or 'legacy', after checking the file is at all a torch.save file."""
  if not os.path.isfile(path):
    raise ConversionError(f'{path}: no such file')
  with open(path, 'rb') as f:
    head = f.read(4)
  if not head:
    raise ConversionError(f'{path}: empty file (truncated?)')
  if head.startswith(b'PK'):
    if not zipfile.is_zipfile(path):
      raise ConversionError(
          f'{path}: truncated or corrupt (a zip archive without its central '
          'directory)')
    return 'zip'
  if head[:1] == b'\x80' and head[1:2] in (b'\x02', b'\x03', b'\x04', b'\x05'):
    return 'legacy'
  raise ConversionError(
      f'{path}: not a PyTorch checkpoint (starts with {head!r}, expected a '
      'torch.save zip archive or pickle)')


def _to_numpy(obj: Any) -> Any:
  """torch tensors (if torch loaded them) -> numpy; bfloat16 kept via ml_dtypes."""
  if hasattr(obj, 'detach') and hasattr(obj, 'dtype'):
    t = obj.detach().cpu()
    if str(t.dtype) == 'torch.bfloat16':
      return t.float().numpy().astype(ps.bfloat16())
    return t.numpy().copy()
  return obj


def _torch_refusal(e: Exception) -> str:
  """The informative line of torch's weights_only refusal, without ANSI codes."""
  text = re.sub(r'\x1b\[[0-9;]*m', '', str(e))
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  for line in lines:
    if 'GLOBAL' in line or 'Unsupported' in line:
      return line[:200]
  return lines[0][:200] if lines else type(e).__name__


def _extract_state_dict(obj: Any, path: str) -> tuple[dict, str]:
  """The state dict inside a checkpoint object, and what the object was."""
  if not isinstance(obj, Mapping):
    raise ConversionError(
        f'{path}: not a checkpoint (holds a {type(obj).__name__}, expected a '
        'state dict or a dict with "state_dict")')
  what = 'state dict'
  for entry in ('state_dict', 'model_state_dict', 'model'):
    if isinstance(obj.get(entry), Mapping):
      meta = {k: obj[k] for k in ('epoch', 'best_acc') if k in obj}
      meta_s = ', '.join(f'{k} {_short(v)}' for k, v in meta.items())
      what = f'training checkpoint, entry {entry!r}' + (
          f' ({meta_s})' if meta_s else '')
      obj = obj[entry]
      break
  sd = collections.OrderedDict()
  for k, v in obj.items():
    v = _to_numpy(v)
    if isinstance(v, np.ndarray):
      sd[str(k)] = v
  if not sd:
    raise ConversionError(
        f'{path}: not a checkpoint (no tensors among keys '
        f'{list(obj)[:5]})')
  return sd, what


_REPR = reprlib.Repr()  # Python 3.11's takes no keyword arguments
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 30, 30


def _short(v: Any) -> str:
  """A metadata value for the report; reprlib's depth limit (a 100k-deep list in `epoch`
  would make repr() raise RecursionError)."""
  v = _to_numpy(v)
  if isinstance(v, (np.ndarray, np.generic)) and np.size(v) == 1:
    try:
      return f'{np.asarray(v).item():g}'
    except (TypeError, ValueError):
      pass
  return _REPR.repr(v)[:40]


def load_torch_file(path: str | os.PathLike, prefer_torch: bool = True
                    ) -> tuple[dict[str, np.ndarray], str]:
  """Reads a .pth file -> (state dict of numpy arrays, how it was loaded).

  `torch.load(weights_only=True)` is used when torch is installed and
  `prefer_torch`, after the torch-free `check_torch_file` passed; full
  training checkpoints (objects of the authors' script classes) and
  everything when torch is missing use the restricted unpickler, which makes
  the same checks as it reads.
  """
  path = os.fspath(path)
  torch = None
  if prefer_torch:
    try:
      import torch  # pylint: disable=import-outside-toplevel  # optional dependency
    except ImportError:
      pass
  obj = None
  if torch is None:
    how = 'restricted unpickler' + (' (torch not installed)' if prefer_torch else '')
  elif check_torch_file(path):  # refuses hostile globals and sizes before torch runs
    how = 'restricted unpickler (the file names training-script classes)'
  else:
    try:
      obj = torch.load(path, map_location='cpu', weights_only=True)
      how = 'torch.load(weights_only=True)'
    except pickle.UnpicklingError as e:
      how = ('restricted unpickler (torch.load(weights_only=True) refused: '
             f'{_torch_refusal(e)})')
    except Exception:  # pylint: disable=broad-except
      how = 'restricted unpickler (torch.load failed)'  # error comes below
  if obj is None:
    obj, placeholders = read_torch_file_restricted(path)
    if placeholders:
      how += '; inert placeholders for ' + ', '.join(sorted(placeholders))
  try:
    sd, what = _extract_state_dict(obj, path)
  except ConversionError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # odd objects inside the file
    raise ConversionError(f'{path}: cannot read the checkpoint object ({type(e).__name__}: '
                          f'{one_line(e)})') from None
  return sd, f'{how}; {what}'
