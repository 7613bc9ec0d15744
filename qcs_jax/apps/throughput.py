"""Inference throughput of the jitted inference path, with random or loaded weights.

  qcs-predict --benchmark [--checkpoint DIR]

`random_variables` gives a model random weights without running its (slow on
CPU) initialisers; the tests use it too.
"""
from __future__ import annotations

import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qcs_jax.model_files.model_dir import load_checkpoint
from qcs_jax.models import build_model


def random_variables(model: Any, img_size: int, seed: int = 0,
                     inference_only: bool = True) -> dict:
  """Random variables (of the inference path, or all) without running the initialisers.

  Shapes come from jax.eval_shape(model.init); kernels ~ N(0, 1/fan_in), norm
  scales and BN variances 1, biases and means 0, PReLU slopes 0.25. As good as
  model.init for timing and tests, without its slow compilation on CPU.
  """
  if inference_only:
    x = jax.ShapeDtypeStruct((1, img_size, img_size, 3), np.float32)
    init = lambda k, x: model.init(k, x, method="infer")  # noqa: E731
  else:
    x = jax.ShapeDtypeStruct((1, model.num_branches, img_size, img_size, 3), np.float32)
    init = lambda k, x: model.init(k, x, train=False)  # noqa: E731
  shapes = jax.eval_shape(init, jax.random.PRNGKey(0), x)
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = str(getattr(path[-1], "key", path[-1]))
    if name in ("scale", "var"):
      return np.ones(s.shape, s.dtype)
    if name in ("bias", "mean"):
      return np.zeros(s.shape, s.dtype)
    if name == "alpha":
      return np.full(s.shape, 0.25, s.dtype)
    fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 1
    std = 0.02 if name in ("cls_token", "pos_embed") else 1.0 / np.sqrt(fan_in)
    return (rng.standard_normal(s.shape) * std).astype(s.dtype)

  return dict(jax.tree_util.tree_map_with_path(fill, shapes))


def benchmark(model_cfg: Any = None, loaded: Any = None, batch_sizes: Sequence[int] = (1, 64),
              min_seconds: float = 5.0, min_iters: int = 3) -> list[dict]:
  """Inference images/s of the jitted inference path at each batch size (compilation excluded).

  model_cfg: config.model fields (default: the paper's QCS, 224 px) with random
  weights; or `loaded`: a loaded checkpoint.
  """
  if loaded is not None:
    model, variables, cfg = loaded.model, loaded.variables, dict(loaded.model_cfg)
  else:
    cfg = dict(model_cfg or {})
    model = build_model(cfg)
    variables = random_variables(model, model.img_size)
  size = int(cfg.get("img_size", 224))
  variables = jax.device_put(variables)
  infer = jax.jit(lambda v, x: model.apply(v, x, method="infer"))
  out = []
  for bs in batch_sizes:
    x = jnp.asarray(np.random.default_rng(0).standard_normal((bs, size, size, 3)), jnp.float32)
    t0 = time.perf_counter()
    infer(variables, x).block_until_ready()
    compile_s = time.perf_counter() - t0
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while n < min_iters or time.perf_counter() - t0 < min_seconds:
      infer(variables, x).block_until_ready()
      n += 1
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    # CPU seconds per batch (all threads): tells a busy machine from a slow model.
    out.append({"batch_size": bs, "images_per_sec": n * bs / dt,
                "ms_per_batch": 1000 * dt / n, "cpu_s_per_batch": cpu / n, "iterations": n,
                "first_call_s": compile_s, "device": str(jax.devices()[0])})
  return out


def print_benchmark(checkpoint: str | None, batch_sizes: Sequence[int],
                    min_seconds: float) -> None:
  """Prints `benchmark` of the checkpoint (or of the paper's QCS, random weights)."""
  loaded = None
  if checkpoint:
    loaded = load_checkpoint(checkpoint)
  what = checkpoint or "QCS, paper defaults (224 px, IR50 + ViT 768), random weights"
  print(f"inference throughput of {what}:")
  for r in benchmark(loaded=loaded, batch_sizes=batch_sizes, min_seconds=min_seconds):
    print(f"  batch {r['batch_size']:3d}: {r['images_per_sec']:8.1f} images/s "
          f"({r['ms_per_batch']:.1f} ms and {r['cpu_s_per_batch']:.2f} CPU-s per batch, "
          f"{r['iterations']} runs, first call {r['first_call_s']:.1f} s) on {r['device']}")
  print(f"  ({os.cpu_count()} CPU cores; load average {os.getloadavg()[0]:.1f} when done)")
