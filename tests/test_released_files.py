"""The authors' 8 released model files, rebuilt from the facts we have about them.

tests/fixtures/official_state_dict_shapes.json lists every state-dict key, shape
and dtype of the 8 model files the QCS authors released (read off their code).
Here each is rebuilt with random values, wrapped in the checkpoint dict their
main_*.py scripts save ('module.' keys, a CUDA-tagged pickle, `__main__`
recorder objects, a tensor best_acc) and converted through the command line
with its recipe config: every file must convert with 0 unknown keys and the
values must land where the model reads them. The PyTorch reference must
also have exactly the released keys and shapes.
"""
from __future__ import annotations

import collections
import json
import pathlib
import shutil
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from qcs_jax import zoo  # pylint: disable=wrong-import-position
from qcs_jax.cli import convert as cli  # pylint: disable=wrong-import-position
from qcs_jax.interop import converter  # pylint: disable=wrong-import-position
from qcs_jax.model_files import model_dir as checkpoint  # pylint: disable=wrong-import-position
from qcs_jax.interop import reference as R
from qcs_jax.interop import reference_files as RF  # pylint: disable=wrong-import-position

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = json.loads((REPO / "tests" / "fixtures" / "official_state_dict_shapes.json")
                     .read_text())["models"]
# model file -> (model, data set): which recipe (configs/<data>[_dcs].py) trains it.
FILES = {
    "QCS_7cls_raf_db": ("qcs", "rafdb"), "QCS_7cls_affectnet": ("qcs", "affectnet7"),
    "QCS_8cls_ferplus": ("qcs", "ferplus"), "QCS_8cls_affectnet": ("qcs", "affectnet8"),
    "DCS_7cls_raf_db": ("dcs", "rafdb"), "DCS_7cls_affectnet": ("dcs", "affectnet7"),
    "DCS_8cls_ferplus": ("dcs", "ferplus"), "DCS_8cls_affectnet": ("dcs", "affectnet8"),
}
# Keys of the released files that our reference does not build (unused by forward).
NOT_IN_REFERENCE = ("fusion.classifier.",)


def test_fixture_covers_the_eight_files():
  assert sorted(FIXTURE) == sorted(FILES)


def _released_state_dict(name: str, seed: int = 0) -> "collections.OrderedDict":
  rng = np.random.default_rng(seed)
  sd = collections.OrderedDict()
  for key, (shape, dtype) in FIXTURE[name].items():
    if dtype == "int64":
      sd[key] = torch.tensor(int(rng.integers(1, 10_000)), dtype=torch.int64).reshape(shape)
    else:
      assert dtype == "float32", (key, dtype)
      sd[key] = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
  return sd


@pytest.mark.parametrize("name", sorted(FILES))
def test_released_file_converts_through_the_cli(name, tmp_path, capsys):
  model, data = FILES[name]
  sd = _released_state_dict(name)
  pth = tmp_path / f"{name}.pth"
  RF.save_full_checkpoint(pth, state_dict=sd, epoch=120, best_acc=92.5)
  with zipfile.ZipFile(pth) as z:  # what the authors' files look like inside
    pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
  assert b"cuda:0" in pkl and b"__main__" in pkl and b"RecorderMeter_matrix" in pkl

  config = REPO / "configs" / f"{data}{'_dcs' if model == 'dcs' else ''}.py"
  out = tmp_path / "converted"
  try:
    rc = cli.main(["--full", "--input", str(pth), "--config", str(config),
                   "--output", str(out)])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert "unknown keys (neither loaded nor known): 0" in text.out
    want_ignored = 47 + 10 + 2 + 2 + 8 + 6 + 4 + (2 if name == "DCS_8cls_affectnet" else 0)
    assert f"keys ignored as known-unused: {want_ignored}" in text.out
    meta = checkpoint.read_metadata(out)
    assert meta["class_names"] == list(zoo.DATASET_CLASSES[data])
    variables, cfg = checkpoint.load_variables(out)
    assert cfg["name"] == model and cfg["num_classes"] == len(meta["class_names"])
    params = variables["params"]
    # Values land where the model reads them (spot checks of each transform).
    if model == "qcs":
      for level in (1, 2, 3):
        np.testing.assert_array_equal(params[f"cross_attention_{level}"]["theta"],
                                      sd[f"cross_attention_{level}.theta"].numpy())
        assert params[f"cross_attention_{level}"]["theta"].shape == ()
    np.testing.assert_array_equal(params["VIT_base"]["head"]["kernel"],
                                  sd["VIT_base.head.linear.weight"].numpy().T)
    np.testing.assert_array_equal(params["embed_q_1"]["kernel"],
                                  sd["embed_q.1.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(variables["batch_stats"]["ir_back"]["body3_13"]["res_bn2"]
                                  ["var"], sd["ir_back.body3.13.res_layer.4.running_var"])
    n_loaded = sum(np.size(v) for v in converter.flatten_tree(variables).values())
    assert n_loaded == meta["num_values"]
  finally:
    shutil.rmtree(out, ignore_errors=True)
    pth.unlink()


@pytest.mark.parametrize("name", ["QCS_8cls_ferplus", "DCS_8cls_affectnet"])
def test_reference_has_the_released_keys_and_shapes(name):
  model, data = FILES[name]
  cfg = dict(R.FULL_CFG, name=model, csa="s" if model == "dcs" else "sd",
             num_classes=len(zoo.DATASET_CLASSES[data]))
  got = {k: [list(v.shape), str(v.dtype).replace("torch.", "")]
         for k, v in R.QCSReference(cfg).state_dict().items()}
  want = {k: v for k, v in FIXTURE[name].items() if not k.startswith(NOT_IN_REFERENCE)}
  assert sorted(set(want) - set(got)) == [] and sorted(set(got) - set(want)) == []
  assert {k: got[k] for k in want} == want


def test_converted_file_predicts_with_class_names(tmp_path, capsys):
  """A tiny QCS checkpoint saved as the authors do, converted with --dataset,
  predicts with RAF-DB's class names (not class_N)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from qcs_jax.cli import predict  # pylint: disable=import-outside-toplevel
  cfg = R.make_cfg()
  pth = tmp_path / "qcs.pth"
  RF.save_full_checkpoint(pth, R.build_reference(cfg, seed=1))
  args = ["--full", "--input", str(pth), "--output", str(tmp_path / "m")] + [
      f"--{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
      for k, v in cfg.items() if k in ("img_size", "embed_dim", "num_heads",
                                        "stage_channels", "stage_units")]
  assert cli.main(args) == 0  # no data set given: converts, and says how to add names
  assert "class names: none stored" in capsys.readouterr().out
  assert checkpoint.read_metadata(tmp_path / "m")["class_names"] is None
  assert cli.main(args + ["--force", "--dataset", "rafdb"]) == 0
  assert "class names (--dataset rafdb): Surprise, Fear" in capsys.readouterr().out
  Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "face.png")
  assert predict.main(["--checkpoint", str(tmp_path / "m"), "--no-detect", "--format",
                       "csv", str(tmp_path / "face.png")]) == 0
  out = capsys.readouterr().out
  header, row = out.strip().splitlines()[:2]
  assert "p_Surprise" in header and "p_Neutral" in header and "class_" not in out
  assert row.split(",")[header.split(",").index("label")] in zoo.DATASET_CLASSES["rafdb"]


def test_class_names_must_match_the_class_count(tmp_path, capsys):
  cfg = R.make_cfg()
  pth = tmp_path / "qcs.pth"
  RF.save_full_checkpoint(pth, R.build_reference(cfg, seed=1))
  rc = cli.main(["--full", "--input", str(pth), "--output", str(tmp_path / "m"),
                 "--img_size=64", "--embed_dim=32", "--num_heads=4",
                 "--stage_channels=8,16,32", "--stage_units=2,1,2", "--dataset", "ferplus"])
  assert rc == 2 and not (tmp_path / "m").exists()
  assert "gives 8 class names" in capsys.readouterr().err
