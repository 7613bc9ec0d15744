"""The restricted unpickler: pickle's pure-Python one with every opcode counted.

Which globals a load may name, and what they stand for, is pickle_safety's
concern; this module runs the opcodes under that load's `Budget` (opcodes,
memo entries) and allows BUILD only on objects the load made itself.
"""
from __future__ import annotations

import pickle
from typing import Any, Callable

import numpy as np

from qcs_jax.interop import pickle_safety as ps
from qcs_jax.interop.pickle_safety import (
    PLACEHOLDER_MODULES, Budget, ConversionError, Inert, StorageType,
    UnsafePickleError, allowed_global, qualified)

# What BUILD (an object's __setstate__ / __dict__ update) may be applied to: objects the
# load made itself (its dtypes are copies). Functions, classes and markers are refused.
_BUILDABLE = (Inert, np.ndarray, dict, np.dtype)


# The pure-Python unpickler keeps its memo in a dict: the C one sizes a list by
# the largest memo index a pickle names, so LONG_BINPUT 2**31 would take 16 GiB.
_PyUnpickler = pickle._Unpickler  # pylint: disable=protected-access
_MEMO_OPS = {pickle.PUT[0], pickle.BINPUT[0], pickle.LONG_BINPUT[0], pickle.MEMOIZE[0]}


def _counted_dispatch() -> dict[int, Callable]:
  """The unpickler's opcode table, each entry counting against the load's Budget."""
  table = {}
  for code, fn in _PyUnpickler.dispatch.items():
    def op(self, fn=fn, code=code):
      b = self.budget
      b.ops += 1
      if b.ops > b.limits.max_pickle_ops:
        raise UnsafePickleError(f'the pickle runs more than {b.limits.max_pickle_ops} '
                                'opcodes')
      fn(self)
      if code in _MEMO_OPS and len(self.memo) > b.limits.max_memo:
        raise UnsafePickleError(f'the pickle memo holds more than {b.limits.max_memo} '
                                'entries')
    table[code] = op
  table[pickle.BUILD[0]] = _checked_build(table[pickle.BUILD[0]])
  return table


def _checked_build(counted: Callable) -> Callable:
  def build(self):
    inst = self.stack[-2] if len(self.stack) >= 2 else None
    if not isinstance(inst, _BUILDABLE):
      raise UnsafePickleError(f'refusing to set the state of {type(inst).__name__} '
                              f'{inst!r:.60}')
    counted(self)
  return build


_DISPATCH = _counted_dispatch()


class RestrictedUnpickler(_PyUnpickler):
  """Tensors, storages, containers and numpy arrays; __main__ classes inert; all else refused."""

  dispatch = _DISPATCH

  def __init__(self, file, storage_loader, budget: Budget | None = None):
    super().__init__(file)
    self._storage_loader = storage_loader
    self.budget = budget or Budget(ps.LIMITS)
    self.placeholders: set[str] = set()

  def find_class(self, module, name):
    module, name = str(module), str(name)
    self.budget.name_global(module, name)
    obj = allowed_global(module, name, self.budget)
    if obj is not None:
      return obj
    if module in PLACEHOLDER_MODULES:
      self.placeholders.add(f'{module}.{name}')
      return self.budget.inert_class(module, name)
    raise UnsafePickleError(
        f'refusing to load: the pickle calls {qualified(module, name)}, which is outside '
        'the harmless set (tensors, storages, containers, numpy arrays, classes of a '
        '__main__ training script); nothing was run')

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or len(pid) < 3 or pid[0] != 'storage':
      raise ConversionError(f'unknown persistent id {pid!r:.80}')
    storage_type, key = pid[1], str(pid[2])
    if not isinstance(storage_type, StorageType):
      raise ConversionError(f'unknown storage type {storage_type!r:.80}')
    numel = pid[4] if len(pid) > 4 and isinstance(pid[4], int) else None
    view = pid[5] if len(pid) > 5 else None
    storage = self._storage_loader(storage_type.dtype, key, numel, view)
    self.budget.note_storage(key, storage)
    return storage


def unpickle(data, storage_loader, budget: Budget | None = None) -> tuple[Any, set[str]]:
  """One restricted load; `budget` (default: a new one under LIMITS) is charged for it."""
  up = RestrictedUnpickler(data, storage_loader, budget)
  return up.load(), up.placeholders

