"""Process-wide XLA settings the command-line entry points apply before JAX starts.

Every setting here is CPU tuning and applies on CPU only: XLA's default CPU
convolutions (YNNPACK fusions in jaxlib 0.10) run IR50's forward+backward ~1.5x
slower than XNNPACK's (docs/BENCHMARKS.md), and glibc keeps the CPU compiler's
freed temporaries resident. A process that will run on a GPU or TPU gets
neither: ``expected_platform`` tells which, before JAX starts. This module is
imported before JAX (the programs set XLA_FLAGS here first): JAX is imported
only inside the one function that configures it.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import pkgutil
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


# An accelerator's PJRT plugin (jax[cuda12], jax[rocm], jax[tpu]) makes it JAX's default.
_TPU_MODULES = ("libtpu",)


def _installed_plugins() -> list[str]:
  """Names of the jax_plugins.* modules installed (xla_cuda12, ...), without importing JAX."""
  try:
    spec = importlib.util.find_spec("jax_plugins")
  except (ImportError, ValueError):
    return []
  if spec is None or not spec.submodule_search_locations:
    return []
  return sorted(m.name for m in pkgutil.iter_modules(list(spec.submodule_search_locations)))


def expected_platform(environ: MutableMapping[str, str] = os.environ) -> str:
  """The platform JAX will pick as its default: 'cpu', 'cuda', 'rocm' or 'tpu'.

  Found without starting JAX (XLA_FLAGS must be set before that): a backend JAX
  already started wins; then JAX_PLATFORMS' first entry; then an installed
  accelerator plugin; else 'cpu'.
  """
  jax = sys.modules.get("jax")
  bridge = getattr(getattr(jax, "_src", None), "xla_bridge", None)
  if bridge is not None and bridge.backends_are_initialized():
    return str(jax.default_backend())
  return platform_from_environment(environ)


def platform_from_environment(environ: MutableMapping[str, str] = os.environ) -> str:
  """expected_platform's guess from JAX_PLATFORMS and the installed plugins alone."""
  platforms = (environ.get("JAX_PLATFORMS") or environ.get("JAX_PLATFORM_NAME") or "").strip()
  if platforms:
    first = platforms.split(",")[0].strip().lower()
    return "cuda" if first == "gpu" else first
  for plugin in _installed_plugins():
    for name in ("cuda", "rocm", "tpu"):
      if name in plugin:
        return name
  if any(importlib.util.find_spec(m) is not None for m in _TPU_MODULES):
    return "tpu"
  return "cpu"


def set_cpu_xla_defaults(environ: MutableMapping[str, str] = os.environ) -> None:
  """Adds CPU_XLA_FLAGS to XLA_FLAGS (a user's own setting of a flag wins), on CPU only.

  Must run before the first JAX computation: XLA reads XLA_FLAGS once, when it
  creates its first backend. A process bound for a GPU or TPU
  (``expected_platform``) keeps its XLA_FLAGS as they are.
  """
  if environ.get(OPT_OUT, "1") == "0" or expected_platform(environ) != "cpu":
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


def release_free_memory(platform: str | None = None) -> bool:
  """Hands the memory malloc keeps but no longer uses back to the OS (glibc's malloc_trim).

  Compiling the paper-size train step on CPU frees ~1 GB of compiler temporaries
  that glibc keeps mapped (docs/BENCHMARKS.md). CPU only: ``platform`` (default:
  JAX's default backend, or expected_platform() before JAX starts) other than
  'cpu' returns False and trims nothing. False too where the C library has no
  malloc_trim (macOS, musl).
  """
  if (platform or expected_platform()) != "cpu":
    return False
  try:
    trim = ctypes.CDLL(None).malloc_trim
  except (OSError, AttributeError):
    return False
  trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
  return bool(trim(0))
