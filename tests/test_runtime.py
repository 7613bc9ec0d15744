"""The entry points' XLA_FLAGS defaults: added once, never over a user's own setting."""
import os
import subprocess
import sys

import pytest

from qcs_jax import runtime


def test_defaults_are_added_to_other_flags():
  assert runtime.with_cpu_xla_defaults("--xla_dump_to=/tmp/x") == (
      "--xla_dump_to=/tmp/x --xla_cpu_use_xnnpack=true")
  assert runtime.with_cpu_xla_defaults("") == "--xla_cpu_use_xnnpack=true"


def test_user_setting_wins_and_nothing_doubles():
  assert runtime.with_cpu_xla_defaults("--xla_cpu_use_xnnpack=false") == (
      "--xla_cpu_use_xnnpack=false")
  once = runtime.with_cpu_xla_defaults("")
  assert runtime.with_cpu_xla_defaults(once) == once


def test_opt_out_leaves_environment_alone():
  env = {"XLA_FLAGS": "--a=1", runtime.OPT_OUT: "0"}
  runtime.set_cpu_xla_defaults(env)
  assert env["XLA_FLAGS"] == "--a=1"
  env = {}
  runtime.set_cpu_xla_defaults(env)
  assert env["XLA_FLAGS"] == "--xla_cpu_use_xnnpack=true"


def test_xla_reads_flags_after_our_imports():
  """The entry points set XLA_FLAGS after importing qcs_jax: XLA must read it later."""
  code = ("import os, qcs_jax.training.loop, qcs_jax.cli.evaluate, qcs_jax.cli.predict\n"
          "os.environ['XLA_FLAGS'] = '--qcs_jax_no_such_flag=1'\n"
          "import jax.numpy as jnp\nprint(jnp.ones(1) + 1)\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=300, check=False)
  assert done.returncode != 0 and "qcs_jax_no_such_flag" in done.stderr, done.stderr[-2000:]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_free_memory_returns_freed_heap_pages_to_the_os():
  """Freed blocks in the middle of the heap stay resident until trimmed (what the
  compiler's temporaries do after a train step compiles)."""
  def rss() -> int:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  blocks = [bytearray(b"x" * 60_000) for _ in range(4000)]  # ~240 MB of heap (not mmap)
  keep = blocks[::16]  # pinned: the heap cannot shrink from its top
  del blocks
  before = rss()
  assert runtime.release_free_memory()
  after = rss()
  assert before - after > 100 * 2**20, (before, after)
  assert len(keep) == 250


@pytest.mark.parametrize("value, platform", [("cuda", "cuda"), ("gpu", "cuda"), ("tpu", "tpu"),
                                             ("cuda,cpu", "cuda"), ("cpu", "cpu"),
                                             (" CPU ", "cpu"), ("rocm", "rocm")])
def test_platform_from_environment_reads_jax_platforms(value, platform):
  assert runtime.platform_from_environment({"JAX_PLATFORMS": value}) == platform


def test_an_installed_accelerator_plugin_means_an_accelerator(tmp_path, monkeypatch):
  assert runtime.platform_from_environment({}) == "cpu"   # this machine: no plugin
  plugin = tmp_path / "jax_plugins" / "xla_cuda12"
  plugin.mkdir(parents=True)
  (plugin / "__init__.py").write_text("")
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.delitem(sys.modules, "jax_plugins", raising=False)
  assert runtime.platform_from_environment({}) == "cuda"
  assert runtime.platform_from_environment({"JAX_PLATFORMS": "cpu"}) == "cpu"


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_cpu_flags_are_not_set_for_an_accelerator(platform, monkeypatch):
  monkeypatch.setattr(runtime, "expected_platform", lambda environ=None: platform)
  env = {"XLA_FLAGS": "--a=1"}
  runtime.set_cpu_xla_defaults(env)
  assert env["XLA_FLAGS"] == "--a=1"
  monkeypatch.setattr(runtime, "expected_platform", lambda environ=None: "cpu")
  runtime.set_cpu_xla_defaults(env)
  assert env["XLA_FLAGS"] == "--a=1 --xla_cpu_use_xnnpack=true"


def test_no_heap_trim_off_cpu(monkeypatch):
  import ctypes
  def no_call(*a, **k):
    raise AssertionError("malloc_trim looked up off CPU")
  monkeypatch.setattr(ctypes, "CDLL", no_call)
  assert runtime.release_free_memory("cuda") is False
  assert runtime.release_free_memory("tpu") is False
  with pytest.raises(AssertionError, match="off CPU"):
    runtime.release_free_memory("cpu")
  assert runtime.expected_platform() == "cpu"  # JAX has started here, on CPU
