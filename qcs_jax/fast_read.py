"""A saved model's arrays read with tensorstore alone: no orbax, no JAX.

`checkpoint.save_variables` writes orbax's StandardCheckpointer layout. Reading
it back through orbax costs ~0.5-1 s of imports before the first byte, a large
part of a warm `predict`; and since this module does not import JAX, a caller
can read the arrays in a thread (`start`) while JAX itself is being imported.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
from typing import Any

import numpy as np


def read_arrays(path: str | os.PathLike) -> dict[str, Any] | None:
  """The arrays of an orbax StandardCheckpointer folder, read with tensorstore alone.

  Importing orbax costs ~0.5-1 s, a third of a warm `predict`; the layout
  save_variables writes (OCDBT, zarr v2, a tree of dict keys, numpy leaves) is
  simple enough to read directly. None for any other layout or on any error:
  the caller then restores through orbax, which also explains failures.
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
    out: dict[str, Any] = {}
    for k, r in zip(keys, reads):
      node = out
      for part in k[:-1]:
        node = node.setdefault(part, {})
      node[k[-1]] = np.asarray(r.result())
    return out
  except Exception:  # pylint: disable=broad-except
    return None


def start(directory: str | os.PathLike) -> concurrent.futures.Future:
  """read_arrays(DIR/variables) in a background thread; .result() gives its value."""
  pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qcs_read")
  future = pool.submit(read_arrays, pathlib.Path(directory) / "variables")
  pool.shutdown(wait=False)
  return future
