"""What a restricted unpickle of a torch.save file may call, and its size limits.

The harmless set is: tensor and storage rebuilding (onto numpy), OrderedDict,
numpy arrays and scalars, and the plain builtin containers, each wrapped so it
can only copy data the pickle already holds (``bytearray(10**12)`` or
``list(range(10**12))`` are refused). Classes of a ``__main__`` training script
(the authors' ``RecorderMeter_loss``/``RecorderMeter_matrix``) become inert
placeholders that record their state and run nothing. Every other global
(``os.system``, ``subprocess.Popen``, ``builtins.eval``, ...) is refused with a
`UnsafePickleError` naming it, before anything it names is called.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import importlib
import math
import pickle
from typing import Any, Callable

import numpy as np


class ConversionError(ValueError):
  """A file or state dict that cannot be converted; nothing was written."""


class UnsafePickleError(ConversionError):
  """A pickle that names a callable outside the harmless set, or exceeds a size limit."""


@dataclasses.dataclass(frozen=True)
class Limits:
  """Size limits checked before memory is allocated for a .pth file's contents."""

  max_total_bytes: int = 16 << 30       # all tensor storages together
  max_pickle_bytes: int = 256 << 20     # data.pkl (tensors live outside it)
  max_zip_entries: int = 200_000
  max_zip_ratio: float = 100.0          # uncompressed / compressed, for entries > 1 MiB
  max_broadcast_bytes: int = 64 << 20   # a tensor larger than its storage (stride 0)


LIMITS = Limits()

# Module names whose classes may become inert placeholders: a training
# script's own classes, pickled while it ran as the main program.
PLACEHOLDER_MODULES = ('__main__',)
_ALIASES = {'posix': 'os', 'nt': 'os', '__builtin__': 'builtins'}

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


def qualified(module: str, name: str) -> str:
  """'posix.system (os.system)': the name as pickled, and as users know it."""
  q = f'{module}.{name}'
  alias = _ALIASES.get(module)
  return f'{q} ({alias}.{name})' if alias else q


def bfloat16():
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  return ml_dtypes.bfloat16


class StorageType:
  """What a `torch.XStorage` global stands for: an element dtype."""

  def __init__(self, name: str):
    self.name = name

  @property
  def dtype(self) -> np.dtype:
    if self.name == 'BFloat16Storage':
      return np.dtype(bfloat16())
    if self.name not in _STORAGE_DTYPES:
      raise ConversionError(f'unsupported tensor storage torch.{self.name}')
    return np.dtype(_STORAGE_DTYPES[self.name])


@dataclasses.dataclass(frozen=True)
class DryStorage:
  """A storage's element count and dtype, used when checking a file without its data."""

  size: int
  dtype: np.dtype


class Inert:
  """Stands in for a class of the training script (e.g. `__main__.RecorderMeter_loss`).

  It records its arguments and state and does nothing else; the class itself
  is never imported.
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
def inert_class(module: str, name: str) -> type:
  return type(name, (Inert,), {'qualname': f'{module}.{name}'})


class _Marker:
  """A global that may appear as an argument but must never be called."""

  def __init__(self, name: str):
    self.name = name

  def __repr__(self):
    return f'<{self.name}>'


_NDARRAY = _Marker('numpy.ndarray')
_TENSOR_TYPES = {('torch', 'Tensor'), ('torch.nn.parameter', 'Parameter')}


def rebuild_tensor(storage, offset, size, stride, *unused):
  """torch._utils._rebuild_tensor(_v2) on a numpy (or dry) storage, sizes checked first."""
  del unused
  size, stride = tuple(int(n) for n in size), tuple(int(s) for s in stride)
  offset = int(offset)
  if any(n < 0 for n in size) or any(s < 0 for s in stride) or offset < 0:
    raise ConversionError(f'tensor with negative shape {size}, stride {stride} or offset '
                          f'{offset}: corrupt file')
  numel = math.prod(size)
  nbytes = numel * storage.dtype.itemsize
  need = 0 if numel == 0 else offset + 1 + sum((n - 1) * s for n, s in zip(size, stride))
  if need > storage.size:
    raise ConversionError(
        f'tensor of shape {size} reads past its storage ({storage.size} '
        'elements): corrupt file')
  if numel > storage.size and nbytes > LIMITS.max_broadcast_bytes:
    raise UnsafePickleError(
        f'tensor of shape {size} ({nbytes} bytes) is larger than its storage '
        f'({storage.size} elements) and the {LIMITS.max_broadcast_bytes}-byte limit')
  if isinstance(storage, DryStorage):
    return None
  if not size:
    return np.array(storage[offset])
  if numel == 0:
    return np.zeros(size, storage.dtype)
  item = storage.itemsize
  return np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size, strides=[s * item for s in stride]).copy()


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks,
                       dtype, *unused):
  del dtype, requires_grad, hooks, unused
  return rebuild_tensor(storage, offset, size, stride)


def _rebuild_parameter(data, *unused):
  del unused
  return data


_REBUILDERS = {'_rebuild_tensor': rebuild_tensor, '_rebuild_tensor_v2': rebuild_tensor,
               '_rebuild_tensor_v3': _rebuild_tensor_v3,
               '_rebuild_parameter': _rebuild_parameter,
               '_rebuild_parameter_with_state': _rebuild_parameter}


def _rebuild_from_type_v2(func, new_type, args, state):
  """torch._tensor._rebuild_from_type_v2 for plain tensors and parameters only."""
  del state
  if func not in _REBUILDERS.values() or new_type not in _TENSOR_TYPES:
    raise UnsafePickleError(f'refusing to rebuild a tensor of type {new_type!r} with {func!r}')
  return func(*args)


def _reconstructor(cls, base, state):
  """copyreg._reconstructor, allowed only for inert placeholders."""
  del base, state
  if isinstance(cls, type) and issubclass(cls, Inert):
    return cls.__new__(cls)
  raise UnsafePickleError(f'refusing to reconstruct {cls!r}')


def _numpy_reconstruct(subtype, shape, dtype):
  """numpy's array pickling first makes an empty (0,) array; its data comes in BUILD."""
  if subtype is not _NDARRAY or math.prod(tuple(shape)) > 0:
    raise UnsafePickleError(f'refusing numpy _reconstruct({subtype!r}, {shape!r})')
  return _numpy_multiarray()._reconstruct(np.ndarray, shape, dtype)  # pylint: disable=protected-access


def _numpy_multiarray():
  try:
    return importlib.import_module('numpy._core.multiarray')
  except ImportError:  # numpy < 2
    return importlib.import_module('numpy.core.multiarray')


def _numpy_scalar(dtype, data=None):
  if not isinstance(dtype, np.dtype) or dtype.hasobject:
    raise UnsafePickleError(f'refusing numpy scalar of dtype {dtype!r}')
  return np.frombuffer(data, dtype=dtype, count=1)[0]


def _codecs_encode(obj, encoding='utf-8', errors='strict'):
  if not isinstance(obj, str) or encoding not in ('latin1', 'latin-1'):
    raise UnsafePickleError(f'refusing _codecs.encode with encoding {encoding!r}')
  return obj.encode(encoding, errors)


_MATERIAL = (list, tuple, set, frozenset, dict, collections.OrderedDict)


def _copying(ctor: Callable, accepts: tuple[type, ...]) -> Callable:
  """ctor(x) only for x already held by the pickle: never a count or a lazy range."""

  def build(*args):
    if len(args) > 2 or (args and not isinstance(args[0], accepts)):
      raise UnsafePickleError(
          f'refusing {ctor.__name__}{tuple(type(a).__name__ for a in args)}: only copies of '
          'data held in the file are allowed')
    if len(args) == 2 and not (ctor in (bytes, bytearray, str) and isinstance(args[1], str)):
      raise UnsafePickleError(f'refusing {ctor.__name__} with two arguments')
    return ctor(*args)

  build.__name__ = ctor.__name__
  return build


_SAFE_BUILTINS = {
    'set': _copying(set, _MATERIAL), 'frozenset': _copying(frozenset, _MATERIAL),
    'tuple': _copying(tuple, _MATERIAL), 'list': _copying(list, _MATERIAL),
    'dict': _copying(dict, _MATERIAL),
    'bytes': _copying(bytes, (bytes, bytearray, str)),
    'bytearray': _copying(bytearray, (bytes, bytearray, str)),
    'str': _copying(str, (str, bytes, bytearray, int, float)),
    'int': _copying(int, (str, int, float, bytes)), 'float': _copying(float, (str, int, float)),
    'complex': _copying(complex, (str, int, float, complex)),
    'bool': _copying(bool, (int, bool)), 'slice': slice, 'range': range,
}


def allowed_global(module: str, name: str) -> Any:
  """The object a restricted load uses for `module.name`; None if it is not harmless."""
  if (module, name) == ('collections', 'OrderedDict'):
    return _copying(collections.OrderedDict, _MATERIAL)
  if module == 'torch._utils':
    return _REBUILDERS.get(name)
  if (module, name) == ('torch._tensor', '_rebuild_from_type_v2'):
    return _rebuild_from_type_v2
  if (module, name) in _TENSOR_TYPES:
    return _Marker(f'{module}.{name}')
  if module == 'torch':
    if name.endswith('Storage'):
      return StorageType(name)
    if name == 'Size':
      return _copying(tuple, (list, tuple))
    if name == 'device':
      return _copying(str, (str,))
    if name in _TORCH_DTYPES:
      return np.dtype(_TORCH_DTYPES[name])
    if name == 'bfloat16':
      return np.dtype(bfloat16())
  if module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
    if name == '_reconstruct':
      return _numpy_reconstruct
    if name == 'scalar':
      return _numpy_scalar
  if (module, name) == ('numpy', 'ndarray'):
    return _NDARRAY
  if (module, name) == ('numpy', 'dtype'):
    return np.dtype
  if module == 'numpy.dtypes' and name.endswith('DType'):
    return getattr(np.dtypes, name, None)
  if (module, name) == ('_codecs', 'encode'):
    return _codecs_encode
  if (module, name) == ('copyreg', '_reconstructor'):
    return _reconstructor
  if module in ('builtins', '__builtin__'):
    return _SAFE_BUILTINS.get(name)
  return None


# The pure-Python unpickler keeps its memo in a dict: the C one sizes a list by
# the largest memo index a pickle names, so LONG_BINPUT 2**31 would take 16 GiB.
_PyUnpickler = pickle._Unpickler  # pylint: disable=protected-access


class RestrictedUnpickler(_PyUnpickler):
  """Tensors, storages, containers and numpy arrays; __main__ classes inert; all else refused."""

  def __init__(self, file, storage_loader):
    super().__init__(file)
    self._storage_loader = storage_loader
    self.placeholders: set[str] = set()

  def find_class(self, module, name):
    module, name = str(module), str(name)
    obj = allowed_global(module, name)
    if obj is not None:
      return obj
    if module in PLACEHOLDER_MODULES:
      self.placeholders.add(f'{module}.{name}')
      return inert_class(module, name)
    raise UnsafePickleError(
        f'refusing to load: the pickle calls {qualified(module, name)}, which is outside '
        'the harmless set (tensors, storages, containers, numpy arrays, classes of a '
        '__main__ training script); nothing was run')

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or len(pid) < 3 or pid[0] != 'storage':
      raise ConversionError(f'unknown persistent id {pid!r}')
    storage_type, key = pid[1], str(pid[2])
    if not isinstance(storage_type, StorageType):
      raise ConversionError(f'unknown storage type {storage_type!r}')
    numel = pid[4] if len(pid) > 4 and isinstance(pid[4], int) else None
    view = pid[5] if len(pid) > 5 else None
    return self._storage_loader(storage_type.dtype, key, numel, view)


def unpickle(data, storage_loader) -> tuple[Any, set[str]]:
  up = RestrictedUnpickler(data, storage_loader)
  return up.load(), up.placeholders
