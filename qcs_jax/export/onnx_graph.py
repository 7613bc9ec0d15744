"""The inference path as an ONNX graph, written node by node from the Flax variables.

Why by hand: the only maintained JAX -> ONNX converter on PyPI, jax2onnx, pins
orbax-checkpoint < 0.11.37 (this project uses 0.12) and pulls ~30 packages
(huggingface_hub, netron, equinox, ...). The deployed network is small and
fixed (IR50 stages -> neck convs -> VIT_base), so the graph below mirrors
qcs_jax/models/{backbone,qcs,vit}.py layer by layer with the `onnx` helper
API, and export_lib checks it against the JAX model on every export.

Input `images`: float32 (batch, S, S, 3), NHWC, RGB, normalised like the eval
transform (the same tensor `LoadedModel.logits` takes); output `logits`
(batch, K). The batch dimension is symbolic. Opset 17 (LayerNormalization).
Eval-mode BatchNorm is folded into a per-channel Mul + Add.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qcs_jax.models.backbone import nearest_indices
from qcs_jax.models.qcs import tokens_per_level

OPSET = 17
INPUT, OUTPUT = "images", "logits"


class _Graph:
  """Accumulates nodes and float32/int64 initialisers with unique names."""

  def __init__(self):
    self.nodes: list = []
    self.inits: list = []
    self._n = 0

  def name(self, hint: str) -> str:
    self._n += 1
    return f"{hint}_{self._n}"

  def const(self, value: Any, hint: str, dtype: Any = np.float32) -> str:
    n = self.name(hint)
    self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), n))
    return n

  def op(self, op_type: str, inputs: list[str], hint: str, **attrs: Any) -> str:
    out = self.name(hint)
    self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
    return out


def _a(v: Any) -> np.ndarray:
  return np.asarray(v, np.float64)


# ------------------------------------------------------------------ layers (NCHW)


def _conv(g: _Graph, x: str, p: Mapping, stride: int, pad: int, hint: str) -> str:
  """Flax Conv kernel (kh, kw, in, out) -> ONNX Conv weight (out, in, kh, kw)."""
  w = g.const(np.transpose(_a(p["kernel"]), (3, 2, 0, 1)), hint + "_w")
  inputs = [x, w] + ([g.const(_a(p["bias"]), hint + "_b")] if "bias" in p else [])
  k = int(np.shape(p["kernel"])[0])
  return g.op("Conv", inputs, hint, kernel_shape=[k, k], strides=[stride, stride],
              pads=[pad] * 4)


def _bn(g: _Graph, x: str, p: Mapping, s: Mapping, hint: str, eps: float = 1e-5) -> str:
  """Eval BatchNorm as x * a + b, a = scale / sqrt(var + eps), b = bias - mean * a."""
  a = _a(p["scale"]) / np.sqrt(_a(s["var"]) + eps)
  b = _a(p["bias"]) - _a(s["mean"]) * a
  y = g.op("Mul", [x, g.const(a.reshape(1, -1, 1, 1), hint + "_a")], hint + "_mul")
  return g.op("Add", [y, g.const(b.reshape(1, -1, 1, 1), hint + "_b")], hint)


def _prelu(g: _Graph, x: str, p: Mapping, hint: str) -> str:
  return g.op("PRelu", [x, g.const(_a(p["alpha"]).reshape(-1, 1, 1), hint + "_s")], hint)


def _subsample(g: _Graph, x: str, step: int, hint: str) -> str:
  """x[:, :, ::step, ::step] (NCHW): MaxPool2d(1, step) and the 2x nearest resize."""
  if step == 1:
    return x
  big = np.iinfo(np.int64).max
  return g.op("Slice", [x, g.const([0, 0], hint + "_st", np.int64),
                        g.const([big, big], hint + "_en", np.int64),
                        g.const([2, 3], hint + "_ax", np.int64),
                        g.const([step, step], hint + "_sp", np.int64)], hint)


def _resize_nearest(g: _Graph, x: str, size_in: int, size_out: int) -> str:
  """backbone.resize_nearest: a strided slice at exactly 2x, else PyTorch's row choice."""
  if size_in == 2 * size_out:
    return _subsample(g, x, 2, "resize")
  if size_in == size_out:
    return x
  idx = g.const(nearest_indices(size_in, size_out), "resize_idx", np.int64)
  return g.op("Gather", [g.op("Gather", [x, idx], "resize_h", axis=2), idx], "resize_w",
              axis=3)


def _unit(g: _Graph, x: str, p: Mapping, s: Mapping, stride: int, hint: str) -> str:
  """backbone.BottleneckIR in eval mode."""
  if "shortcut_conv" in p:
    sc = _conv(g, x, p["shortcut_conv"], stride, 0, hint + "_sc")
    sc = _bn(g, sc, p["shortcut_bn"], s["shortcut_bn"], hint + "_scbn")
  else:
    sc = _subsample(g, x, stride, hint + "_sc")
  r = _bn(g, x, p["res_bn1"], s["res_bn1"], hint + "_bn1")
  r = _conv(g, r, p["res_conv1"], 1, 1, hint + "_c1")
  r = _prelu(g, r, p["res_prelu"], hint + "_pr")
  r = _conv(g, r, p["res_conv2"], stride, 1, hint + "_c2")
  r = _bn(g, r, p["res_bn2"], s["res_bn2"], hint + "_bn2")
  return g.op("Add", [r, sc], hint)


def _tokens(g: _Graph, x: str, d: int, hint: str) -> str:
  """(N, D, h, w) -> (N, h*w, D), token i*w + j like the NHWC flatten."""
  flat = g.op("Reshape", [x, g.const([0, d, -1], hint + "_shape", np.int64)], hint + "_flat")
  return g.op("Transpose", [flat], hint, perm=[0, 2, 1])


# ------------------------------------------------------------------ ViT (tokens)


def _dense(g: _Graph, x: str, p: Mapping, hint: str) -> str:
  y = g.op("MatMul", [x, g.const(_a(p["kernel"]), hint + "_w")], hint + "_mm")
  return g.op("Add", [y, g.const(_a(p["bias"]), hint + "_b")], hint)


def _layernorm(g: _Graph, x: str, p: Mapping, hint: str, eps: float = 1e-6) -> str:
  return g.op("LayerNormalization", [x, g.const(_a(p["scale"]), hint + "_s"),
                                     g.const(_a(p["bias"]), hint + "_b")],
              hint, axis=-1, epsilon=eps)


def _gelu(g: _Graph, x: str, hint: str) -> str:
  """Exact GELU: 0.5 x (1 + erf(x / sqrt 2))."""
  e = g.op("Erf", [g.op("Mul", [x, g.const(1 / np.sqrt(2.0), hint + "_r")], hint + "_x")],
           hint + "_erf")
  h = g.op("Add", [e, g.const(1.0, hint + "_one")], hint + "_1p")
  return g.op("Mul", [g.op("Mul", [x, h], hint + "_xh"), g.const(0.5, hint + "_half")], hint)


def _attention(g: _Graph, x: str, p: Mapping, t: int, d: int, heads: int, hint: str) -> str:
  hd = d // heads
  qkv = _dense(g, x, p["qkv"], hint + "_qkv")
  qkv = g.op("Reshape", [qkv, g.const([0, t, 3, heads, hd], hint + "_s5", np.int64)],
             hint + "_r5")
  qkv = g.op("Transpose", [qkv], hint + "_t5", perm=[2, 0, 3, 1, 4])  # (3, B, H, T, hd)
  q, k, v = (g.op("Gather", [qkv, g.const(i, f"{hint}_i{i}", np.int64)], f"{hint}_{n}", axis=0)
             for i, n in enumerate("qkv"))
  kt = g.op("Transpose", [k], hint + "_kt", perm=[0, 1, 3, 2])
  logits = g.op("Mul", [g.op("MatMul", [q, kt], hint + "_qk"),
                        g.const(hd ** -0.5, hint + "_scale")], hint + "_logits")
  attn = g.op("Softmax", [logits], hint + "_softmax", axis=-1)
  out = g.op("Transpose", [g.op("MatMul", [attn, v], hint + "_av")], hint + "_ot",
             perm=[0, 2, 1, 3])
  out = g.op("Reshape", [out, g.const([0, t, d], hint + "_s3", np.int64)], hint + "_merge")
  return _dense(g, out, p["proj"], hint + "_proj")


def _vit(g: _Graph, tokens: str, p: Mapping, t: int, d: int, heads: int) -> str:
  """VisionTransformer (eval) -> logits: cls | tokens + pos, blocks, norm, SE, head."""
  batch = g.op("Slice", [g.op("Shape", [tokens], "shape"), g.const([0], "b0", np.int64),
                         g.const([1], "b1", np.int64)], "batch")
  cls_shape = g.op("Concat", [batch, g.const([1, d], "cls_tail", np.int64)], "cls_shape",
                   axis=0)
  cls = g.op("Expand", [g.const(_a(p["cls_token"]), "cls_token"), cls_shape], "cls")
  x = g.op("Concat", [cls, tokens], "with_cls", axis=1)
  x = g.op("Add", [x, g.const(_a(p["pos_embed"]), "pos_embed")], "pos")
  depth = len([k for k in p if k.startswith("blocks_")])
  for i in range(depth):
    bp, h = p[f"blocks_{i}"], f"blk{i}"
    a = _attention(g, _layernorm(g, x, bp["norm1"], h + "_n1"), bp["attn"], t + 1, d, heads,
                   h + "_attn")
    x = g.op("Add", [x, a], h + "_res1")
    m = _dense(g, _layernorm(g, x, bp["norm2"], h + "_n2"), bp["mlp"]["fc1"], h + "_fc1")
    m = _dense(g, _gelu(g, m, h + "_gelu"), bp["mlp"]["fc2"], h + "_fc2")
    x = g.op("Add", [x, m], h + "_res2")
  x = _layernorm(g, x, p["norm"], "norm")
  c = g.op("Gather", [x, g.const(0, "cls_idx", np.int64)], "cls_out", axis=1)
  se = g.op("Relu", [_dense(g, c, p["se_block"]["linear1"], "se1")], "se_relu")
  se = g.op("Sigmoid", [_dense(g, se, p["se_block"]["linear2"], "se2")], "se_gate")
  return _dense(g, g.op("Mul", [c, se], "se"), p["head"], "head")


# ------------------------------------------------------------------ the model


def build_onnx(variables: Mapping[str, Any], model_cfg: Mapping[str, Any],
               metadata: Mapping[str, str] | None = None) -> Any:
  """The inference path of `model_cfg` with `variables` -> onnx.ModelProto (checked)."""
  params, stats = variables["params"], variables["batch_stats"]
  size, d = int(model_cfg["img_size"]), int(model_cfg["embed_dim"])
  heads, k = int(model_cfg["num_heads"]), int(model_cfg["num_classes"])
  units = [int(u) for u in model_cfg["stage_units"]]
  g = _Graph()
  x = g.op("Transpose", [INPUT], "nchw", perm=[0, 3, 1, 2])
  x = _resize_nearest(g, x, size, size // 2)
  ip, ist = params["ir_back"], stats["ir_back"]
  x = _conv(g, x, ip["input_conv"], 1, 1, "input_conv")
  x = _prelu(g, _bn(g, x, ip["input_bn"], ist["input_bn"], "input_bn"), ip["input_prelu"],
             "input_prelu")
  outs = []
  for stage, n in enumerate(units):
    for i in range(n):
      name = f"body{stage + 1}_{i}"
      x = _unit(g, x, ip[name], ist[name], 2 if i == 0 else 1, name)
    outs.append(x)
  x1, x2, x3 = outs
  l1 = _conv(g, _conv(g, _conv(g, x1, params["conv1"], 2, 1, "conv1"), params["embed_q_0"], 2,
                      1, "embed_q_0"), params["embed_q_1"], 2, 1, "embed_q_1")
  l2 = _conv(g, _conv(g, x2, params["conv2"], 2, 1, "conv2"), params["embed_k"], 2, 1,
             "embed_k")
  l3 = _conv(g, _conv(g, x3, params["conv3"], 2, 1, "conv3"), params["embed_v"], 1, 0,
             "embed_v")
  tokens = g.op("Concat", [_tokens(g, l, d, f"tokens{i}") for i, l in enumerate((l1, l2, l3))],
                "tokens", axis=1)
  _vit(g, tokens, params["VIT_base"], 3 * tokens_per_level(size), d, heads)
  g.nodes[-1].output[0] = OUTPUT  # the head's bias Add, the graph's last node
  graph = helper.make_graph(
      g.nodes, "qcs_inference",
      [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", size, size, 3])],
      [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", k])], g.inits)
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                            producer_name="qcs_jax")
  model.ir_version = 8  # readable by onnxruntime >= 1.10
  for key, value in (metadata or {}).items():
    model.metadata_props.add(key=str(key), value=str(value))
  onnx.checker.check_model(model)
  return model
