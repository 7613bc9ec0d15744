"""The embedded synthetic data set: determinism, format, balance, noise, confounds, helpers."""
import colorsys

import numpy as np
import pytest
from PIL import Image

from qcs_jax.data.sources import DataError, InMemorySource
from qcs_jax.data.synthetic import (CLASS_NAMES, confound_code, make_synthetic_split,
                                    parse_confound, render_face, sample_factors,
                                    save_sample_grid)
from qcs_jax.data.synthetic import main as synthetic_main


def cfg(**kw):
  base = dict(num_train=210, num_test=140, image_size=40, seed=3, confound=[], label_noise=0.0)
  base.update(kw)
  return base


@pytest.fixture(scope="module")
def confounded():
  c = cfg(num_train=700, num_test=700, confound=["background", "glasses"], label_noise=0.1)
  return make_synthetic_split(c, "train"), make_synthetic_split(c, "test")


def test_deterministic_from_seed():
  a = make_synthetic_split(cfg(), "train")
  b = make_synthetic_split(cfg(), "train")
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.labels, b.labels)
  other_seed = make_synthetic_split(cfg(seed=4), "train")
  assert not np.array_equal(other_seed.images, a.images)
  test = make_synthetic_split(cfg(num_test=210), "test")
  assert not np.array_equal(test.images, a.images)


def test_format_and_balance():
  src = make_synthetic_split(cfg(), "train")
  assert isinstance(src, InMemorySource)
  assert src.images.dtype == np.uint8 and src.images.shape == (210, 40, 40, 3)
  assert src.labels.dtype == np.int32 and src.labels.min() >= 0 and src.labels.max() <= 6
  assert src.class_names == ("Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger",
                             "Neutral") == CLASS_NAMES
  np.testing.assert_array_equal(src.class_counts(), np.full(7, 30))
  item = src[5]
  assert item["image"].shape == (40, 40, 3)
  assert item["label"] == src.labels[5] and item["index"] == 5
  assert len(make_synthetic_split(cfg(), "test")) == 140
  # images are not flat: faces and backgrounds use the whole range
  assert src.images.std() > 30 and len(np.unique(src.images[0].reshape(-1, 3), axis=0)) > 200


def test_label_noise_only_in_train(confounded):
  train, test = confounded
  flipped = train.labels != train.factors["label"]
  assert flipped.sum() == 70  # exactly round(0.1 * 700), always to a different class
  assert (test.labels == test.factors["label"]).all()
  counts = np.bincount(train.factors["label"], minlength=7)
  assert counts.max() - counts.min() <= 1


def test_confound_in_train_only(confounded):
  train, test = confounded
  for src, lo, hi in ((train, 0.7, 1.0), (test, 0.0, 0.3)):
    y = src.factors["label"]
    agree = np.mean(confound_code(src.factors["background_u"]) == y)
    assert lo < agree < hi, (src.name, agree)
    # glasses are worn by odd classes when confounded: P(glasses | odd) - P(glasses | even)
    g = src.factors["glasses"]
    gap = g[y % 2 == 1].mean() - g[y % 2 == 0].mean()
    assert (gap > 0.5) if src is train else (abs(gap) < 0.15), (src.name, gap)
  # non-confounded factors stay independent of the class in train too
  assert np.mean(confound_code(train.factors["skin_u"]) == train.factors["label"]) < 0.3


def corner_hue(img):
  """Hue of the mean colour of the top-left 3x3 corner (background; noise averages out)."""
  r, g, b = img[:3, :3].reshape(-1, 3).mean(0) / 255.0
  return colorsys.rgb_to_hsv(r, g, b)[0]


def test_confounded_background_visible_in_pixels(confounded):
  train, test = confounded
  for src, lo, hi in ((train, 0.6, 1.0), (test, 0.0, 0.3)):
    hue = np.array([corner_hue(im) for im in src.images])
    agree = np.mean(confound_code(hue) == src.factors["label"])
    assert lo < agree < hi, (src.name, agree)


def test_classes_differ_in_the_expression():
  """With the nuisances fixed, the seven class prototypes draw seven different faces."""
  fixed = dict(angle=0.0, cx=0.5, cy=0.48, radius=0.32, glasses=False, noise_sd=0.0,
               background_u=0.5, bg_kind=0, hair_u=0.05, skin_u=0.2)
  faces = np.stack([render_face(c, 64, jitter=False, **fixed) for c in range(7)]).astype(float)
  dist = np.abs(faces[:, None] - faces[None]).mean(axis=(2, 3, 4))
  assert dist[~np.eye(7, dtype=bool)].min() > 0.5, dist
  # Surprise opens the mouth: dark mouth-interior pixels in the lower face, Neutral has none
  dark_mouth = lambda im: (im[40:56, 20:44].sum(-1) < 200).sum()
  assert dark_mouth(faces[0]) > dark_mouth(faces[6]) + 10
  # the jittered draws of one class vary
  one, two = render_face(0, 64, seed=1, **fixed), render_face(0, 64, seed=2, **fixed)
  assert not np.array_equal(one, two)


def test_render_face_helper():
  a = render_face("Happiness", 48, seed=1)
  assert a.shape == (48, 48, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, render_face(3, 48, seed=1))
  assert not np.array_equal(a, render_face("sadness", 48, seed=1))
  with_glasses = render_face(3, 48, seed=1, glasses=True)
  without = render_face(3, 48, seed=1, glasses=False)
  assert not np.array_equal(with_glasses, without)
  with pytest.raises(DataError, match="unknown expression"):
    render_face("Contempt")
  with pytest.raises(DataError, match="unknown parameter"):
    render_face(0, wings=True)


def test_bad_config_errors():
  with pytest.raises(DataError, match="unknown confound 'hat'"):
    make_synthetic_split(cfg(confound=["hat"]), "train")
  with pytest.raises(DataError, match="split"):
    make_synthetic_split(cfg(), "val")
  with pytest.raises(DataError, match="num_train"):
    make_synthetic_split({"image_size": 32, "seed": 0}, "train")
  with pytest.raises(DataError, match="label_noise"):
    make_synthetic_split(cfg(label_noise=1.5), "train")
  with pytest.raises(DataError, match="image_size"):
    make_synthetic_split(cfg(image_size=8), "train")


def test_config_dict_and_string_confound():
  ml_collections = pytest.importorskip("ml_collections")
  c = ml_collections.ConfigDict(cfg(num_train=70, confound="background, glasses"))
  src = make_synthetic_split(c, "train")
  assert len(src) == 70
  assert np.mean(confound_code(src.factors["background_u"]) == src.factors["label"]) > 0.6


def test_sample_grid(tmp_path):
  src = make_synthetic_split(cfg(), "train")
  path = tmp_path / "grid.png"
  save_sample_grid(src, str(path), per_class=4)
  with Image.open(path) as im:
    assert im.size == (90 + 4 * 42, 7 * 42)
    grid = np.asarray(im.convert("RGB"))
  first = np.flatnonzero(src.labels == 0)[0]
  np.testing.assert_array_equal(grid[:40, 90:130], src.images[first])


# --- confound strength (issue 16) ---------------------------------------------------

def _agree(src, factor="background"):
  return np.mean(confound_code(src.factors[factor + "_u"]) == src.factors["label"])


def test_strength_zero_is_the_independent_data_set():
  plain = make_synthetic_split(cfg(label_noise=0.1), "train")
  zero = make_synthetic_split(cfg(label_noise=0.1, confound="background:0"), "train")
  np.testing.assert_array_equal(plain.images, zero.images)
  np.testing.assert_array_equal(plain.labels, zero.labels)
  assert zero.confound == {}


@pytest.mark.parametrize("p", [0.5, 0.95, 1.0])
def test_strength_sets_the_agreement(p):
  """P(nuisance bin == class) = p + (1 - p) / 7 in train; 1/7 in test."""
  labels = np.arange(7000) % 7
  f = sample_factors(labels, np.random.default_rng(0), {"background": p},
                     confound_rng=np.random.default_rng(1))
  agree = np.mean(confound_code(f["background_u"]) == labels)
  assert abs(agree - (p + (1 - p) / 7)) < 0.02, agree
  if p == 1.0:
    assert agree == 1.0
  assert abs(np.mean(confound_code(f["skin_u"]) == labels) - 1 / 7) < 0.02


def test_strengths_are_per_nuisance_and_coupled_across_p():
  labels = np.arange(3500) % 7

  def draw(conf):
    return sample_factors(labels, np.random.default_rng(4), conf,
                          confound_rng=np.random.default_rng(5))

  free, half, most = draw({}), draw("background:0.5,glasses:0.2"), draw(["background:0.8"])
  moved = {k: f["background_u"] != free["background_u"] for k, f in (("half", half),
                                                                     ("most", most))}
  assert 0.45 < moved["half"].mean() < 0.55 and 0.75 < moved["most"].mean() < 0.85
  assert not (moved["half"] & ~moved["most"]).any()  # the p=0.5 faces are among the p=0.8 ones
  for key in ("mouth_c", "brow_h", "skin_u", "hair_u", "bg_kind", "cx"):
    np.testing.assert_array_equal(free[key], half[key])
    np.testing.assert_array_equal(free[key], most[key])
  g = half["glasses"]
  gap = g[labels % 2 == 1].mean() - g[labels % 2 == 0].mean()
  assert 0.1 < gap < 0.35, gap  # glasses at p=0.2: a weak confound
  np.testing.assert_array_equal(free["glasses"], most["glasses"])


def test_split_records_its_confound_and_test_stays_free():
  c = cfg(num_train=350, num_test=350, confound=("background:0.95", "glasses"),
          confound_strength=0.6)
  train, test = make_synthetic_split(c, "train"), make_synthetic_split(c, "test")
  assert train.confound == {"background": 0.95, "glasses": 0.6} and test.confound == {}
  assert _agree(train) > 0.85 and _agree(test) < 0.3


def test_parse_confound_errors():
  assert parse_confound("background:0.5, noise", 0.9) == {"background": 0.5, "noise": 0.9}
  assert parse_confound({"lighting": 1}) == {"lighting": 1.0}
  assert parse_confound(None) == {} and parse_confound(["skin:0"]) == {}
  for bad, msg in (("hat", "unknown confound 'hat'"), ("skin,skin:0.2", "listed twice"),
                   ("skin:1.5", "must be in \\[0, 1\\], got 1.5"), ("skin:x", "a number")):
    with pytest.raises(DataError, match=msg):
      parse_confound(bad)
  with pytest.raises(DataError, match="confound_strength"):
    make_synthetic_split(cfg(confound="skin", confound_strength=2.0), "train")


def test_cli_bad_confound_says_error(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    synthetic_main(["--num", "7", "--image_size", "32", "--confound", "skin:7",
                    "--out", str(tmp_path / "g.png")])
  assert e.value.code == 2
  assert "error: data.synthetic: confound strength of 'skin' must be in [0, 1]" in \
      capsys.readouterr().err
