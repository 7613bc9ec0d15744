"""What a restricted unpickle of a torch.save file may call, and its size limits.

The harmless set is: tensor and storage rebuilding (onto numpy), OrderedDict,
numpy arrays and scalars, and the plain builtin containers, each wrapped so it
can only copy data the pickle already holds (``bytearray(10**12)`` or
``list(range(10**12))`` are refused). Classes of a ``__main__`` training script
(the authors' ``RecorderMeter_loss``/``RecorderMeter_matrix``) become inert
placeholders that record their state and run nothing. Every other global
(``os.system``, ``subprocess.Popen``, ``builtins.eval``, ...) is refused with a
`UnsafePickleError` naming it, before anything it names is called.

Each load has its own `Budget`: the opcodes run, the memo, the distinct
globals named and the tensor bytes materialised beyond the file's own storages
are counted against `LIMITS`, and every object a global stands for is made
afresh for that load (BUILD may only set the state of objects the load itself
created: placeholders, arrays, dicts), so nothing one file does reaches another.
The unpickler that runs a pickle under these rules is interop/unpickler.py.
"""
from __future__ import annotations

import collections
import dataclasses
import importlib
import math
from typing import Any, Callable

import ml_dtypes
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
  max_expansion_bytes: int = 256 << 20  # tensor bytes beyond the storages', whole file
  max_pickle_ops: int = 1_000_000       # opcodes run per pickle (~75 B of objects each)
  max_memo: int = 500_000               # memo entries per pickle
  max_globals: int = 1_000              # distinct globals one pickle may name


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


def inert_class(module: str, name: str) -> type:
  """A new placeholder class (each load makes its own: no process-wide cache to fill)."""
  return type(name, (Inert,), {'qualname': f'{module}.{name}'})


class _Marker:
  """A global that may appear as an argument but must never be called."""

  def __init__(self, name: str):
    self.name = name

  def __repr__(self):
    return f'<{self.name}>'


_TENSOR_TYPES = {'torch.Tensor', 'torch.nn.parameter.Parameter'}


class Budget:
  """What one load may spend: opcodes, memo, globals, materialised tensor bytes.

  Also makes the objects the load's globals stand for, afresh, and remembers
  which rebuild functions are its own (`_rebuild_from_type_v2` accepts only those).
  """

  def __init__(self, limits: 'Limits'):
    self.limits = limits
    self.ops = 0
    self.globals: set[tuple[str, str]] = set()
    self.storage_bytes = 0   # bytes of the distinct storages loaded so far
    self.tensor_bytes = 0    # bytes of the tensors rebuilt so far
    self._storages: set[str] = set()
    self.inert: dict[tuple[str, str], type] = {}
    self.rebuilders = {'_rebuild_tensor': self.rebuild_tensor,
                       '_rebuild_tensor_v2': self.rebuild_tensor,
                       '_rebuild_tensor_v3': self._rebuild_tensor_v3,
                       '_rebuild_parameter': _rebuild_parameter,
                       '_rebuild_parameter_with_state': _rebuild_parameter}
    self._rebuilder_ids = {id(f) for f in self.rebuilders.values()}

  def name_global(self, module: str, name: str) -> None:
    self.globals.add((module, name))
    if len(self.globals) > self.limits.max_globals:
      raise UnsafePickleError(f'the pickle names more than {self.limits.max_globals} '
                              'distinct globals')

  def note_storage(self, key: str, storage: Any) -> None:
    """A storage named by the pickle; each key's bytes count once however often it is named."""
    if key not in self._storages and storage is not None:
      self._storages.add(key)
      self.storage_bytes += int(storage.size) * storage.dtype.itemsize

  def rebuild_tensor(self, storage, offset, size, stride, *unused):
    """torch._utils._rebuild_tensor(_v2) on a numpy (or dry) storage, sizes checked first."""
    del unused
    if not isinstance(storage, (np.ndarray, DryStorage)):
      raise ConversionError(f'tensor storage is a {type(storage).__name__}: corrupt file')
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
    lim = self.limits
    if numel > storage.size and nbytes > lim.max_broadcast_bytes:
      raise UnsafePickleError(
          f'tensor of shape {size} ({nbytes} bytes) is larger than its storage '
          f'({storage.size} elements) and the {lim.max_broadcast_bytes}-byte limit')
    self.tensor_bytes += nbytes
    if self.tensor_bytes > self.storage_bytes + lim.max_expansion_bytes:
      raise UnsafePickleError(
          f'the tensors so far take {self.tensor_bytes} bytes, more than their storages '
          f'({self.storage_bytes} bytes) plus the {lim.max_expansion_bytes}-byte limit '
          '(views repeated or broadcast)')
    if isinstance(storage, DryStorage):
      return None
    if not size:
      return np.array(storage[offset])
    if numel == 0:
      return np.zeros(size, storage.dtype)
    item = storage.itemsize
    return np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=[s * item for s in stride]).copy()

  def _rebuild_tensor_v3(self, storage, offset, size, stride, requires_grad, hooks,
                         dtype, *unused):
    del dtype, requires_grad, hooks, unused
    return self.rebuild_tensor(storage, offset, size, stride)

  def rebuild_from_type_v2(self, func, new_type, args, state):
    """torch._tensor._rebuild_from_type_v2 for plain tensors and parameters only.

    `state` holds the tensor's Python attributes (t.note = ...): dropped, as
    numpy arrays take none and the converter reads only the values.
    """
    del state
    name = new_type.name if isinstance(new_type, _Marker) else None
    if id(func) not in self._rebuilder_ids or name not in _TENSOR_TYPES:
      raise UnsafePickleError(f'refusing to rebuild a tensor of type {new_type!r} with '
                              f'{func!r}')
    return func(*args)

  def inert_class(self, module: str, name: str) -> type:
    key = (module, name)
    if key not in self.inert:
      self.inert[key] = inert_class(module, name)
    return self.inert[key]


def rebuild_tensor(storage, offset, size, stride, *unused):
  """One tensor rebuilt under the default limits (a budget of its own)."""
  return Budget(LIMITS).rebuild_tensor(storage, offset, size, stride, *unused)


def _rebuild_parameter(data, *unused):
  del unused
  return data


def _reconstructor(cls, base, state):
  """copyreg._reconstructor, allowed only for inert placeholders."""
  del base, state
  if isinstance(cls, type) and issubclass(cls, Inert):
    return cls.__new__(cls)
  raise UnsafePickleError(f'refusing to reconstruct {cls!r}')


def _numpy_reconstruct(subtype, shape, dtype):
  """numpy's array pickling first makes an empty (0,) array; its data comes in BUILD."""
  if not (isinstance(subtype, _Marker) and subtype.name == 'numpy.ndarray') or math.prod(
      tuple(shape)) > 0:
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


def _numpy_dtype(obj, align=False, copy=False):
  """numpy.dtype(...), always a copy: BUILD then sets the state of this load's own object,
  never of numpy's shared float32."""
  del copy
  if not isinstance(obj, str):
    raise UnsafePickleError(f'refusing numpy.dtype of a {type(obj).__name__}')
  return np.dtype(obj, bool(align), True)


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


_SAFE_BUILTINS: dict[str, tuple[Callable, tuple[type, ...]] | None] = {
    'set': (set, _MATERIAL), 'frozenset': (frozenset, _MATERIAL),
    'tuple': (tuple, _MATERIAL), 'list': (list, _MATERIAL), 'dict': (dict, _MATERIAL),
    'bytes': (bytes, (bytes, bytearray, str)), 'bytearray': (bytearray, (bytes, bytearray, str)),
    'str': (str, (str, bytes, bytearray, int, float)), 'int': (int, (str, int, float, bytes)),
    'float': (float, (str, int, float)), 'complex': (complex, (str, int, float, complex)),
    'bool': (bool, (int, bool)), 'slice': None, 'range': None,
}


def allowed_global(module: str, name: str, budget: Budget | None = None) -> Any:
  """A new object standing for `module.name` in one load; None if it is not harmless."""
  budget = budget or Budget(LIMITS)
  if (module, name) == ('collections', 'OrderedDict'):
    return _copying(collections.OrderedDict, _MATERIAL)
  if module == 'torch._utils':
    return budget.rebuilders.get(name)
  if (module, name) == ('torch._tensor', '_rebuild_from_type_v2'):
    return budget.rebuild_from_type_v2
  if f'{module}.{name}' in _TENSOR_TYPES:
    return _Marker(f'{module}.{name}')
  if module == 'torch':
    if name.endswith('Storage'):
      return StorageType(name)
    if name == 'Size':
      return _copying(tuple, (list, tuple))
    if name == 'device':
      return _copying(str, (str,))
    if name in _TORCH_DTYPES:
      return np.dtype(_TORCH_DTYPES[name], copy=True)
    if name == 'bfloat16':
      return np.dtype(bfloat16(), copy=True)
  if module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
    if name == '_reconstruct':
      return _copying_fn(_numpy_reconstruct)
    if name == 'scalar':
      return _copying_fn(_numpy_scalar)
  if (module, name) == ('numpy', 'ndarray'):
    return _Marker('numpy.ndarray')
  if (module, name) == ('numpy', 'dtype'):
    return _copying_fn(_numpy_dtype)
  if module == 'numpy.dtypes' and name.endswith('DType'):
    cls = getattr(np.dtypes, name, None)
    return None if cls is None else _copying_fn(lambda *a: np.dtype(cls(*a), copy=True))
  if (module, name) == ('_codecs', 'encode'):
    return _copying_fn(_codecs_encode)
  if (module, name) == ('copyreg', '_reconstructor'):
    return _copying_fn(_reconstructor)
  if module in ('builtins', '__builtin__') and name in _SAFE_BUILTINS:
    spec = _SAFE_BUILTINS[name]
    if spec is None:
      return _copying_fn(slice if name == 'slice' else range)
    return _copying(*spec)
  return None


def _copying_fn(fn: Callable) -> Callable:
  """A new function object calling `fn`: what a BUILD could alter is this load's alone."""
  return lambda *args: fn(*args)
