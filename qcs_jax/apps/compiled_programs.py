"""The model's inference path, traced and compiled once per machine.

JAX's persistent compilation cache skips XLA's compile in a fresh process, but
not what comes before it: importing Flax, tracing the network and lowering it
(~1.5 s of a 5 s warm start at paper size). Two files per batch size, kept
beside the compilation cache and keyed by everything that shapes the program
(model config, variable shapes, batch size, JAX version, backend):

- `compiled_infer` keeps the compiled executable itself
  (jax.experimental.serialize_executable; the key adds the CPU's instruction
  set and XLA_FLAGS, since the machine code is specific to them), so a fresh
  process loads and runs it with no Flax, no trace and no lowering;
- `exported_infer` keeps the traced program (StableHLO, jax.export): where the
  executable cannot be kept, a fresh process deserializes it instead of
  tracing, and its compile is then a persistent-cache hit.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from typing import Any, Callable

import jax
import jaxlib
import numpy as np
from jax import export
from jax.experimental import serialize_executable as se
from jax.experimental.compilation_cache import compilation_cache as cc


def program_key(model_cfg: dict, variables: Any, batch: int, img_size: int) -> str:
  """A hex digest of all that determines the exported inference program."""
  leaves, tree = jax.tree.flatten(variables)
  sig = {
      "cfg": json.loads(json.dumps(dict(model_cfg), default=str, sort_keys=True)),
      "tree": str(tree),
      "leaves": [(list(np.shape(a)), str(np.asarray(a).dtype if not hasattr(a, "dtype")
                                         else a.dtype)) for a in leaves],
      "batch": int(batch), "img_size": int(img_size),
      "jax": jax.__version__, "jaxlib": jaxlib.__version__,
      "backend": jax.default_backend(),
  }
  return hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:32]


def exported_infer(module: Any, variables: Any, model_cfg: dict, batch: int, img_size: int,
                   directory: str) -> Callable[[Any, Any], Any]:
  """jit(f)(variables, x (batch, S, S, 3) float32) -> logits, f = module's inference path,
  loaded from DIR/infer-<key>.jaxexport or traced and saved there first."""
  path = os.path.join(directory, f"infer-{program_key(model_cfg, variables, batch, img_size)}"
                      ".jaxexport")
  exp = None
  if os.path.isfile(path):
    try:
      with open(path, "rb") as f:
        exp = export.deserialize(bytearray(f.read()))
    except Exception:  # pylint: disable=broad-except
      exp = None  # a damaged file: trace again and replace it
  if exp is None:
    spec = lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype)  # noqa: E731
    fn = jax.jit(lambda v, x: module.apply(v, x, method="infer"))
    exp = export.export(fn)(jax.tree.map(spec, variables),
                            jax.ShapeDtypeStruct((batch, img_size, img_size, 3), np.float32))
    _save_atomic(path, bytes(exp.serialize()))
  return jax.jit(exp.call)


_MAGIC = b"qcs_jax.executable/1\n"


def machine_signature() -> dict:
  """What a compiled CPU executable depends on beyond the program: instruction set, flags."""
  flags = ""
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((l for l in f if l.startswith(("flags", "Features"))), "")
  except OSError:
    pass
  return {"machine": platform.machine(), "processor": platform.processor(),
          "cpu_flags": hashlib.sha256(flags.encode()).hexdigest(),
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "devices": [d.device_kind for d in jax.local_devices()]}


def _save_atomic(path: str, data: bytes) -> None:
  """Writes path via a temporary file and a rename; a read-only or full cache is skipped."""
  tmp = None
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except OSError:
    if tmp and os.path.exists(tmp):
      os.remove(tmp)  # a full disk: no half-written file left behind


def _executable_file(loaded: Any, batch: int, img_size: int, directory: str) -> str:
  key = hashlib.sha256(json.dumps(
      [program_key(loaded.model_cfg, loaded.variables, batch, img_size), machine_signature()],
      sort_keys=True).encode()).hexdigest()[:32]
  return os.path.join(directory, f"infer-{key}.xla")


def load_compiled(loaded: Any, batch: int, img_size: int, directory: str) -> Any | None:
  """The saved executable compiled_infer would use, or None if there is no good one."""
  # The argument and result structures: rebuilt here, so the file is only bytes.
  in_tree = jax.tree.structure(((loaded.variables, 0), {}))
  out_tree = jax.tree.structure(0)
  path = _executable_file(loaded, batch, img_size, directory)
  try:
    with open(path, "rb") as f:
      blob = f.read()
    n = len(_MAGIC)
    head, digest, payload = blob[:n], blob[n:n + 32], blob[n + 32:]
    if head == _MAGIC and hashlib.sha256(payload).digest() == digest:
      return _FirstRunChecked(
          se.deserialize_and_load(payload, in_tree, out_tree,
                                  execution_devices=jax.local_devices()[:1]),
          path, lambda: compiled_infer(loaded, batch, img_size, directory))
  except (OSError, ValueError, RuntimeError):  # absent or unloadable: compile it again
    pass
  return None


class _FirstRunChecked:
  """A saved executable whose first run is awaited: if it fails (e.g. a file written by
  an older version without its machine code), the file is removed and the program
  compiled again, once."""

  def __init__(self, compiled: Any, path: str, recompile: Callable[[], Any]):
    self.compiled, self.path, self.recompile, self.checked = compiled, path, recompile, False

  def __call__(self, variables: Any, x: Any) -> Any:
    if self.checked:
      return self.compiled(variables, x)
    try:
      out = jax.block_until_ready(self.compiled(variables, x))
    except jax.errors.JaxRuntimeError:
      try:
        os.remove(self.path)
      except OSError:
        pass
      self.compiled = self.recompile()
      out = self.compiled(variables, x)
    self.checked = True
    return out


def _compile_uncached(lowered: Any) -> Any | None:
  """lowered.compile() by XLA itself: not from JAX's persistent cache (off meanwhile), nor
  its in-memory one (a default-valued option changes the key, not the program); None on
  failure."""
  was = jax.config.jax_enable_compilation_cache
  try:
    cc.reset_cache()  # JAX decides once per process whether its cache is used
    jax.config.update("jax_enable_compilation_cache", False)
    return lowered.compile(compiler_options={"xla_cpu_enable_fast_math": False})
  except Exception:  # pylint: disable=broad-except
    return None
  finally:
    jax.config.update("jax_enable_compilation_cache", was)
    cc.reset_cache()


def compiled_infer(loaded: Any, batch: int, img_size: int,
                   directory: str) -> Callable[[Any, Any], Any]:
  """f(variables, x (batch, S, S, 3) float32) -> logits: the compiled inference program of
  `loaded` (checkpoint.LoadedModel), from DIR/infer-<key>.xla or compiled and saved there.

  The file holds a checksum of the executable: a damaged file is recompiled and
  replaced, never loaded. Like JAX's own compilation cache (and Python's
  __pycache__), the folder must be the user's own: an executable runs as code.
  """
  found = load_compiled(loaded, batch, img_size, directory)
  if found is not None:
    return found
  variables = loaded.variables
  x_spec = jax.ShapeDtypeStruct((batch, img_size, img_size, 3), np.float32)
  try:
    traced = exported_infer(loaded.model, variables, loaded.model_cfg, batch, img_size,
                            directory)
  except ImportError:  # jax.export's serialization needs flatbuffers
    model = loaded.model
    traced = jax.jit(lambda v, x: model.apply(v, x, method="infer"))
  spec = lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype)  # noqa: E731
  lowered = traced.lower(jax.tree.map(spec, variables), x_spec)
  # An executable that JAX took from its persistent cache serializes without its machine
  # code (jaxlib 0.10: "Function ... not found" when a copy runs in another process, while
  # a copy in this process still finds it). So the program is compiled by XLA itself.
  compiled = _compile_uncached(lowered)
  if compiled is None:
    return lowered.compile()  # not saved: nothing guarantees the copy would run
  if (compiled.in_tree == jax.tree.structure(((variables, 0), {}))
      and compiled.out_tree == jax.tree.structure(0)):
    try:
      payload, _, _ = se.serialize(compiled)
      _save_atomic(_executable_file(loaded, batch, img_size, directory),
                   _MAGIC + hashlib.sha256(payload).digest() + payload)
    except Exception:  # pylint: disable=broad-except
      pass  # a backend that cannot serialize executables: JAX's cache still helps
  return compiled
