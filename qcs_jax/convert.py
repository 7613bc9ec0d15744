"""PyTorch checkpoints (IR50 ir50.pth, QCS/DCS training files) -> Flax variables.

Reads `torch.save` files (zip or legacy format) without executing code from
them, maps the authors' key names onto the Flax tree of qcs_jax.models, and
checks every shape against the target model config. See CONVERTER.md.

torch is optional: with it, plain state dicts go through
`torch.load(weights_only=True)`; full training checkpoints (whose pickles name
classes of the authors' training script) and every file when torch is absent
go through the restricted, torch-free unpickler below.
"""
from __future__ import annotations

import codecs
import collections
import dataclasses
import functools
import importlib
import io
import math
import os
import pickle
import re
import struct
import zipfile
from typing import Any, Callable, Iterable, Mapping

import numpy as np

Path = tuple[str, ...]

NUM_BRANCHES = {'baseline': 1, 'dcs': 2, 'qcs': 4}

# config.model defaults (ARCHITECTURE.md, team brief): the paper's model.
DEFAULT_MODEL_CFG: dict[str, Any] = dict(
    name='qcs', csa='sd', minmax='global', num_classes=7, img_size=224,
    stage_channels=(64, 128, 256), stage_units=(3, 4, 14), embed_dim=768,
    num_heads=8, mlp_ratio=4.0, base_depth=2, cross_depth=1, base_drop=0.0,
    cross_drop=0.0, base_proj_drop=0.0, cross_proj_drop=0.0, dtype='float32')

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


class ConversionError(ValueError):
  """A file or state dict that cannot be converted; nothing was written."""


# ----------------------------------------------------------------------------
# Reading torch.save files without torch and without running their code.

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


# ----------------------------------------------------------------------------
# The target tree: expected Flax shapes.


def _cfg_dict(model_cfg: Any) -> dict[str, Any]:
  if hasattr(model_cfg, 'to_dict'):
    model_cfg = model_cfg.to_dict()
  cfg = dict(DEFAULT_MODEL_CFG)
  cfg.update(dict(model_cfg))
  for k in ('stage_channels', 'stage_units'):
    cfg[k] = tuple(int(x) for x in cfg[k])
  if cfg['name'] not in NUM_BRANCHES:
    raise ConversionError(f'unknown model name {cfg["name"]!r}')
  return cfg


def _own_expected_shapes(cfg: dict[str, Any]) -> dict[Path, tuple[int, ...]]:
  """The Flax tree of the team brief, computed from the config alone."""
  out: dict[Path, tuple[int, ...]] = {}
  c0, c1, c2 = cfg['stage_channels']
  d, k = cfg['embed_dim'], cfg['num_classes']
  t = 3 * (cfg['img_size'] // 32) ** 2
  hidden = int(d * cfg['mlp_ratio'])

  def bn(path, c):
    out[('params',) + path + ('scale',)] = (c,)
    out[('params',) + path + ('bias',)] = (c,)
    out[('batch_stats',) + path + ('mean',)] = (c,)
    out[('batch_stats',) + path + ('var',)] = (c,)

  def conv(path, kh, cin, cout, bias):
    out[('params',) + path + ('kernel',)] = (kh, kh, cin, cout)
    if bias:
      out[('params',) + path + ('bias',)] = (cout,)

  def dense(path, cin, cout):
    out[('params',) + path + ('kernel',)] = (cin, cout)
    out[('params',) + path + ('bias',)] = (cout,)

  def ln(path, c):
    out[('params',) + path + ('scale',)] = (c,)
    out[('params',) + path + ('bias',)] = (c,)

  ib = ('ir_back',)
  conv(ib + ('input_conv',), 3, 3, c0, False)
  bn(ib + ('input_bn',), c0)
  out[('params',) + ib + ('input_prelu', 'alpha')] = (c0,)
  ins = (c0, c0, c1)
  for s, (cin, depth, units) in enumerate(
      zip(ins, cfg['stage_channels'], cfg['stage_units'])):
    for i in range(units):
      u = ib + (f'body{s + 1}_{i}',)
      ci = cin if i == 0 else depth
      bn(u + ('res_bn1',), ci)
      conv(u + ('res_conv1',), 3, ci, depth, False)
      out[('params',) + u + ('res_prelu', 'alpha')] = (depth,)
      conv(u + ('res_conv2',), 3, depth, depth, False)
      bn(u + ('res_bn2',), depth)
      if ci != depth:
        conv(u + ('shortcut_conv',), 1, ci, depth, False)
        bn(u + ('shortcut_bn',), depth)
  for name, c in (('conv1', c0), ('conv2', c1), ('conv3', c2)):
    conv((name,), 3, c, c, True)
  conv(('embed_q_0',), 3, c0, d, True)
  conv(('embed_q_1',), 3, d, d, True)
  conv(('embed_k',), 3, c1, d, True)
  conv(('embed_v',), 1, c2, d, True)
  vits = [('VIT_base', cfg['base_depth'])]
  if cfg['name'] != 'baseline':
    vits.append(('VIT_cross', cfg['cross_depth']))
  for vit, depth in vits:
    out[('params', vit, 'cls_token')] = (1, 1, d)
    out[('params', vit, 'pos_embed')] = (1, 1 + t, d)
    for i in range(depth):
      b = (vit, f'blocks_{i}')
      ln(b + ('norm1',), d)
      dense(b + ('attn', 'qkv'), d, 3 * d)
      dense(b + ('attn', 'proj'), d, d)
      ln(b + ('norm2',), d)
      dense(b + ('mlp', 'fc1'), d, hidden)
      dense(b + ('mlp', 'fc2'), hidden, d)
    ln((vit, 'norm'), d)
    dense((vit, 'se_block', 'linear1'), d, d)
    dense((vit, 'se_block', 'linear2'), d, d)
    dense((vit, 'head'), d, k)
  if cfg['name'] != 'baseline':
    for level in (1, 2, 3):
      c = (f'cross_attention_{level}',)
      ln(c + ('norm1',), d)
      ln(c + ('norm2',), d)
      dense(c + ('proj',), d, 2 * d)
      dense(c + ('mlp', 'fc1'), d, 4 * d)
      dense(c + ('mlp', 'fc2'), 4 * d, d)
      if cfg['name'] == 'qcs':
        out[('params',) + c + ('theta',)] = ()
  return out


def flatten_tree(tree: Mapping, prefix: Path = ()) -> dict[Path, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten_tree(v, prefix + (str(k),)))
    else:
      out[prefix + (str(k),)] = v
  return out


def unflatten_tree(flat: Mapping[Path, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, v in sorted(flat.items()):
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return out


def model_expected_shapes(model_cfg: Any) -> dict[Path, tuple[int, ...]] | None:
  """Shapes of `build_model(cfg).init` via jax.eval_shape; None without models."""
  try:
    from qcs_jax import models  # pylint: disable=import-outside-toplevel
    build = models.build_model
  except (ImportError, AttributeError):
    return None
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  cfg = _cfg_dict(model_cfg)
  model = build(cfg)
  size = cfg['img_size']
  x = jax.ShapeDtypeStruct((1, NUM_BRANCHES[cfg['name']], size, size, 3),
                           jnp.float32)
  key = jax.random.key(0)
  shapes = jax.eval_shape(
      lambda imgs: model.init({'params': key, 'dropout': key}, imgs,
                              train=False), x)
  return {p: tuple(v.shape) for p, v in flatten_tree(shapes).items()
          if p[0] in ('params', 'batch_stats')}


def expected_shapes(model_cfg: Any) -> dict[Path, tuple[int, ...]]:
  """The target tree: from the model package, else from the brief's layout."""
  cfg = _cfg_dict(model_cfg)
  return dict(_expected_shapes_cached(tuple(sorted(cfg.items()))))


@functools.lru_cache(maxsize=16)
def _expected_shapes_cached(cfg_items: tuple) -> dict[Path, tuple[int, ...]]:
  cfg = dict(cfg_items)
  shapes = model_expected_shapes(cfg)
  return shapes if shapes is not None else _own_expected_shapes(cfg)


# ----------------------------------------------------------------------------
# Key mapping.

_MODULE_TO_TORCH = {
    'input_conv': 'input_layer.0', 'input_bn': 'input_layer.1',
    'input_prelu': 'input_layer.2', 'res_bn1': 'res_layer.0',
    'res_conv1': 'res_layer.1', 'res_prelu': 'res_layer.2',
    'res_conv2': 'res_layer.3', 'res_bn2': 'res_layer.4',
    'shortcut_conv': 'shortcut_layer.0', 'shortcut_bn': 'shortcut_layer.1',
    'embed_q_0': 'embed_q.0', 'embed_q_1': 'embed_q.1', 'embed_k': 'embed_k.0',
    'embed_v': 'embed_v.proj', 'head': 'head.linear',
}
_LEAF_TO_TORCH = {'kernel': 'weight', 'scale': 'weight', 'alpha': 'weight',
                  'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}
_NUMBERED = re.compile(r'^(body[123]|blocks)_(\d+)$')


def torch_key(path: Path) -> str:
  """Flax ('params'|'batch_stats', *modules, leaf) -> PyTorch state-dict key."""
  parts = []
  for name in path[1:-1]:
    m = _NUMBERED.match(name)
    parts.append(f'{m.group(1)}.{m.group(2)}' if m else
                 _MODULE_TO_TORCH.get(name, name))
  leaf = path[-1]
  parts.append(_LEAF_TO_TORCH.get(leaf, leaf))
  return '.'.join(parts)


def _transform(path: Path, expected: tuple[int, ...]) -> tuple[str, Any]:
  """(kind, torch-shape function) for a leaf: conv/dense transposes etc."""
  leaf = path[-1]
  if leaf == 'kernel' and len(expected) == 4:
    kh, kw, i, o = expected
    return 'conv', (o, i, kh, kw)
  if leaf == 'kernel' and len(expected) == 2:
    return 'dense', expected[::-1]
  if leaf == 'theta' and expected == ():
    return 'scalar', (1,)
  return 'copy', expected


def _apply(kind: str, a: np.ndarray) -> np.ndarray:
  if kind == 'conv':
    return a.transpose(2, 3, 1, 0)
  if kind == 'dense':
    return a.T
  if kind == 'scalar':
    return a.reshape(())
  return a


# Keys the reference holds but never uses (ARCHITECTURE.md sections 1 and 3).
KNOWN_UNUSED = (
    (r'(^|\.)num_batches_tracked$', 'BatchNorm num_batches_tracked'),
    (r'^ir_back\.output_layer\.', 'IR50 output_layer (never used)'),
    (r'^VIT_(base|cross)\.blocks\.\d+\.conv\.', 'ViT per-block conv (unused)'),
    (r'^VIT_(base|cross)\.CON1\.', 'ViT CON1 (unused)'),
    (r'^VIT_(base|cross)\.IRLinear[12]\.', 'ViT IRLinear1/2 (unused)'),
    (r'^VIT_(base|cross)\.eca_block\.', 'ViT eca_block (unused)'),
    (r'^VIT_(base|cross)\.patch_embed\.', 'ViT patch_embed (unused)'),
)
_STAGE4 = 'IR50 units past the third stage (body.N, 4th stage: never used)'
_NOT_BACKBONE = 'not part of the backbone (convert them with --full)'
_NOT_IN_BASELINE = 'VIT_cross / cross modules (not in a baseline model)'


@dataclasses.dataclass
class ConversionReport:
  """What a conversion took, skipped and did not recognise."""
  layout: str
  loaded: list[str] = dataclasses.field(default_factory=list)
  ignored: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  unknown: list[str] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)
  num_params: int = 0
  how_loaded: str = ''

  def summary(self) -> str:
    n_ign = sum(len(v) for v in self.ignored.values())
    lines = [f'layout: {self.layout}']
    if self.how_loaded:
      lines.append(f'read with: {self.how_loaded}')
    lines += [f'note: {n}' for n in self.notes]
    lines.append(f'keys loaded: {len(self.loaded)} '
                 f'({self.num_params:,} parameter/statistic values)')
    lines.append(f'keys ignored as known-unused: {n_ign}')
    for reason, keys in self.ignored.items():
      lines.append(f'  {len(keys):4d}  {reason}: {_abbrev(keys)}')
    lines.append(f'unknown keys (neither loaded nor known): {len(self.unknown)}')
    if self.unknown:
      lines.append(f'  {_abbrev(self.unknown, 10)}')
    return '\n'.join(lines)


def _abbrev(keys: list[str], n: int = 3) -> str:
  shown = ', '.join(keys[:n])
  return shown + (f', ... (+{len(keys) - n})' if len(keys) > n else '')


def _strip_module(sd: Mapping[str, np.ndarray], report: ConversionReport
                  ) -> dict[str, tuple[str, np.ndarray]]:
  """normalised key -> (original key, array); strips DataParallel `module.`."""
  out = {}
  stripped = 0
  for k, v in sd.items():
    nk = k
    while nk.startswith('module.'):
      nk = nk[len('module.'):]
    stripped += nk != k
    if nk in out:
      raise ConversionError(f'duplicate key {nk!r} after stripping "module."')
    out[nk] = (k, np.asarray(v))
  if stripped:
    report.notes.append(f"stripped the DataParallel 'module.' prefix from "
                        f'{stripped} keys')
  return out


def _alias_embeds(sd: dict[str, tuple[str, np.ndarray]],
                  report: ConversionReport) -> dict[str, tuple[str, np.ndarray]]:
  """embed_1/2/3.* (some releases) -> embed_q/k/v.*."""
  alias = {'embed_1.': 'embed_q.', 'embed_2.': 'embed_k.', 'embed_3.': 'embed_v.'}
  out, renamed = {}, 0
  for k, v in sd.items():
    for old, new in alias.items():
      if k.startswith(old):
        k = new + k[len(old):]
        renamed += 1
        if k in sd:
          raise ConversionError(
              f'both {v[0]!r} and {k!r} present: ambiguous embed naming')
    out[k] = v
  if renamed:
    report.notes.append('embed_1/2/3 read as embed_q/k/v')
  return out


def _ir50_to_split(sd: dict[str, tuple[str, np.ndarray]],
                   stage_units: tuple[int, ...], report: ConversionReport
                   ) -> tuple[dict[str, tuple[str, np.ndarray]], list[str]]:
  """IR50 keys (either layout) -> 'ir_back.'-prefixed split-layout keys."""
  consecutive = any(re.match(r'^body\.\d+\.', k) for k in sd)
  split = any(re.match(r'^body[123]\.\d+\.', k) for k in sd)
  if consecutive and split:
    raise ConversionError('both body.N.* and body1/2/3.* keys: mixed IR50 layouts')
  if not (consecutive or split or any(k.startswith('input_layer.') for k in sd)):
    raise ConversionError(
        'no IR50 backbone keys (input_layer.*, body.N.* or body1/2/3.*, '
        f'optionally under ir_back.) among {_abbrev(list(sd), 5)}')
  report.layout = ('ir50, consecutive units body.0..N' if consecutive else
                   'ir50, split stages body1/2/3')
  offsets = [sum(stage_units[:s]) for s in range(4)]
  out, stage4 = {}, []
  for k, v in sd.items():
    m = re.match(r'^body\.(\d+)\.(.*)$', k)
    if m:
      n = int(m.group(1))
      if n >= offsets[3]:
        stage4.append(v[0])
        continue
      s = max(i for i in range(3) if offsets[i] <= n)
      k = f'body{s + 1}.{n - offsets[s]}.{m.group(2)}'
    out['ir_back.' + k] = v
  if consecutive:
    report.notes.append(
        f'body.N units mapped: 0-{offsets[1] - 1} -> body1, '
        f'{offsets[1]}-{offsets[2] - 1} -> body2, {offsets[2]}-{offsets[3] - 1}'
        ' -> body3')
  return out, stage4


def _prefixer(sd: Mapping[str, Any]) -> Callable[[str], str]:
  """Normalised key -> file key: re-adds 'module.' if the file uses it."""
  if any(k.startswith('module.') for k in sd):
    return lambda k: 'module.' + k
  return lambda k: k


def _ir50_name(key: str, consecutive: bool, units: tuple[int, ...]) -> str:
  """'ir_back.body2.1.x' -> the IR50 file's name ('body.4.x' or 'body2.1.x')."""
  key = key[len('ir_back.'):] if key.startswith('ir_back.') else key
  m = re.match(r'^body([123])\.(\d+)\.(.*)$', key)
  if consecutive and m:
    s = int(m.group(1)) - 1
    return f'body.{sum(units[:s]) + int(m.group(2))}.{m.group(3)}'
  return key


def _convert(sd: dict[str, tuple[str, np.ndarray]],
             expected: dict[Path, tuple[int, ...]], report: ConversionReport,
             dtype: Any, extra_ignored: Iterable[tuple[str, str]] = (),
             file_name: Callable[[str], str] = lambda k: k
             ) -> dict[str, Any]:
  """Maps normalised keys onto `expected`, checking presence and shapes.

  `file_name` turns a normalised key into the name the file would use, for
  error messages about missing keys.
  """
  flat, used, missing, bad = {}, set(), [], []
  for path, shape in expected.items():
    key = torch_key(path)
    kind, torch_shape = _transform(path, shape)
    if key not in sd:
      missing.append(f'{file_name(key)!r} (torch shape {torch_shape}, for Flax '
                     f'{"/".join(path)})')
      continue
    orig, a = sd[key]
    if tuple(a.shape) != tuple(torch_shape):
      bad.append(f'{orig!r}: shape {tuple(a.shape)} in the checkpoint, the '
                 f'model config needs {tuple(torch_shape)} (Flax '
                 f'{"/".join(path)} {shape})')
      continue
    flat[path] = np.array(_apply(kind, a), dtype=dtype, order="C")
    used.add(key)
  if bad:
    raise ConversionError(
        f'shape mismatch for {len(bad)} key(s): ' + '; '.join(bad[:5]) +
        (' ...' if len(bad) > 5 else ''))
  if missing:
    raise ConversionError(
        f'missing {len(missing)} required key(s): ' + '; '.join(missing[:5]) +
        (' ...' if len(missing) > 5 else ''))
  patterns = list(extra_ignored) + list(KNOWN_UNUSED)
  for key, (orig, _) in sd.items():
    if key in used:
      report.loaded.append(orig)
      continue
    for pat, reason in patterns:
      if re.search(pat, key):
        report.ignored.setdefault(reason, []).append(orig)
        break
    else:
      report.unknown.append(orig)
  report.num_params = int(sum(v.size for v in flat.values()))
  return unflatten_tree(flat)


def _check_num_classes(sd: dict[str, tuple[str, np.ndarray]], k: int) -> None:
  for vit in ('VIT_base', 'VIT_cross'):
    key = f'{vit}.head.linear.weight'
    if key in sd and sd[key][1].ndim == 2 and sd[key][1].shape[0] != k:
      raise ConversionError(
          f'class count mismatch: {sd[key][0]!r} has shape '
          f'{tuple(sd[key][1].shape)} = {sd[key][1].shape[0]} classes, the '
          f'model config says num_classes={k}')


def convert_backbone(sd: Mapping[str, np.ndarray], model_cfg: Any,
                     dtype: Any = np.float32
                     ) -> tuple[dict[str, Any], ConversionReport]:
  """IR50 (either layout) or a full QCS/DCS state dict -> ir_back variables.

  Returns ({'params': {'ir_back': ...}, 'batch_stats': {'ir_back': ...}},
  report).
  """
  cfg = _cfg_dict(model_cfg)
  report = ConversionReport(layout='')
  nsd = _strip_module(sd, report)
  extra = []
  file_name = _prefixer(sd)
  if any(k.startswith('ir_back.') for k in nsd):
    report.layout = 'full model state dict (ir_back part)'
    full = nsd
    extra.append((r'^(?!ir_back\.)', _NOT_BACKBONE))
  else:
    full, stage4 = _ir50_to_split(nsd, cfg['stage_units'], report)
    report.ignored.update({_STAGE4: stage4} if stage4 else {})
    file_name = functools.partial(_ir50_name, consecutive=bool(
        report.layout.startswith('ir50, consecutive')),
                                  units=cfg['stage_units'])
  expected = {p: s for p, s in expected_shapes(cfg).items()
              if p[1] == 'ir_back'}
  variables = _convert(full, expected, report, dtype, extra, file_name)
  return variables, report


def convert_model(sd: Mapping[str, np.ndarray], model_cfg: Any,
                  dtype: Any = np.float32
                  ) -> tuple[dict[str, Any], ConversionReport]:
  """A full QCS / DCS / baseline state dict -> {'params', 'batch_stats'}."""
  cfg = _cfg_dict(model_cfg)
  report = ConversionReport(layout=f'full {cfg["name"]} model state dict')
  nsd = _alias_embeds(_strip_module(sd, report), report)
  if not any(k.startswith('VIT_base.') for k in nsd):
    raise ConversionError(
        'not a full QCS/DCS model state dict (no VIT_base.* keys); an IR50 '
        'backbone file converts with convert_backbone (no --full)')
  has_theta = any(re.match(r'^cross_attention_\d\.theta$', k) for k in nsd)
  has_cross = any(k.startswith('cross_attention_') for k in nsd)
  if has_theta and cfg['name'] == 'dcs':
    raise ConversionError(
        'the checkpoint has cross_attention_*.theta (a QCS model) but the '
        "config says model 'dcs'")
  if has_cross and not has_theta and cfg['name'] == 'qcs':
    raise ConversionError(
        'the checkpoint has no cross_attention_*.theta (a DCS model) but the '
        "config says model 'qcs'")
  _check_num_classes(nsd, cfg['num_classes'])
  extra = []
  if cfg['name'] == 'baseline':
    extra.append((r'^(VIT_cross|cross_attention_\d)\.', _NOT_IN_BASELINE))
  variables = _convert(nsd, expected_shapes(cfg), report, dtype, extra,
                       _prefixer(sd))
  return variables, report


def infer_model_config(sd: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Guesses config.model fields from a full model state dict's shapes.

  num_heads, csa, minmax and dropout rates are not in the weights: they keep
  the paper's values (8 heads, every released model uses them).
  """
  report = ConversionReport(layout='')
  nsd = {k: v for k, (_, v) in
         _alias_embeds(_strip_module(sd, report), report).items()}
  cfg = dict(DEFAULT_MODEL_CFG)
  if 'VIT_base.head.linear.weight' not in nsd:
    raise ConversionError(
        'not a full QCS/DCS model state dict (no VIT_base.head.linear.weight);'
        ' an IR50 backbone file converts without --full')
  k, d = nsd['VIT_base.head.linear.weight'].shape
  cfg.update(num_classes=int(k), embed_dim=int(d))
  t = nsd['VIT_base.pos_embed'].shape[1] - 1
  cfg['img_size'] = int(round(32 * math.sqrt(t / 3)))
  cfg['mlp_ratio'] = nsd['VIT_base.blocks.0.mlp.fc1.weight'].shape[0] / d
  depth = lambda vit: len({m.group(1) for m in (
      re.match(rf'^{vit}\.blocks\.(\d+)\.', x) for x in nsd) if m})
  cfg['base_depth'] = depth('VIT_base')
  if any(re.match(r'^cross_attention_\d\.theta$', x) for x in nsd):
    cfg['name'] = 'qcs'
  elif any(x.startswith('cross_attention_') for x in nsd):
    cfg['name'], cfg['csa'] = 'dcs', 's'
  else:
    cfg['name'] = 'baseline'
  if cfg['name'] != 'baseline':
    cfg['cross_depth'] = depth('VIT_cross')
  units, chans = [], []
  for s in (1, 2, 3):
    idx = {int(m.group(1)) for m in (
        re.match(rf'^ir_back\.body{s}\.(\d+)\.', x) for x in nsd) if m}
    units.append(len(idx))
    w = nsd.get(f'ir_back.body{s}.0.res_layer.1.weight')
    chans.append(int(w.shape[0]) if w is not None else 0)
  cfg['stage_units'], cfg['stage_channels'] = tuple(units), tuple(chans)
  return cfg


# ----------------------------------------------------------------------------
# Self-check against a PyTorch reference network.


def _rel_err(ours: Any, ref: np.ndarray) -> float:
  ours = np.asarray(ours, np.float64)
  ref = np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def verify_against_torch(sd: Mapping[str, np.ndarray], variables: Mapping,
                         model_cfg: Any, reference: Any, full: bool,
                         batch: int = 2, seed: int = 0) -> dict[str, float]:
  """Max relative errors of Flax vs the PyTorch reference on a random batch.

  `reference` is the module of a PyTorch implementation with the authors'
  names (tests/torch_reference.py: `Backbone`, `QCSReference`); it gets the
  original state dict `sd`, the Flax model gets the converted `variables`.
  Backbone: stage outputs x1..x3; full: also tokens, logits, and the
  training-time graph's base/cross logits (eval mode). float64 variables run
  both sides in float64.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from qcs_jax import models  # pylint: disable=import-outside-toplevel
  cfg = _cfg_dict(model_cfg)
  report = ConversionReport(layout='')
  nsd = _alias_embeds(_strip_module(sd, report), report)
  if not any(k.startswith('ir_back.') for k in nsd):
    nsd, _ = _ir50_to_split(nsd, cfg['stage_units'], report)
  f64 = flatten_tree(variables)[('params', 'ir_back', 'input_conv',
                                 'kernel')].dtype == np.float64
  tdtype = torch.float64 if f64 else torch.float32
  if full:
    net, prefix = reference.QCSReference(cfg), ''
  else:
    net = reference.Backbone(cfg['stage_channels'], cfg['stage_units'],
                             cfg['img_size'])
    prefix = 'ir_back.'
  own = net.state_dict()
  load, absent = {}, []
  for k, t in own.items():
    src = nsd.get(prefix + k)
    if src is not None and tuple(src[1].shape) == tuple(t.shape):
      load[k] = torch.from_numpy(np.array(src[1]))
    elif not any(re.search(p, prefix + k) for p, _ in KNOWN_UNUSED):
      absent.append(prefix + k)
  if absent:
    raise ConversionError(f'reference network lacks weights for {absent[:5]}')
  net.load_state_dict(load, strict=False)
  net = net.to(tdtype).eval()
  rng = np.random.default_rng(seed)
  nb = NUM_BRANCHES[cfg['name']] if full else 1
  size = cfg['img_size']
  images = rng.normal(size=(batch, nb, size, size, 3)).astype(
      np.float64 if f64 else np.float32)
  nchw = lambda x: torch.from_numpy(np.ascontiguousarray(
      np.moveaxis(x, -1, 1))).to(tdtype)
  with torch.no_grad():
    if full:
      ref = net.features(nchw(images[:, 0]))
      train = net.forward_train(*[nchw(images[:, i]) for i in range(nb)])
      for k in ('base', 'cross'):
        if k in train:
          ref[f'train_{k}'] = torch.stack(train[k], 1)
    else:
      ref = dict(zip(('x1', 'x2', 'x3'), net(nchw(images[:, 0]))))
  ref = {k: v.numpy() for k, v in ref.items()}
  for k in ('x1', 'x2', 'x3'):
    ref[k] = np.moveaxis(ref[k], 1, -1)
  model = models.build_model(cfg)
  with jax.enable_x64(f64):
    if not full:  # the rest of the model is irrelevant to x1..x3: zeros
      flat = {p: np.zeros(s, images.dtype) for p, s in
              expected_shapes(cfg).items()}
      flat.update(flatten_tree(variables))
      variables = unflatten_tree(flat)
    feats = jax.jit(lambda v, x: model.apply(v, x, method='features'))(
        variables, images[:, 0])
    ours = {k: feats[k] for k in ref if k in feats}
    if full:
      out = jax.jit(lambda v, x: model.apply(v, x, train=False))(
          variables, images)
      ours.update({f'train_{k}': v for k, v in out.items()})
    return {k: _rel_err(ours[k], ref[k]) for k in ref}
