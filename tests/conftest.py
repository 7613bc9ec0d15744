"""Test-wide settings and shared helpers.

Settings: 8 virtual CPU devices for the sharding tests; XLA's LLVM optimisation
off (tiny test models compile 2-4x faster and run fast enough); a persistent
compilation cache so the same programs compile once per run.

Helpers (import them with ``from conftest import ...``; pytest puts tests/ on
sys.path): the ``x64`` and ``torch_one_thread`` fixtures, ``rel_err`` and
``tree_rel_err``, ``jit`` (fast compiles) and ``tiny_model_cfg``, the one tiny
network of the tests.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "qcs_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402  (after the XLA settings above)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# XLA:CPU's LLVM optimisation dominates the run time of tiny test programs (also
# set for every jit by XLA_FLAGS above, unless the caller's XLA_FLAGS replace them).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def jit(f, **kw):
  """jax.jit with FAST_COMPILE."""
  return jax.jit(f, compiler_options=FAST_COMPILE, **kw)


# A tiny network: 64x64 images -> 2x2 tokens per level; units (1, 1, 1) still hold
# a max-pool (identity) shortcut and two conv shortcuts.
TINY_MODEL: dict[str, Any] = dict(
    num_classes=7, img_size=64, stage_channels=(8, 16, 32), stage_units=(1, 1, 1),
    embed_dim=32, num_heads=2, base_depth=1, cross_depth=1)


def tiny_model_cfg(name: str = "qcs", **overrides) -> dict[str, Any]:
  """A complete config.model dict: the defaults, TINY_MODEL, the model's own csa."""
  from qcs_jax.recipes.base import CSA  # pylint: disable=import-outside-toplevel
  from qcs_jax.models.shapes import DEFAULT_MODEL_CFG  # pylint: disable=import-outside-toplevel
  cfg = dict(DEFAULT_MODEL_CFG, **TINY_MODEL)
  cfg.update(name=name, csa=CSA.get(name, DEFAULT_MODEL_CFG["csa"]))
  cfg.update(overrides)
  return cfg


def rel_err(ours, ref) -> float:
  """max|ours - ref| / max|ref| over the whole tensor (shapes must agree)."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  if ours.shape != ref.shape:
    raise AssertionError(f"shape {ours.shape} != reference {ref.shape}")
  return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


def tree_rel_err(ours, ref) -> float:
  """The largest rel_err over the leaves of two trees of the same structure."""
  assert jax.tree.structure(ours) == jax.tree.structure(ref)
  return max(rel_err(a, b) for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)))


@pytest.fixture
def x64():
  """jax_enable_x64 for one test, restoring the previous value."""
  old = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", old)


@pytest.fixture
def torch_one_thread():
  """One intra-op torch thread: tiny float64 ops on a busy 2-core machine are ~50x
  slower with OpenMP's 2 threads (each op waits for a descheduled thread)."""
  torch = pytest.importorskip("torch")
  old = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    yield
  finally:
    torch.set_num_threads(old)
