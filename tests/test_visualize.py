"""qcs_jax.visualize and tools/visualize_csa.py on tiny random-weight DCS / QCS models."""
import importlib.util
import os

import numpy as np
import pytest
from PIL import Image

from qcs_jax import checkpoint, predict
from qcs_jax.apps import csa_maps as visualize
from qcs_jax.data import synthetic
from qcs_jax.models import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(num_classes=7, img_size=64, stage_channels=(8, 8, 16), stage_units=(1, 1, 1),
            embed_dim=16, num_heads=2, base_depth=1, cross_depth=1)


def _save(tmp_path, name, csa):
  cfg = dict(TINY, name=name, csa=csa)
  variables = predict.random_variables(build_model(cfg), 64, seed=3, inference_only=False)
  return checkpoint.save_variables(tmp_path / name, variables, cfg,
                                   extra={"class_names": list(synthetic.CLASS_NAMES)})


def _tool():
  from qcs_jax import visualize as cli  # pylint: disable=import-outside-toplevel
  return cli


def test_tool_draws_qcs_png(tmp_path, capsys):
  ckpt = _save(tmp_path, "qcs", "sd")
  paths = []
  for i, (expr, seed) in enumerate([(3, 0), (3, 1), (0, 2), (0, 3)]):
    paths.append(str(tmp_path / f"img{i}.png"))
    Image.fromarray(synthetic.render_face(expr, 96, seed=seed)).save(paths[-1])
  out = tmp_path / "csa.png"
  assert _tool().main(["--checkpoint", str(ckpt), *paths, "--output", str(out)]) == 0
  assert "wrote" in capsys.readouterr().out
  with Image.open(out) as im:
    assert im.format == "PNG"
    assert im.size == visualize.figure_size_px(4) == (880, 8 * 220)
    pixels = np.asarray(im.convert("RGB"))
  assert pixels.std() > 20  # not a blank canvas
  assert _tool().main(["--checkpoint", str(ckpt), *paths[:2], "--output",
                       str(tmp_path / "x.png")]) == 2
  assert "needs 4 images (anchor, positive, negative, negative2), got 2" in (
      capsys.readouterr().err)


def test_dcs_maps_match_the_model_and_render(tmp_path):
  loaded = checkpoint.load_model(_save(tmp_path, "dcs", "s"))
  faces = [synthetic.render_face(1, 64, seed=s) for s in (4, 5)]
  maps = visualize.visualize_csa(loaded, faces, str(tmp_path / "dcs.png"))
  assert maps["grid"] == 2  # 64 px -> 2x2 tokens per level
  # The attention recomputed from the matrices' QK is what the model sowed.
  assert maps["max_attention_error"] < 1e-5
  for level in (1, 2, 3):
    att = maps["attention"][level]
    assert att.shape == (2, 4)
    np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-6)
    s = maps["matrices"][level]["S21"]
    assert set(maps["matrices"][level]) == {"S21"} and s.shape == (4, 4)
    # S = max(D') - D', D' = D - min(D): 0 at the farthest token pair, max(D') at the closest.
    assert s.min() == pytest.approx(0.0, abs=1e-6) and s.max() > 0
  np.testing.assert_allclose(maps["probs"].sum(-1), 1.0, atol=1e-6)
  with Image.open(tmp_path / "dcs.png") as im:
    assert im.size == visualize.figure_size_px(2) == (880, 3 * 220)


def test_upsample_and_errors():
  heat = visualize.upsample(np.array([0.1, 0.2, 0.3, 0.4]), 2, 8)
  assert heat.shape == (8, 8) and heat.min() == 0 and heat.max() == pytest.approx(1.0)
  assert heat[0, 0] < heat[0, -1] < heat[-1, -1]  # row-major token order
  base = build_model(dict(TINY, name="baseline"))

  class Loaded:
    model = base
  with pytest.raises(ValueError, match="baseline model has no cross modules"):
    visualize.csa_maps(Loaded, np.zeros((1, 64, 64, 3), np.float32))
