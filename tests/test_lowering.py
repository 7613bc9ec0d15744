"""The GPU and TPU programs, checked on the CPU machine with jax.export.

Lowered for CUDA or TPU, the train step must be XLA's own ops: no CPU tap-GEMM
loop (a ``stablehlo.while`` per 3x3 weight gradient), convolutions for every
layer's forward and both gradients, the batch sharded on ``data``, the state
donated, bfloat16 convolutions where the config asks for them. The CPU lowering
is the control: it does hold the loops, so the check can fail.
"""
from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import pytest
from jax import export as jax_export

from conftest import tiny_model_cfg
from qcs_jax import recipes as config_lib
from qcs_jax.apps import throughput
from qcs_jax.data import transforms
from qcs_jax.export import artefacts
from qcs_jax.models import build_model
from qcs_jax.training import lowering, state as train_state

ACCELERATORS = ("cuda", "tpu")


def _cfg(name: str, dtype: str = "float32", paper: bool = False):
  cfg = config_lib.synthetic(name)
  if paper:
    cfg.model.update(config_lib.paper_config(name, "rafdb").model.to_dict())
  else:
    cfg.model.update(tiny_model_cfg(name))
  cfg.model.dtype = dtype
  cfg.data.augment_on = "host"   # float32 batches; the device path has its own test below
  return cfg


@functools.lru_cache(maxsize=None)
def _train(name: str, platforms: tuple[str, ...], devices: int, dtype: str = "float32",
           paper: bool = False) -> lowering.ProgramSummary:
  mesh = train_state.make_mesh(jax.devices()[:devices])
  return lowering.summarize(lowering.export_train_step(
      _cfg(name, dtype, paper), platforms, mesh, batch_size=2 * devices))


def _state_arguments(s: lowering.ProgramSummary) -> int:
  return s.arguments - 2   # all but images and labels


def _check_accelerator_program(s: lowering.ProgramSummary, dtype: str = "float32") -> None:
  assert s.loops == 0, f"{s.platforms}: {s.loops} while loops (the CPU tap GEMMs?)"
  assert s.convolutions > 0
  assert s.data_sharded == ("images", "labels"), s.data_sharded
  assert s.donated == _state_arguments(s) > 0, (s.donated, s.arguments)
  if dtype == "bfloat16":
    assert s.bf16_convolutions == s.convolutions, s
  else:
    assert s.bf16_convolutions == 0, s
  assert not s.custom_calls, s.custom_calls   # nothing CPU-only (no host callbacks)


@pytest.mark.parametrize("platform", ACCELERATORS)
def test_qcs_train_step_is_xlas_own_ops(platform):
  """8 devices here; 1 device in the paper-size test below."""
  s = _train("qcs", (platform,), 8)
  _check_accelerator_program(s)
  cpu = _train("qcs", ("cpu",), 8)
  # Each 3x3 weight gradient is a convolution on the accelerator and a tap loop on CPU.
  assert cpu.loops > 0
  assert s.convolutions == cpu.convolutions + cpu.loops


@pytest.mark.parametrize("name", ["dcs", "baseline"])
def test_dcs_and_baseline_train_steps_on_both_accelerators(name):
  for platform in ACCELERATORS:
    _check_accelerator_program(_train(name, (platform,), 8))


@pytest.mark.parametrize("platform", ACCELERATORS)
def test_bfloat16_train_step_convolves_in_bfloat16(platform):
  _check_accelerator_program(_train("qcs", (platform,), 8, "bfloat16"), "bfloat16")


def test_paper_size_train_step_for_cuda_on_one_device():
  s = _train("qcs", ("cuda",), 1, paper=True)
  _check_accelerator_program(s)
  # IR50 (49 3x3 convs + 3 1x1 shortcuts + the stem) and the neck's embeddings:
  # forward, input gradient and weight gradient of each, twice for SAM.
  assert s.convolutions > 300, s.convolutions


@pytest.mark.parametrize("platform", ACCELERATORS)
@pytest.mark.parametrize("devices", [1, 8])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_eval_step_programs(platform, devices, dtype):
  mesh = train_state.make_mesh(jax.devices()[:devices])
  s = lowering.summarize(lowering.export_eval_step(_cfg("qcs", dtype), (platform,), mesh,
                                                   batch_size=2 * devices))
  assert s.loops == 0 and s.convolutions > 0 and not s.custom_calls
  assert s.data_sharded == ("x",), s.data_sharded
  assert s.bf16_convolutions == (s.convolutions if dtype == "bfloat16" else 0)
  assert s.donated == 0   # the variables are kept for the next batch


def test_device_augmentation_runs_inside_the_accelerator_step():
  """data.augment_on='auto' lowered for an accelerator is the device path: uint8 images
  at the recipe's resize size in, the augmentation in the program (gathers and selects,
  no loop, no host callback). AffectNet's recipe: every op (rotation, crop, flip,
  jitter, erasing)."""
  cfg = _cfg("qcs")
  cfg.data.augment = transforms.recipe_augment("affectnet", cfg.model.img_size)
  cfg.data.augment_on = "auto"
  mesh = train_state.make_mesh(jax.devices())
  for platform in ACCELERATORS:
    s = lowering.summarize(lowering.export_train_step(cfg, (platform,), mesh, batch_size=8))
    assert s.loops == 0 and not s.custom_calls, s
    assert s.uint8_inputs == ("images",), s.uint8_inputs
    assert s.data_sharded == ("images", "labels", "epoch", "position"), s.data_sharded
    assert s.donated == s.arguments - 4
  e = lowering.summarize(lowering.export_eval_step(cfg, ("cuda",), mesh, batch_size=8))
  assert e.uint8_inputs == ("x",) and e.data_sharded == ("x",)


@pytest.mark.parametrize("name", ["qcs", "dcs", "baseline"])
@pytest.mark.parametrize("platform", ACCELERATORS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_device_train_step_of_every_model(name, platform, dtype):
  """The one-GPU (one-chip) programs a single-card user runs, every model and dtype."""
  _check_accelerator_program(_train(name, (platform,), 1, dtype), dtype)


@pytest.mark.parametrize("name", ["qcs", "dcs", "baseline"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_inference_function_for_accelerators(name, dtype):
  """`model.apply(v, x, method="infer")`, the function the Recognizer, predict and the
  export artefact compile, lowered for CUDA and TPU: convolutions in the configured
  dtype, no loop and nothing CPU-only."""
  cfg = _cfg(name, dtype).model
  model = build_model(cfg)
  size = cfg.img_size
  x = jax.ShapeDtypeStruct((4, size, size, 3), jnp.float32)
  v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, method="infer"), x)
  fn = jax.jit(lambda v, x: model.apply(v, x, method="infer"))
  for platform in ACCELERATORS:
    s = lowering.summarize(jax_export.export(fn, platforms=(platform,))(v, x))
    assert s.loops == 0 and s.convolutions > 0 and not s.custom_calls, s
    assert s.bf16_convolutions == (s.convolutions if dtype == "bfloat16" else 0), s


def test_export_artefact_holds_an_accelerator_program():
  """qcs-export's jax artefact is lowered for cpu and cuda (one file, either machine):
  its CUDA half is XLA's ops too, weights embedded, batch symbolic."""
  cfg = _cfg("qcs").model.to_dict()
  model = build_model(cfg)
  v = throughput.random_variables(model, cfg["img_size"], seed=0, inference_only=True)
  blob = artefacts.export_jax(types.SimpleNamespace(model=model, variables=v, model_cfg=cfg))
  s = lowering.summarize(jax_export.deserialize(bytearray(blob)))
  assert s.platforms == ("cpu", "cuda")
  assert s.loops == 0 and s.convolutions > 0, s
  # jax.export's own check of the symbolic batch, run by whoever calls it; no host callback
  assert s.custom_calls == ("shape_assertion",), s.custom_calls
