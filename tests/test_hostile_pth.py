"""Hostile .pth files: foreign callables, zip bombs, absurd sizes; nothing runs or allocates.

The pickles are written opcode by opcode (GLOBAL, STACK_GLOBAL, INST, REDUCE)
into both torch file formats; a control file of the same construction loads.
"""
from __future__ import annotations

import io
import pickle
import struct
import sys
import time
import tracemalloc
import zipfile

import numpy as np
import pytest

from qcs_jax.interop import pickle_safety as ps
from qcs_jax.interop import torch_pickle as tp

try:  # to write real torch.save files; the loaders below may hide it again
  import torch
except ImportError:
  torch = None

LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


# ---------------------------------------------------------------- a tiny pickle assembler
def s(text: str) -> bytes:
  data = text.encode()
  return b'X' + struct.pack('<I', len(data)) + data


def i(n: int) -> bytes:
  if -2**31 <= n < 2**31:
    return b'J' + struct.pack('<i', n)
  raw = n.to_bytes((n.bit_length() + 8) // 8, 'little', signed=True)
  return b'\x8a' + bytes([len(raw)]) + raw


def g(module: str, name: str) -> bytes:
  return b'c' + module.encode() + b'\n' + name.encode() + b'\n'


def stack_global(module: str, name: str) -> bytes:
  return s(module) + s(name) + b'\x93'


def tup(*items: bytes) -> bytes:
  return b'(' + b''.join(items) + b't'


def call(func: bytes, *args: bytes) -> bytes:
  return func + tup(*args) + b'R'


def tensor(key: str, numel: int, shape: tuple, stride: tuple) -> bytes:
  storage = tup(s('storage'), g('torch', 'FloatStorage'), s(key), s('cpu'), i(numel))
  return call(g('torch._utils', '_rebuild_tensor_v2'), storage + b'Q', i(0),
              tup(*map(i, shape)), tup(*map(i, stride)), b'\x89',
              call(g('collections', 'OrderedDict')))


def state_dict(**entries: bytes) -> bytes:
  body = b''.join(s(k) + v for k, v in entries.items())
  return b'\x80\x02}(' + body + b'u.'


# ---------------------------------------------------------------- the two file formats
def write_zip(path, pkl: bytes, storages: dict[str, bytes]) -> None:
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('archive/data.pkl', pkl)
    zf.writestr('archive/byteorder', 'little')
    for key, raw in storages.items():
      zf.writestr(f'archive/data/{key}', raw)
    zf.writestr('archive/version', '3\n')


def write_legacy(path, pkl: bytes, storages: dict[str, bytes], numels=None) -> None:
  out = io.BytesIO()
  for meta in (LEGACY_MAGIC, 1001, {'protocol_version': 1001, 'little_endian': True,
                                    'type_sizes': {'short': 2, 'int': 4, 'long': 4}}):
    pickle.dump(meta, out, protocol=2)
  out.write(pkl)
  pickle.dump(list(storages), out, protocol=2)
  for key, raw in storages.items():
    numel = (numels or {}).get(key, len(raw) // 4)
    out.write(struct.pack('<q', numel) + raw)
  path.write_bytes(out.getvalue())


WRITERS = {'zip': write_zip, 'legacy': write_legacy}
W3 = np.arange(3, dtype=np.float32)
# Peak traced memory of a refused bomb: 62 KB measured (docs/RELIABILITY.md); 4x margin.
PEAK_LIMIT = 256 << 10


def traced_peak(fn):
  """fn()'s peak traced Python memory (torch, imported above, is not counted)."""
  tracemalloc.start()
  try:
    fn()
    return tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


def no_torch(monkeypatch):
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` raises ImportError


@pytest.fixture(params=['torch', 'restricted', 'no_torch'])
def loader(request, monkeypatch):
  """load_torch_file with torch preferred, with the restricted reader, and with torch hidden."""
  if request.param == 'no_torch':
    no_torch(monkeypatch)
  return lambda p: tp.load_torch_file(p, prefer_torch=request.param != 'restricted')


@pytest.mark.parametrize('fmt', WRITERS)
def test_control_file_loads(tmp_path, fmt, loader):
  path = tmp_path / f'ok.{fmt}.pth'
  WRITERS[fmt](path, state_dict(w=tensor('0', 3, (3,), (1,)), e=tensor('1', 0, (0, 5), (5, 1)),
                                b=tensor('0', 3, (2, 3), (0, 1))),
               {'0': W3.tobytes(), '1': b''})
  sd, how = loader(path)
  np.testing.assert_array_equal(sd['w'], W3)
  assert sd['e'].shape == (0, 5)                  # an empty tensor
  np.testing.assert_array_equal(sd['b'], [W3, W3])  # a small stride-0 broadcast
  assert 'state dict' in how


def payloads(marker: str) -> dict[str, tuple[bytes, str]]:
  """pickled object -> the global its refusal must name; each would create `marker`."""
  return {
      'os.system': (call(g('os', 'system'), s(f'touch {marker}')), 'os.system'),
      'posix.system': (call(g('posix', 'system'), s(f'touch {marker}')),
                       r'posix\.system \(os\.system\)'),
      'subprocess': (call(stack_global('subprocess', 'Popen'),
                          b']' + b'(' + s('touch') + s(marker) + b'e'), 'subprocess.Popen'),
      'eval': (call(g('builtins', 'eval'), s(f"open({marker!r}, 'w')")), 'builtins.eval'),
      'exec': (call(stack_global('builtins', 'exec'), s(f"open({marker!r}, 'w')")),
               'builtins.exec'),
      'getattr': (call(g('builtins', 'getattr'), g('os', 'path'), s('join')),
                  'builtins.getattr'),
      'inst': (b'(' + s(f'touch {marker}') + b'ios\nsystem\n', 'os.system'),
      'importlib': (call(g('importlib', 'import_module'), s('os')), 'importlib.import_module'),
  }


@pytest.mark.parametrize('fmt', WRITERS)
@pytest.mark.parametrize('name', list(payloads('m')))
def test_foreign_callables_are_refused_by_name(tmp_path, fmt, name, loader):
  marker = tmp_path / 'payload_ran'
  payload, named = payloads(str(marker))[name]
  path = tmp_path / f'evil.{fmt}.pth'
  pkl = state_dict(w=tensor('0', 3, (3,), (1,)), x=payload)
  WRITERS[fmt](path, pkl, {'0': W3.tobytes()})
  with pytest.raises(ps.UnsafePickleError, match=named) as e:
    loader(path)
  assert str(path) in str(e.value) and 'nothing was run' in str(e.value)
  assert '\n' not in str(e.value)
  assert not marker.exists()


@pytest.mark.parametrize('fmt', WRITERS)
def test_training_script_classes_stay_inert(tmp_path, fmt, loader):
  recorder = (g('__main__', 'RecorderMeter_loss') + b')\x81'  # NEWOBJ
              + b'}' + s('epoch_losses') + call(g('builtins', 'list'), b']') + b's' + b'b')
  pkl = state_dict(state_dict=b'}' + s('w') + tensor('0', 3, (3,), (1,)) + b's',
                   recorder=recorder, epoch=i(7))
  path = tmp_path / f'ckpt.{fmt}.pth'
  WRITERS[fmt](path, pkl, {'0': W3.tobytes()})
  sd, how = loader(path)
  np.testing.assert_array_equal(sd['w'], W3)
  assert '__main__.RecorderMeter_loss' in how and 'epoch 7' in how
  obj, placeholders = tp.read_torch_file_restricted(str(path))
  assert isinstance(obj['recorder'], ps.Inert)
  assert obj['recorder'].state == {'epoch_losses': []}
  assert placeholders == {'__main__.RecorderMeter_loss'}


BOMBS = {  # a pickled value -> what the refusal says
    'bytearray(10**12)': (call(g('builtins', 'bytearray'), i(10**12)), 'bytearray'),
    'bytes(10**12)': (call(g('builtins', 'bytes'), i(10**12)), 'bytes'),
    'list(range(10**12))': (call(g('builtins', 'list'), call(g('builtins', 'range'),
                                                             i(10**12))), 'list'),
    'numpy empty 10**12': (call(g('numpy.core.multiarray', '_reconstruct'),
                                g('numpy', 'ndarray'), tup(i(10**6), i(10**6)),
                                b'C\x01b'), '_reconstruct'),
    'numpy.ndarray((10**6, 10**6))': (call(g('numpy', 'ndarray'), tup(i(10**6), i(10**6))),
                                      'not callable'),
    'broadcast tensor': (tensor('0', 3, (10**6, 10**6), (0, 0)), 'larger than its storage'),
    'past storage': (tensor('0', 3, (10**6,), (1,)), 'reads past its storage'),
    'storage numel lie': (tensor('0', 10**12, (3,), (1,)), 'declares 1000000000000'),
}


@pytest.mark.parametrize('fmt', WRITERS)
@pytest.mark.parametrize('name', list(BOMBS))
def test_memory_bombs_refused_before_allocating(tmp_path, fmt, name, loader):
  payload, said = BOMBS[name]
  path = tmp_path / f'bomb.{fmt}.pth'
  WRITERS[fmt](path, state_dict(w=tensor('0', 3, (3,), (1,)), x=payload), {'0': W3.tobytes()})

  def refused():
    with pytest.raises(tp.ConversionError, match=said):
      loader(path)

  assert traced_peak(refused) < PEAK_LIMIT


def test_legacy_storage_header_larger_than_file(tmp_path, loader):
  path = tmp_path / 'huge_header.pth'
  write_legacy(path, state_dict(w=tensor('0', 3, (3,), (1,))), {'0': W3.tobytes()},
               numels={'0': 2**40})
  with pytest.raises(ps.UnsafePickleError, match='declares 1099511627776 elements'):
    loader(path)


def test_memo_index_bomb_is_harmless(tmp_path, loader):
  path = tmp_path / 'memo.pth'  # LONG_BINPUT 2**31-1: the C unpickler would size a 16 GiB list
  write_legacy(path, b'\x80\x02N' + b'r\xff\xff\xff\x7f' + b'.', {})

  def refused():
    with pytest.raises(tp.ConversionError, match='not a checkpoint'):
      loader(path)

  assert traced_peak(refused) < PEAK_LIMIT


def test_zip_bombs_refused(tmp_path, loader):
  ratio = tmp_path / 'ratio.pth'  # 64 MiB of zeros deflated to ~64 KiB
  with zipfile.ZipFile(ratio, 'w', zipfile.ZIP_DEFLATED) as zf:
    zf.writestr('archive/data.pkl', state_dict(w=tensor('0', 3, (3,), (1,))))
    zf.writestr('archive/data/0', bytes(64 << 20))
  with pytest.raises(ps.UnsafePickleError, match=r'archive/data/0 expands .* zip bomb'):
    loader(ratio)

  declared = tmp_path / 'declared.pth'  # a central directory that claims ~4 GiB
  write_zip(declared, state_dict(w=tensor('0', 3, (3,), (1,))), {'0': W3.tobytes()})
  raw = bytearray(declared.read_bytes())
  at = raw.index(b'PK\x01\x02')
  while at >= 0:
    name_len = struct.unpack('<H', raw[at + 28:at + 30])[0]
    if raw[at + 46:at + 46 + name_len] == b'archive/data/0':
      raw[at + 24:at + 28] = struct.pack('<I', 0xFFFFFFF0)
    at = raw.find(b'PK\x01\x02', at + 4)
  declared.write_bytes(bytes(raw))
  with pytest.raises(tp.ConversionError, match='zip bomb'):
    loader(declared)


def test_limits_are_checked_against_totals(tmp_path, monkeypatch):
  path = tmp_path / 'big.pth'
  write_zip(path, state_dict(w=tensor('0', 3, (3,), (1,))), {'0': W3.tobytes()})
  monkeypatch.setattr(ps, 'LIMITS', ps.Limits(max_total_bytes=100))
  with pytest.raises(ps.UnsafePickleError, match='over the 100-byte limit'):
    tp.check_torch_file(path)
  monkeypatch.setattr(ps, 'LIMITS', ps.Limits(max_pickle_bytes=10))
  with pytest.raises(ps.UnsafePickleError, match='data.pkl'):
    tp.check_torch_file(path)


@pytest.mark.parametrize('prefer_torch', [False, True])
def test_mutated_pickles_load_or_raise_conversion_error(tmp_path, prefer_torch):
  """Random byte edits of a full checkpoint's pickle: a result or a ConversionError, nothing else."""
  recorder = (g('__main__', 'RecorderMeter_loss') + b')\x81' + b'}' + s('losses')
              + call(g('builtins', 'list'), b']') + b's' + b'b')
  pkl = state_dict(state_dict=b'}' + s('w') + tensor('0', 3, (3,), (1,)) + b's',
                   recorder=recorder, epoch=i(7))
  rng = np.random.default_rng(0)
  loaded = refused = 0
  n = 300 if not prefer_torch else 100
  for k in range(n):
    b = bytearray(pkl)
    for _ in range(int(rng.integers(1, 4))):
      pos, op = int(rng.integers(len(b))), int(rng.integers(3))
      if op == 0:
        b[pos] = int(rng.integers(256))
      elif op == 1:
        del b[pos]
      else:
        b.insert(pos, int(rng.integers(256)))
    path = tmp_path / f'm{k}.pth'
    WRITERS['zip' if k % 2 else 'legacy'](path, bytes(b), {'0': W3.tobytes()})
    try:
      sd, _ = tp.load_torch_file(path, prefer_torch)
      assert all(isinstance(v, np.ndarray) for v in sd.values())
      loaded += 1
    except tp.ConversionError as e:  # any other exception fails the test
      assert str(path) in str(e) and '\n' not in str(e), str(e)
      refused += 1
  # Both outcomes occur (edits that keep the pickle valid, and ones that break it), and
  # every refusal was one line naming the file.
  assert loaded + refused == n and loaded > 0 and refused > n // 2, (loaded, refused)


# ---------------------------------------------------------------- budgets over the whole file
def _views(n: int, numel: int) -> bytes:
  """n stride-0 views of one 3-element storage, each `numel` elements."""
  return state_dict(**{f'v{k}': tensor('0', 3, (numel,), (0,)) for k in range(n)})


@pytest.mark.parametrize('fmt', WRITERS)
def test_repeated_views_are_refused_by_a_total(tmp_path, fmt, loader, monkeypatch):
  """Each view is under the per-tensor limit; together they pass the file's total."""
  monkeypatch.setattr(ps, 'LIMITS', ps.Limits(max_broadcast_bytes=1 << 20,
                                              max_expansion_bytes=4 << 20))
  path = tmp_path / f'views.{fmt}.pth'
  WRITERS[fmt](path, _views(40, 1 << 18), {'0': W3.tobytes()})  # 40 x 1 MiB
  with pytest.raises(ps.UnsafePickleError, match='plus the 4194304-byte limit'):
    loader(path)
  ok = tmp_path / f'four.{fmt}.pth'  # 4 MiB beyond the storages: at the limit, loads
  WRITERS[fmt](ok, _views(4, 1 << 18), {'0': W3.tobytes()})
  assert len(loader(ok)[0]) == 4


def test_repeated_views_at_the_real_limits_are_refused_before_allocating(tmp_path):
  path = tmp_path / 'views.pth'  # 40 x 64 MiB: the 2.56 GB from a 7 KB file
  write_zip(path, _views(40, 1 << 24), {'0': W3.tobytes()})
  assert path.stat().st_size < 10_000

  def refused():
    with pytest.raises(ps.UnsafePickleError, match='views repeated or broadcast'):
      tp.check_torch_file(path)

  assert traced_peak(refused) < PEAK_LIMIT


@pytest.mark.parametrize('what, pkl, said, limits', [
    ('opcodes', b'\x80\x02' + b'}' * 20_000 + b'.', 'more than 10000 opcodes',
     dict(max_pickle_ops=10_000)),
    ('memo', b'\x80\x02' + b''.join(b'Nr' + struct.pack('<I', k) + b'0' for k in range(300))
     + b'N.', 'memo holds more than 100 entries', dict(max_memo=100)),
    ('globals', b'\x80\x02' + b''.join(g('__main__', f'C{k}') + b'0' for k in range(300))
     + b'N.', 'more than 100 distinct globals', dict(max_globals=100)),
])
def test_pickle_work_is_bounded(tmp_path, loader, monkeypatch, what, pkl, said, limits):
  monkeypatch.setattr(ps, 'LIMITS', ps.Limits(**limits))
  path = tmp_path / f'{what}.pth'
  write_legacy(path, pkl, {})
  with pytest.raises(ps.UnsafePickleError, match=said):
    loader(path)


def test_placeholder_classes_are_not_cached_across_files(tmp_path):
  assert not hasattr(ps.inert_class, 'cache_info')  # no process-wide lru_cache to fill
  recorder = g('__main__', 'RecorderMeter_loss') + b')\x81' + b'}' + s('n') + i(1) + b's' + b'b'
  path = tmp_path / 'r.pth'
  write_zip(path, state_dict(w=tensor('0', 3, (3,), (1,)), r=recorder), {'0': W3.tobytes()})
  a, _ = tp.read_torch_file_restricted(str(path))
  b, _ = tp.read_torch_file_restricted(str(path))
  assert type(a['r']) is not type(b['r']) and a['r'].state == b['r'].state == {'n': 1}


def _build_on(global_: bytes) -> bytes:
  """BUILD with slot state (None, {'__name__': 'hacked'}) on the object `global_` names."""
  return global_ + b'N}' + s('__name__') + s('hacked') + b's\x86b'


@pytest.mark.parametrize('target', [g('builtins', 'list'), g('torch._utils', '_rebuild_tensor_v2'),
                                    g('torch', 'FloatStorage'), g('__main__', 'Meter')])
def test_build_cannot_alter_shared_objects(tmp_path, loader, target):
  path = tmp_path / 'build.pth'
  write_zip(path, state_dict(w=tensor('0', 3, (3,), (1,)), x=_build_on(target)),
            {'0': W3.tobytes()})
  with pytest.raises(ps.UnsafePickleError, match='refusing to set the state of'):
    loader(path)
  assert ps.allowed_global('builtins', 'list').__name__ == 'list'
  assert ps.rebuild_tensor.__name__ == 'rebuild_tensor'
  # Each load gets its own objects: even an allowed BUILD could not reach another file.
  assert ps.allowed_global('builtins', 'list') is not ps.allowed_global('builtins', 'list')
  assert ps.allowed_global('torch', 'float32') is not np.dtype(np.float32)


DEEP = 100_000


def test_deeply_nested_metadata_is_one_line_not_a_recursion_error(tmp_path, loader):
  path = tmp_path / 'deep.pth'
  write_zip(path, state_dict(state_dict=b'}' + s('w') + tensor('0', 3, (3,), (1,)) + b's',
                             epoch=b']' * DEEP + b'a' * (DEEP - 1)), {'0': W3.tobytes()})
  sd, how = loader(path)
  np.testing.assert_array_equal(sd['w'], W3)
  assert 'epoch [[[' in how and '\n' not in how


def test_convert_cli_exits_2_with_one_line_for_any_reader_failure(tmp_path, capsys,
                                                                  monkeypatch):
  from qcs_jax.cli import convert
  from qcs_jax.interop import converter
  path = tmp_path / 'deep.pth'
  write_zip(path, state_dict(state_dict=b'}' + s('w') + tensor('0', 3, (3,), (1,)) + b's',
                             epoch=b']' * DEEP + b'a' * (DEEP - 1)), {'0': W3.tobytes()})
  assert convert.main(['--input', str(path), '--output', str(tmp_path / 'o')]) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1 and 'Traceback' not in err

  def boom(p):
    raise RecursionError('maximum recursion depth exceeded\nwhile calling a Python object')

  monkeypatch.setattr(converter, 'load_torch_file', boom)
  assert convert.main(['--input', str(path), '--output', str(tmp_path / 'o2')]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'error: {path}: RecursionError') and err.count('\n') == 1
  assert not (tmp_path / 'o2').exists()


@pytest.mark.skipif(torch is None, reason='torch is not installed')
@pytest.mark.parametrize('legacy', [False, True])
def test_torch_saved_tensors_with_python_attributes_load(tmp_path, legacy):
  t = torch.arange(3, dtype=torch.float32)
  t.note = 'a Python attribute'
  p = torch.nn.Parameter(torch.ones(2, 2))
  p.tag = 7
  path = tmp_path / 'attr.pth'
  torch.save({'w': t, 'p': p}, path, _use_new_zipfile_serialization=not legacy)
  assert b'_rebuild_from_type_v2' in (path.read_bytes() if legacy else
                                      zipfile.ZipFile(path).read('attr/data.pkl'))
  for mode in ('torch', 'restricted', 'no_torch'):  # the file is written: torch may go
    with pytest.MonkeyPatch.context() as mp:
      if mode == 'no_torch':
        no_torch(mp)
      sd, how = tp.load_torch_file(path, prefer_torch=mode != 'restricted')
    assert mode != 'torch' or how.startswith('torch.load'), how
    np.testing.assert_array_equal(sd['w'], W3)
    np.testing.assert_array_equal(sd['p'], np.ones((2, 2), np.float32))


@pytest.mark.skipif(torch is None, reason='torch is not installed')
def test_torch_is_never_called_on_a_hostile_file(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(torch, 'load', lambda *a, **k: calls.append(a))
  marker = tmp_path / 'ran'
  for name, (payload, _) in payloads(str(marker)).items():
    path = tmp_path / f'{name}.pth'
    write_zip(path, state_dict(w=tensor('0', 3, (3,), (1,)), x=payload), {'0': W3.tobytes()})
    with pytest.raises(ps.UnsafePickleError):
      tp.load_torch_file(path, prefer_torch=True)
  assert calls == [] and not marker.exists()
  ok = tmp_path / 'ok.pth'  # the spy is live: a plain file does reach torch.load
  write_zip(ok, state_dict(w=tensor('0', 3, (3,), (1,))), {'0': W3.tobytes()})
  tp.load_torch_file(ok, prefer_torch=True)  # (the spy returns None: read restricted)
  assert len(calls) == 1


def test_zip_bombs_are_refused_before_any_entry_is_read(tmp_path, loader, monkeypatch):
  ratio = tmp_path / 'ratio.pth'
  with zipfile.ZipFile(ratio, 'w', zipfile.ZIP_DEFLATED) as zf:
    zf.writestr('archive/data.pkl', state_dict(w=tensor('0', 3, (3,), (1,))))
    zf.writestr('archive/data/0', bytes(64 << 20))
  opened = []
  real_open = zipfile.ZipFile.open

  def spy(self, name, *a, **k):
    opened.append(getattr(name, 'filename', name))
    return real_open(self, name, *a, **k)

  monkeypatch.setattr(zipfile.ZipFile, 'open', spy)
  with pytest.raises(ps.UnsafePickleError, match='zip bomb'):
    loader(ratio)
  assert opened == []
  write_zip(tmp_path / 'ok.pth', state_dict(w=tensor('0', 3, (3,), (1,))), {'0': W3.tobytes()})
  loader(tmp_path / 'ok.pth')
  assert 'archive/data.pkl' in opened  # the spy sees reads
