"""The qcs_jax contender: the library's jitted train step and inference path."""
# Imports wait inside the functions that need them: a benchmark worker process imports
# only its own framework's side, whose memory and start-up it measures.
from __future__ import annotations

import time
from typing import Any

import numpy as np

from qcs_jax.bench.workload import make_batch, random_images, timed


class JaxBench:
  """qcs_jax side: the library's jitted train step and inference path."""

  framework = "jax"

  def __init__(self, args, cfg: dict, sd: dict):
    import jax  # pylint: disable=import-outside-toplevel
    # pylint: disable=import-outside-toplevel
    from qcs_jax import recipes as config_lib
    from qcs_jax.interop import converter as convert
    from qcs_jax.training import optim, state as train_state, step as train_step
    from qcs_jax.models import build_model  # pylint: disable=import-outside-toplevel
    self.jax, self.train_state, self.train_step = jax, train_state, train_step
    self.args = args
    self.cfg = dict(cfg, dtype=args.dtype, remat=getattr(args, "remat", "none"))
    self.model = build_model(self.cfg)
    t0 = time.perf_counter()
    if sd is None:  # --random_weights: no torch needed (e.g. a GPU machine)
      from qcs_jax.apps.throughput import random_variables
      self.variables = random_variables(self.model, self.cfg["img_size"], args.seed,
                                        inference_only=False)
    else:
      self.variables, _ = convert.convert_model(sd, cfg)
    self.convert_s = time.perf_counter() - t0
    self.device = jax.devices()[0]
    self.mesh = train_state.make_mesh([self.device])
    ocfg = config_lib.base_config().optim
    self.tx = optim.make_optimizer(ocfg, steps_per_epoch=1000)
    self.prepared: dict[str, dict] = {}

  def versions(self) -> str:
    import flax  # pylint: disable=import-outside-toplevel
    import jaxlib  # pylint: disable=import-outside-toplevel
    return f"jax {self.jax.__version__}, jaxlib {jaxlib.__version__}, flax {flax.__version__}"

  def _xla_numbers(self, compiled) -> dict:
    info: dict[str, Any] = {}
    try:
      ca = compiled.cost_analysis()
      ca = ca[0] if isinstance(ca, (list, tuple)) else ca
      info["flops"] = float(ca.get("flops", float("nan")))
    except Exception as e:  # pylint: disable=broad-except
      info["flops_error"] = repr(e)
    try:
      ma = compiled.memory_analysis()
      info["xla_bytes"] = dict(
          arguments=ma.argument_size_in_bytes, outputs=ma.output_size_in_bytes,
          temp=ma.temp_size_in_bytes, alias=ma.alias_size_in_bytes,
          peak=ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
          - ma.alias_size_in_bytes)
    except Exception as e:  # pylint: disable=broad-except
      info["memory_error"] = repr(e)
    return info

  def prepare(self, key: str) -> dict:
    """Compiles the program of `key` ('train' or 'infer:B'); returns compile time etc."""
    jax, tl, ts = self.jax, self.train_step, self.train_state
    if key == "train":
      images, labels = make_batch(self.cfg, self.args.batch, self.args.seed)
      state = ts.create_state(self.variables, self.tx, jax.random.PRNGKey(0), self.mesh)
      step = tl.make_train_step(self.model, self.tx, self.mesh)
      x, y = tl.shard_batch(images, self.mesh), tl.shard_batch(labels, self.mesh)
      t0 = time.perf_counter()
      lowered = step.lower(state, x, y)
      t1 = time.perf_counter()
      compiled = lowered.compile()
      t2 = time.perf_counter()
      from qcs_jax import runtime  # pylint: disable=import-outside-toplevel
      runtime.release_free_memory()  # as training does after its first compile
      box = {"state": state}

      def run():
        box["state"], m = compiled(box["state"], x, y)
        return float(m["loss"])  # fetching the loss waits for the step

      n_images = images.shape[0] * images.shape[1]
    else:
      b = int(key.split(":")[1])
      images = random_images(self.cfg, b, seed=self.args.seed)
      fn = tl.make_eval_step(self.model, self.mesh)
      v = jax.device_put(self.variables, self.jax.sharding.NamedSharding(
          self.mesh, self.jax.sharding.PartitionSpec()))
      x = tl.shard_batch(images, self.mesh)
      t0 = time.perf_counter()
      lowered = fn.lower(v, x)
      t1 = time.perf_counter()
      compiled = lowered.compile()
      t2 = time.perf_counter()

      def run():
        return float(np.asarray(compiled(v, x))[0, 0])

      n_images = b
    self.prepared[key] = dict(run=run, compiled=compiled)
    info = dict(lower_s=t1 - t0, compile_s=t2 - t1, images=n_images, **self._xla_numbers(compiled))
    return info

  def step(self, key: str) -> dict:
    r = timed(self.prepared[key]["run"])
    if self.device.platform == "gpu":
      stats = self.device.memory_stats() or {}
      r["device_peak"] = stats.get("peak_bytes_in_use")
    return r

  def device_info(self) -> dict:
    return dict(platform=self.device.platform, device_kind=self.device.device_kind)
