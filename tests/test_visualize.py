"""qcs_jax.visualize and tools/visualize_csa.py on tiny random-weight DCS / QCS models."""
import numpy as np
import pytest
from PIL import Image

from conftest import rel_err, tiny_model_cfg
from qcs_jax.apps import throughput
from qcs_jax.model_files import model_dir as checkpoint
from qcs_jax.apps import csa_maps as visualize
from qcs_jax.data import synthetic
from qcs_jax.models import build_model



def _save(tmp_path, name, csa):
  cfg = tiny_model_cfg(name, csa=csa)
  variables = throughput.random_variables(build_model(cfg), 64, seed=3, inference_only=False)
  return checkpoint.save_variables(tmp_path / name, variables, cfg,
                                   extra={"class_names": list(synthetic.CLASS_NAMES)})


def _tool():
  from qcs_jax.cli import visualize as cli  # pylint: disable=import-outside-toplevel
  return cli


def test_tool_draws_qcs_png(tmp_path, capsys, monkeypatch):
  ckpt = _save(tmp_path, "qcs", "sd")
  paths = []
  for i, (expr, seed) in enumerate([(3, 0), (3, 1), (0, 2), (0, 3)]):
    paths.append(str(tmp_path / f"img{i}.png"))
    Image.fromarray(synthetic.render_face(expr, 96, seed=seed)).save(paths[-1])
  out = tmp_path / "csa.png"
  seen = []  # what the tool computed its picture from: (model, images, maps)

  def spy(loaded, images, real=visualize.csa_maps):
    seen.append((loaded, images, real(loaded, images)))
    return seen[-1][2]
  monkeypatch.setattr(visualize, "csa_maps", spy)
  assert _tool().main(["--checkpoint", str(ckpt), *paths, "--output", str(out)]) == 0
  assert "wrote" in capsys.readouterr().out
  with Image.open(out) as im:
    assert im.format == "PNG"
    assert im.size == visualize.figure_size_px(4) == (880, 8 * 220)
    pixels = np.asarray(im.convert("RGB"))
  assert pixels.std() > 20  # not a blank canvas
  (loaded, images, maps), = seen
  assert images.shape == (4, 64, 64, 3)
  _check_qcs_maps(loaded, images, maps)
  assert _tool().main(["--checkpoint", str(ckpt), *paths[:2], "--output",
                       str(tmp_path / "x.png")]) == 2
  assert "needs 4 images (anchor, positive, negative, negative2), got 2" in (
      capsys.readouterr().err)


def _layer_norm(x, p):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * p["scale"] + \
      p["bias"]


def _check_qcs_maps(loaded, x, maps):
  """Maps against the model: its sown CSA vectors, and S / D recomputed in numpy from
  its VIT_base tokens and each cross module's norm1 + QK projection."""
  import jax  # pylint: disable=import-outside-toplevel
  model, v = loaded.model, loaded.variables

  @jax.jit
  def forward(v, x):
    _, state = model.apply(v, x[None], train=False, mutable=["intermediates"])
    return state["intermediates"], model.apply(v, x, method="features")["tokens"]

  state, tokens = forward(v, x)
  state = {"intermediates": state}
  tokens = np.asarray(tokens, np.float64)
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
  t, d = tokens.shape[1] // 3, tokens.shape[2]
  for level in (1, 2, 3):
    p = params[f"cross_attention_{level}"]
    sown = np.asarray(state["intermediates"][f"cross_attention_{level}"]["attention"][0][0])
    assert sown.shape == (4, t) and rel_err(maps["attention"][level], sown) < 1e-6
    qk = _layer_norm(tokens[:, (level - 1) * t:level * t], p["norm1"]) @ \
        p["proj"]["kernel"][:, :d] + p["proj"]["bias"][:d]
    for name, (r, c) in {"S21": (1, 0), "S43": (3, 2), "D31": (2, 0), "D42": (3, 1)}.items():
      dist = np.sqrt(((qk[r][:, None] - qk[c][None]) ** 2).sum(-1))
      shifted = dist - dist.min()  # global min-max (model.minmax 'global')
      want = shifted.max() - shifted if name[0] == "S" else shifted
      assert rel_err(maps["matrices"][level][name], want) < 1e-4, (level, name)


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
  base = build_model(tiny_model_cfg("baseline"))

  class Loaded:
    model = base
  with pytest.raises(ValueError, match="baseline model has no cross modules"):
    visualize.csa_maps(Loaded, np.zeros((1, 64, 64, 3), np.float32))
