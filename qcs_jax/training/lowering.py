"""The accelerator programs, seen without an accelerator: jax.export for CUDA or TPU.

``export_train_step`` lowers the real jitted SAM train step (state donated, batch
sharded on ``data``) for any platform list from abstract shapes only: no weights
are initialised and nothing runs, so a CPU machine can check what a GPU or TPU
would execute. ``summarize`` reads the StableHLO text for the facts a reviewer
asks about: loops (the CPU-only tap GEMMs are a ``while``), convolutions and their
element type, the arguments sharded on ``data`` and the donated ones.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax import export as jax_export
from jax.sharding import Mesh

from qcs_jax.data import device_augment
from qcs_jax.data.pipeline import resolve_augment_on
from qcs_jax.data.transforms import Augment
from qcs_jax.models import NUM_BRANCHES, build_model
from qcs_jax.training import optim
from qcs_jax.training.state import create_state
from qcs_jax.training.step import make_eval_step, make_train_step


def abstract_state(model: Any, tx: Any, num_branches: int, img_size: int, mesh: Mesh) -> Any:
  """The train state's shapes, dtypes and shardings (jax.eval_shape: nothing computed)."""
  def init(rng):
    v = model.init({"params": rng, "dropout": rng},
                   jnp.zeros((1, num_branches, img_size, img_size, 3)), train=False)
    return {"params": v["params"], "batch_stats": v.get("batch_stats", {})}

  rng = jax.random.PRNGKey(0)
  variables = jax.eval_shape(init, rng)
  return jax.eval_shape(lambda v, r: create_state(v, tx, r, mesh), variables, rng)


def _abstract_program(cfg: ml_collections.ConfigDict, platforms: Sequence[str], mesh: Mesh,
                      batch_size: int | None, default_batch: int) -> tuple[Any, ...]:
  """(model, tx, abstract state, global batch, whether augmentation runs in the step)."""
  model = build_model(cfg.model)
  tx = optim.make_optimizer(cfg.optim, 100)
  state = abstract_state(model, tx, NUM_BRANCHES[cfg.model.name], int(cfg.model.img_size), mesh)
  ndev = mesh.devices.size
  b = batch_size or -(-int(default_batch) // ndev) * ndev
  # 'auto' resolves for the platform lowered for, as a run there would.
  device = resolve_augment_on(cfg.data.get("augment_on", "auto"), platforms[0]) == "device"
  return model, tx, state, b, device


def export_train_step(cfg: ml_collections.ConfigDict, platforms: Sequence[str], mesh: Mesh,
                      batch_size: int | None = None) -> jax_export.Exported:
  """jax.export of cfg's train step for `platforms`, global batch `batch_size` (default
  cfg.data.batch_size rounded up to a multiple of the mesh's devices).

  Augmentation on the device (data.augment_on 'device', or 'auto' lowered for an
  accelerator): the step that takes the cache's uint8 images (at the recipe's resize
  size) with each row's epoch and position, and augments inside.
  """
  model, tx, state, b, device = _abstract_program(cfg, platforms, mesh, batch_size,
                                                  cfg.data.batch_size)
  nb, s = NUM_BRANCHES[cfg.model.name], int(cfg.model.img_size)
  labels = jax.ShapeDtypeStruct((b, nb), jnp.int32)
  if device:
    augment = Augment.from_cfg(cfg.data.augment)
    h, w = device_augment.source_hw(augment, s)
    step = make_train_step(model, tx, mesh, augment=augment, img_size=s)
    row = jax.ShapeDtypeStruct((b,), jnp.int32)
    args = (state, jax.ShapeDtypeStruct((b, nb, h, w, 3), jnp.uint8), labels, row, row)
  else:
    step = make_train_step(model, tx, mesh)
    args = (state, jax.ShapeDtypeStruct((b, nb, s, s, 3), jnp.float32), labels)
  return jax_export.export(step, platforms=tuple(platforms))(*args)


def export_eval_step(cfg: ml_collections.ConfigDict, platforms: Sequence[str], mesh: Mesh,
                     batch_size: int | None = None) -> jax_export.Exported:
  """jax.export of the jitted inference path (variables, images) -> logits."""
  model, _, state, b, device = _abstract_program(cfg, platforms, mesh, batch_size,
                                                 cfg.data.eval_batch_size)
  s = int(cfg.model.img_size)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  images = jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8 if device else jnp.float32)
  return jax_export.export(make_eval_step(model, mesh, uint8=device),
                           platforms=tuple(platforms))(variables, images)


@dataclasses.dataclass(frozen=True)
class ProgramSummary:
  """What an exported program holds, counted from its StableHLO text."""

  platforms: tuple[str, ...]
  loops: int                 # stablehlo.while ops (the CPU tap GEMMs are one per conv)
  convolutions: int
  bf16_convolutions: int     # convolutions whose operands are bfloat16
  arguments: int
  donated: int               # arguments aliased to an output (jit's donate_argnums)
  data_sharded: tuple[str, ...]   # names of the arguments split along the `data` axis
  uint8_inputs: tuple[str, ...]   # names of the uint8 arguments (images from the cache)
  custom_calls: tuple[str, ...]   # distinct custom_call targets

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


_NAME = re.compile(r'loc\("([^"]*)"\)')


def _main_arguments(text: str) -> list[tuple[str, str]]:
  """(attributes and type, name) of each argument of the public main function."""
  start = text.index("func.func public @main(")
  end = text.index(") -> ", start)
  out = []
  for chunk in re.split(r'%arg\d+: ', text[start:end])[1:]:
    name = _NAME.search(chunk)
    out.append((chunk, name.group(1) if name else ""))
  return out


def summarize(exported: jax_export.Exported) -> ProgramSummary:
  """Counts loops, convolutions (bf16 ones too), donated and data-sharded arguments."""
  text = exported.mlir_module()
  convs = re.findall(r'stablehlo\.convolution\(.*?\) -> tensor<[^>]*>', text)
  convs += re.findall(r'"stablehlo\.convolution"\(.*?\)\s*:\s*\(([^)]*)\)', text)
  bf16 = sum("bf16" in c for c in convs)
  args = _main_arguments(text)
  sharded = tuple(name for attrs, name in args if '{"data"}' in attrs)
  return ProgramSummary(
      platforms=tuple(exported.platforms),
      loops=text.count("stablehlo.while"),
      convolutions=len(convs),
      bf16_convolutions=bf16,
      arguments=len(args),
      donated=sum("tf.aliasing_output" in attrs for attrs, _ in args),
      data_sharded=sharded,
      uint8_inputs=tuple(name for attrs, name in args if attrs.startswith("tensor<")
                         and re.match(r'tensor<[^>]*xui8>', attrs)),
      custom_calls=tuple(sorted(set(re.findall(r'custom_call @([\w.$-]+)', text)) |
                                set(re.findall(r'call_target_name = "([^"]+)"', text)))))
