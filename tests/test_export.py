"""qcs_jax.export: the hand-built ONNX graph, the jax.export artefact, the CLI's checks."""
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from qcs_jax.apps import throughput
from qcs_jax.cli import export
from qcs_jax.export import artefacts as export_lib
from qcs_jax.model_files import model_dir as checkpoint
from qcs_jax.data import synthetic, transforms
from qcs_jax.export import onnx_graph
from qcs_jax.models import build_model
from qcs_jax.models.shapes import model_cfg_dict

TINY = dict(name="qcs", csa="sd", num_classes=7, img_size=32, stage_channels=(8, 8, 16),
            stage_units=(1, 2, 1), embed_dim=16, num_heads=2, base_depth=2, cross_depth=1)
NAMES = list(synthetic.CLASS_NAMES)


def _random(cfg, seed):
  """Inference variables with every leaf random (BN statistics, PReLU slopes included)."""
  model = build_model(cfg)
  v = throughput.random_variables(model, cfg["img_size"], seed=seed, inference_only=False)
  rng = np.random.default_rng(seed)
  shake = lambda a: (a * rng.uniform(0.5, 1.5, a.shape)  # noqa: E731
                     + rng.normal(0, 0.1, a.shape)).astype(np.float32)
  v = jax.tree.map(shake, v)
  v["batch_stats"] = jax.tree.map(np.abs, v["batch_stats"])  # variances > 0
  return model, v


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  _, v = _random(TINY, 3)
  return str(checkpoint.save_variables(tmp_path_factory.mktemp("ckpt") / "model", v, TINY,
                                       extra={"class_names": NAMES}))


@pytest.mark.parametrize("img_size", [32, 27])  # 2x strided resize; PyTorch-nearest gather
def test_onnx_graph_matches_flax(img_size):
  cfg = model_cfg_dict(dict(TINY, img_size=img_size))
  model, v = _random(cfg, img_size)
  proto = onnx_graph.build_onnx(v, cfg, {"note": "x"})
  assert {p.key: p.value for p in proto.metadata_props} == {"note": "x"}
  dims = proto.graph.input[0].type.tensor_type.shape.dim
  assert [d.dim_param or d.dim_value for d in dims] == ["batch", img_size, img_size, 3]
  sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
  x = np.random.default_rng(1).standard_normal((5, img_size, img_size, 3)).astype(np.float32)
  ref = np.asarray(model.apply(v, x, method="infer"))
  for bs in (1, 5):  # one graph, two batch sizes
    got = sess.run(None, {"images": x[:bs]})[0]
    assert got.shape == (bs, 7)
    assert export_lib.relative_error(got, ref[:bs]) < 1e-5
  # The parity figure sees a change in any single weight.
  v["params"]["VIT_base"]["blocks_1"]["mlp"]["fc2"]["bias"][3] += 0.05
  sess = ort.InferenceSession(onnx_graph.build_onnx(v, cfg).SerializeToString(),
                              providers=["CPUExecutionProvider"])
  assert export_lib.relative_error(sess.run(None, {"images": x})[0], ref) > 1e-3


def test_cli_writes_verified_artefacts(ckpt, tmp_path, capsys):
  out = tmp_path / "exp"
  assert export.main(["--checkpoint", ckpt, "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "jax: wrote" in printed and "onnx: wrote" in printed and "at batch 8" in printed
  meta = json.loads((out / "export.json").read_text())
  assert meta["class_names"] == NAMES
  pre = meta["preprocessing"]
  assert pre["input_shape"] == ["batch", 32, 32, 3] and pre["channel_order"] == "RGB"
  assert pre["mean"] == [0.485, 0.456, 0.406] and pre["std"] == [0.229, 0.224, 0.225]
  for fmt in ("jax", "onnx"):
    errs = meta["artefacts"][fmt]["max_relative_error"]
    assert set(errs) == {"1", "8"} and all(0 <= e <= 1e-4 for e in errs.values())
  sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
  props = sess.get_modelmeta().custom_metadata_map
  assert json.loads(props["class_names"]) == NAMES
  assert props["preprocessing.channel_order"] == "RGB"
  # The README's recipe: preprocessing from export.json alone, as another program would.
  face = Image.fromarray(synthetic.render_face("Fear", 80, seed=4))
  x = face.convert("RGB").resize((32, 32), Image.BILINEAR)
  x = ((np.asarray(x, np.float32) / 255 - pre["mean"]) / pre["std"]).astype(np.float32)[None]
  want = np.asarray(checkpoint.load_model(ckpt).logits(
      transforms.build_transform(None, 32, train=False)(np.asarray(face))[None]))
  assert export_lib.relative_error(sess.run(["logits"], {"images": x})[0], want) < 1e-5
  # The jax.export artefact runs in a process that never imports qcs_jax (or flax).
  faces = export_lib.sample_faces(32, 3)
  np.save(tmp_path / "x.npy", faces)
  code = ("import sys, numpy as np; from jax import export\n"
          f"e = export.deserialize(bytearray(open({str(out / 'model.jax_export')!r}, 'rb').read()))\n"
          f"y = np.asarray(e.call(np.load({str(tmp_path / 'x.npy')!r})))\n"
          f"np.save({str(tmp_path / 'y.npy')!r}, y)\n"
          "assert not any(m.startswith(('qcs_jax', 'flax')) for m in sys.modules)\n")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path,
                 env=dict(os.environ, JAX_PLATFORMS="cpu"))
  ref = np.asarray(checkpoint.load_model(ckpt).logits(faces))
  assert export_lib.relative_error(np.load(tmp_path / "y.npy"), ref) < 1e-5
  # Existing artefacts are kept unless --force.
  assert export.main(["--checkpoint", ckpt, "--out", str(out), "--formats", "onnx"]) == 1
  assert "already exist" in capsys.readouterr().err
  # --force re-exports; --benchmark times onnxruntime beside JAX.
  assert export.main(["--checkpoint", ckpt, "--out", str(out), "--formats", "onnx", "--force",
                      "--benchmark", "--benchmark_rounds", "1",
                      "--benchmark_batch_sizes", "2"]) == 0
  line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("batch   2:")][0]
  assert re.fullmatch(r"batch   2: jax [\d.]+ images/s \([\d.]+ CPU-s/image\), "
                      r"onnxruntime [\d.]+ images/s \([\d.]+ CPU-s/image\)", line), line
  meta2 = json.loads((out / "export.json").read_text())
  assert set(meta2["artefacts"]) == {"jax", "onnx"}  # the jax record is kept


def test_parity_failure_removes_the_file(ckpt, tmp_path, capsys):
  out = tmp_path / "exp"
  code = export.main(["--checkpoint", ckpt, "--out", str(out), "--formats", "onnx",
                      "--tolerance", "1e-12"])
  err = capsys.readouterr().err
  assert code == 1 and err.startswith("error: onnx export: max relative logits error")
  assert "above the tolerance 1e-12" in err
  assert not (out / "model.onnx").exists() and not (out / "model.onnx.tmp").exists()


def test_cli_errors_are_one_line(tmp_path):
  res = subprocess.run([sys.executable, "-m", "qcs_jax.cli.export", "--checkpoint",
                        str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=os.getcwd())
  assert res.returncode == 2 and "Traceback" not in res.stderr
  assert res.stderr.startswith("error: ") and "nope" in res.stderr
  assert export.main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "o"),
                      "--formats", "tflite"]) != 0
