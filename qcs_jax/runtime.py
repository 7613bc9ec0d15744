"""Process-wide XLA settings the command-line entry points apply before JAX starts.

XLA's default CPU convolutions (YNNPACK fusions in jaxlib 0.10) run IR50's
forward+backward ~1.5x slower than XNNPACK's; with XNNPACK a full-size QCS train
step on CPU matches PyTorch's (docs/BENCHMARKS.md). GPU and TPU backends ignore
``xla_cpu_*`` flags.
"""
from __future__ import annotations

import os
import sys
from typing import MutableMapping

CPU_XLA_FLAGS = ("--xla_cpu_use_xnnpack=true",)
OPT_OUT = "QCS_JAX_XLA_DEFAULTS"  # set to 0 to leave XLA_FLAGS alone


def with_cpu_xla_defaults(xla_flags: str) -> str:
  """``xla_flags`` plus each of CPU_XLA_FLAGS whose flag it does not already set."""
  out = xla_flags.split()
  for flag in CPU_XLA_FLAGS:
    name = flag.split("=", 1)[0]
    if not any(f == name or f.startswith(name + "=") for f in out):
      out.append(flag)
  return " ".join(out)


def set_cpu_xla_defaults(environ: MutableMapping[str, str] = os.environ) -> None:
  """Adds CPU_XLA_FLAGS to XLA_FLAGS (a user's own setting of a flag wins).

  Must run before the first JAX computation: XLA reads XLA_FLAGS once, when it
  creates its first backend.
  """
  if environ.get(OPT_OUT, "1") == "0":
    return
  environ["XLA_FLAGS"] = with_cpu_xla_defaults(environ.get("XLA_FLAGS", ""))


CACHE_ENV = "QCS_JAX_CACHE_DIR"  # a folder, or 0 / off / none to disable the cache


def default_cache_dir(environ: MutableMapping[str, str] = os.environ) -> str | None:
  """Where compiled XLA programs are kept: $QCS_JAX_CACHE_DIR, else ~/.cache/qcs_jax/xla
  ($XDG_CACHE_HOME honoured); None when $QCS_JAX_CACHE_DIR is 0, off or none."""
  value = environ.get(CACHE_ENV)
  if value is not None:
    return None if value.strip().lower() in ("0", "off", "none", "false", "") else value
  home = environ.get("HOME") or os.path.expanduser("~")
  base = environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
  return os.path.join(base, "qcs_jax", "xla")


def cache_dir_for(directory: str | None | bool = True,
                  environ: MutableMapping[str, str] = os.environ) -> str | None:
  """The folder enable_compilation_cache(directory) uses, found without importing JAX
  (None: no cache). A folder JAX already has (JAX_COMPILATION_CACHE_DIR) wins."""
  if not directory:
    return None
  jax = sys.modules.get("jax")
  config = getattr(jax, "config", None)
  current = (config.jax_compilation_cache_dir if config is not None
             else environ.get("JAX_COMPILATION_CACHE_DIR"))
  if current:
    return current
  if directory is True:
    directory = default_cache_dir(environ)
  return os.path.expanduser(str(directory)) if directory else None


def enable_compilation_cache(directory: str | None | bool = True,
                             environ: MutableMapping[str, str] = os.environ) -> str | None:
  """Turns on JAX's persistent compilation cache; returns the folder in use (None: off).

  A fresh process then loads each compiled program (e.g. the model's inference
  path at batch 1) from disk instead of compiling it again. directory: True for
  default_cache_dir(), a path, or False/None to leave the cache off. A cache
  folder the user already gave JAX (JAX_COMPILATION_CACHE_DIR) is kept as is.
  """
  import jax  # pylint: disable=import-outside-toplevel
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  directory = cache_dir_for(directory, environ)
  if not directory:
    return None
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError:
    return None  # a read-only home: run without the cache rather than fail
  jax.config.update("jax_compilation_cache_dir", directory)
  # Cache every program, even quick ones: the inference path at paper size
  # compiles in seconds on CPU, and small ones add up at start-up.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return directory


def release_free_memory() -> bool:
  """Hands the memory malloc keeps but no longer uses back to the OS (glibc's malloc_trim).

  Compiling the paper-size train step frees ~1 GB of compiler temporaries that
  glibc keeps mapped; trimming once after the compile lowered the resident
  memory during batch-4 steps from 5.8 to 4.8 GiB (docs/BENCHMARKS.md). False
  where the C library has no malloc_trim (macOS, musl).
  """
  import ctypes  # pylint: disable=import-outside-toplevel
  try:
    trim = ctypes.CDLL(None).malloc_trim
  except (OSError, AttributeError):
    return False
  trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
  return bool(trim(0))
