"""Reads `torch.save` files (.pth) into numpy state dicts without running their code.

Plain state dicts go through `torch.load(weights_only=True)` when torch is
installed; full training checkpoints (whose pickles name classes of the
authors' training script) and every file when torch is absent go through the
restricted, torch-free unpickler here: tensors and storages become numpy
arrays, any other class an inert placeholder. Both the zip format
(torch >= 1.6) and the legacy format are read. See CONVERTER.md.
"""
from __future__ import annotations

import codecs
import collections
import functools
import importlib
import io
import math
import os
import pickle
import re
import struct
import zipfile
from typing import Any, Mapping

import numpy as np

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


class ConversionError(ValueError):
  """A file or state dict that cannot be converted; nothing was written."""


# ----------------------------------------------------------------------------
# The restricted unpickler: storages, tensors and a few safe globals.

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64,
    'HalfStorage': np.float16, 'LongStorage': np.int64,
    'IntStorage': np.int32, 'ShortStorage': np.int16, 'CharStorage': np.int8,
    'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
    'ComplexFloatStorage': np.complex64, 'ComplexDoubleStorage': np.complex128,
}
_TORCH_DTYPES = {
    'float32': np.float32, 'float': np.float32, 'float64': np.float64,
    'double': np.float64, 'float16': np.float16, 'half': np.float16,
    'int64': np.int64, 'long': np.int64, 'int32': np.int32, 'int': np.int32,
    'int16': np.int16, 'int8': np.int8, 'uint8': np.uint8, 'bool': np.bool_,
}


def _bfloat16():
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  return ml_dtypes.bfloat16


class _StorageType:
  """What a `torch.XStorage` global stands for: an element dtype."""

  def __init__(self, name: str):
    self.name = name

  @property
  def dtype(self):
    if self.name == 'BFloat16Storage':
      return np.dtype(_bfloat16())
    if self.name not in _STORAGE_DTYPES:
      raise ConversionError(f'unsupported tensor storage torch.{self.name}')
    return np.dtype(_STORAGE_DTYPES[self.name])


class Inert:
  """Stands in for any class or function a restricted pickle names.

  It records its arguments and state and does nothing else, so a checkpoint's
  `__main__.RecorderMeter_loss` (or anything malicious) is never imported or run.
  """
  qualname = '?'

  def __new__(cls, *args, **kwargs):
    del args, kwargs
    return object.__new__(cls)

  def __init__(self, *args, **kwargs):
    self.args, self.kwargs, self.state, self.items = args, kwargs, None, []

  def __setstate__(self, state):
    self.state = state

  def __setitem__(self, key, value):
    self.items.append((key, value))

  def append(self, value):
    self.items.append(value)

  def extend(self, values):
    self.items.extend(values)

  def __repr__(self):
    return f'<inert {self.qualname}>'


@functools.lru_cache(maxsize=None)
def _inert_class(module: str, name: str) -> type:
  return type(name, (Inert,), {'qualname': f'{module}.{name}'})


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """torch._utils._rebuild_tensor(_v2) on a numpy storage."""
  del unused
  if storage is None:  # first pass of a legacy file: storages not read yet
    return None
  size, stride = tuple(size), tuple(stride)
  if not size:
    return np.array(storage[offset])
  if math.prod(size) == 0:
    return np.zeros(size, storage.dtype)
  need = offset + 1 + sum((n - 1) * s for n, s in zip(size, stride))
  if need > storage.size:
    raise ConversionError(
        f'tensor of shape {size} reads past its storage ({storage.size} '
        'elements): corrupt file')
  item = storage.itemsize
  return np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size, strides=[s * item for s in stride]).copy()


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks,
                       dtype, *unused):
  del dtype, requires_grad, hooks, unused
  return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_parameter(data, *unused):
  del unused
  return data


def _reconstructor(cls, base, state):
  """copyreg._reconstructor, allowed only for inert placeholders."""
  del base, state
  if isinstance(cls, type) and issubclass(cls, Inert):
    return cls.__new__(cls)
  raise ConversionError(f'refusing to reconstruct {cls!r}')


_SAFE_BUILTINS = {'set', 'frozenset', 'tuple', 'list', 'dict', 'int', 'float',
                  'complex', 'bool', 'str', 'bytes', 'bytearray', 'slice',
                  'range'}


def _allowed_global(module: str, name: str) -> Any:
  """The few callables a restricted load may use; None for everything else."""
  import builtins  # pylint: disable=import-outside-toplevel
  if (module, name) == ('collections', 'OrderedDict'):
    return collections.OrderedDict
  if module == 'torch._utils':
    return {'_rebuild_tensor': _rebuild_tensor,
            '_rebuild_tensor_v2': _rebuild_tensor,
            '_rebuild_tensor_v3': _rebuild_tensor_v3,
            '_rebuild_parameter': _rebuild_parameter,
            '_rebuild_parameter_with_state': _rebuild_parameter}.get(name)
  if module == 'torch':
    if name.endswith('Storage'):
      return _StorageType(name)
    if name == 'Size':
      return tuple
    if name == 'device':
      return str
    if name in _TORCH_DTYPES:
      return np.dtype(_TORCH_DTYPES[name])
    if name == 'bfloat16':
      return np.dtype(_bfloat16())
  if module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
    if name == '_reconstruct':
      return _numpy_multiarray()._reconstruct  # pylint: disable=protected-access
    if name == 'scalar':
      return _numpy_scalar
  if module == 'numpy' and name in ('ndarray', 'dtype'):
    return getattr(np, name)
  if module == 'numpy.dtypes' and name.endswith('DType'):
    return getattr(np.dtypes, name, None)
  if (module, name) == ('_codecs', 'encode'):
    return codecs.encode
  if (module, name) == ('copyreg', '_reconstructor'):
    return _reconstructor
  if module in ('builtins', '__builtin__') and name in _SAFE_BUILTINS:
    return getattr(builtins, name)
  return None


def _numpy_multiarray():
  try:
    return importlib.import_module('numpy._core.multiarray')
  except ImportError:  # numpy < 2
    return importlib.import_module('numpy.core.multiarray')


def _numpy_scalar(dtype, data=None):
  if not isinstance(dtype, np.dtype) or dtype.hasobject:
    raise ConversionError(f'refusing numpy scalar of dtype {dtype!r}')
  return np.frombuffer(data, dtype=dtype, count=1)[0]


class _RestrictedUnpickler(pickle.Unpickler):
  """Tensors, storages, OrderedDicts and numpy arrays; all else is Inert."""

  def __init__(self, file, storage_loader):
    super().__init__(file)
    self._storage_loader = storage_loader
    self.placeholders: set[str] = set()

  def find_class(self, module, name):
    obj = _allowed_global(module, name)
    if obj is not None:
      return obj
    self.placeholders.add(f'{module}.{name}')
    return _inert_class(module, name)

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid or pid[0] != 'storage':
      raise ConversionError(f'unknown persistent id {pid!r}')
    storage_type, key = pid[1], str(pid[2])
    if not isinstance(storage_type, _StorageType):
      raise ConversionError(f'unknown storage type {storage_type!r}')
    view = pid[5] if len(pid) > 5 else None
    return self._storage_loader(storage_type.dtype, key, view)


def _unpickle(data: io.BufferedIOBase, storage_loader) -> tuple[Any, set[str]]:
  up = _RestrictedUnpickler(data, storage_loader)
  return up.load(), up.placeholders


def _read_zip(path: str) -> tuple[Any, set[str]]:
  """The torch >= 1.6 zip format: <prefix>/data.pkl + <prefix>/data/<key>."""
  with zipfile.ZipFile(path) as zf:
    pkls = [n for n in zf.namelist() if n.endswith('data.pkl')]
    if len(pkls) != 1:
      raise ConversionError(
          f'{path}: a zip file but not a torch.save file (no data.pkl)')
    prefix = pkls[0][:-len('data.pkl')]
    order = '<'
    if prefix + 'byteorder' in zf.namelist():
      order = '>' if zf.read(prefix + 'byteorder').strip() == b'big' else '<'
    cache: dict[str, np.ndarray] = {}

    def load(dtype, key, view):
      if key not in cache:
        raw = zf.read(f'{prefix}data/{key}')
        cache[key] = _from_bytes(raw, dtype, order)
      return _storage_view(cache[key], view)

    with zf.open(pkls[0]) as f:
      return _unpickle(io.BytesIO(f.read()), load)


def _from_bytes(raw: bytes, dtype: np.dtype, order: str) -> np.ndarray:
  """A storage's raw bytes -> a native-order numpy array."""
  native = '<' if np.little_endian else '>'
  if order == native or dtype.itemsize == 1:
    return np.frombuffer(raw, dtype).copy()
  return np.frombuffer(raw, dtype.newbyteorder(order)).astype(dtype)


def _storage_view(storage: np.ndarray, view) -> np.ndarray:
  if view is None:
    return storage
  _, offset, size = view
  return storage[offset:offset + size]


def _read_legacy(path: str) -> tuple[Any, set[str]]:
  """The pre-1.6 format: magic, protocol, sys_info, object, keys, raw storages."""
  with open(path, 'rb') as f:
    def read_meta():
      obj, _ = _unpickle(f, lambda *a: None)
      return obj

    if read_meta() != _LEGACY_MAGIC:
      raise ConversionError(f'{path}: not a PyTorch checkpoint (bad magic number)')
    read_meta()  # protocol version
    sys_info = read_meta()
    little = not isinstance(sys_info, dict) or sys_info.get('little_endian', True)
    start = f.tell()
    # Pass 1 finds the end of the object pickle and the storages it names.
    seen: dict[str, np.dtype] = {}

    def note(dtype, key, view):
      del view
      seen[key] = dtype

    _unpickle(f, note)
    keys = read_meta()
    storages = {}
    for key in keys:
      (numel,) = struct.unpack('<q' if little else '>q', f.read(8))
      dtype = seen[str(key)]
      nbytes = numel * dtype.itemsize
      raw = f.read(nbytes)
      if len(raw) != nbytes:
        raise EOFError('storage data cut short')
      storages[str(key)] = _from_bytes(raw, dtype, '<' if little else '>')
    f.seek(start)
    return _unpickle(f, lambda dtype, key, view: _storage_view(
        storages[key], view))


def read_torch_file_restricted(path: str) -> tuple[Any, set[str]]:
  """Unpickles a torch.save file with no torch and no foreign code.

  Returns the object (tensors as numpy arrays) and the qualified names of the
  classes that became inert placeholders.
  """
  kind = _sniff(path)
  try:
    return _read_zip(path) if kind == 'zip' else _read_legacy(path)
  except ConversionError:
    raise
  except (EOFError, zipfile.BadZipFile, struct.error) as e:
    raise ConversionError(f'{path}: truncated or corrupt file ({e})') from e
  except (pickle.UnpicklingError, KeyError, ValueError, TypeError,
          IndexError) as e:
    raise ConversionError(
        f'{path}: corrupt or not a PyTorch checkpoint ({type(e).__name__}: '
        f'{e})') from e


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
      return t.float().numpy().astype(_bfloat16())
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


def _short(v: Any) -> str:
  v = _to_numpy(v)
  if isinstance(v, (np.ndarray, np.generic)) and np.size(v) == 1:
    return f'{np.asarray(v).item():g}'
  return repr(v)[:40]


def load_torch_file(path: str | os.PathLike, prefer_torch: bool = True
                    ) -> tuple[dict[str, np.ndarray], str]:
  """Reads a .pth file -> (state dict of numpy arrays, how it was loaded).

  Tries `torch.load(weights_only=True)` when torch is installed and
  `prefer_torch`; full training checkpoints (objects of the authors' script
  classes) and everything when torch is missing use the restricted unpickler.
  """
  path = os.fspath(path)
  _sniff(path)
  how = None
  obj = None
  if prefer_torch:
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
      torch = None
      how = 'restricted unpickler (torch not installed)'
    if torch is not None:
      try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
        how = 'torch.load(weights_only=True)'
      except pickle.UnpicklingError as e:
        how = ('restricted unpickler (torch.load(weights_only=True) refused: '
               f'{_torch_refusal(e)})')
      except Exception:  # pylint: disable=broad-except
        how = 'restricted unpickler (torch.load failed)'  # error comes below
  else:
    how = 'restricted unpickler'
  if obj is None:
    obj, placeholders = read_torch_file_restricted(path)
    if placeholders:
      how += '; inert placeholders for ' + ', '.join(sorted(placeholders))
  sd, what = _extract_state_dict(obj, path)
  return sd, f'{how}; {what}'
