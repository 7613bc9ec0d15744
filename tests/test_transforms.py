"""Semantics of qcs_jax.data.transforms (torchvision's PIL path, re-implemented)."""
import math

import numpy as np
import pytest
from PIL import Image

from qcs_jax.data import transforms as T


def _img(h=100, w=100, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _only(**kw):
  """An augment dict with everything off except kw."""
  base = dict(resize=0, rotate=0.0, crop=False, hflip=False, jitter=(), erase_scale=(),
              erase_p=0.5)
  base.update(kw)
  return base


# ------------------------------------------------------------ determinism --


@pytest.mark.parametrize("name", ["rafdb", "ferplus", "affectnet", "synthetic"])
def test_recipe_transform_shape_dtype_and_determinism(name):
  img = _img()
  t = T.build_transform(T.recipe_augment(name), 224, train=True)
  a = t(img, np.random.default_rng(7))
  b = t(img, np.random.default_rng(7))
  assert a.shape == (224, 224, 3) and a.dtype == np.float32 and a.flags.c_contiguous
  np.testing.assert_array_equal(a, b)
  others = [t(img, np.random.default_rng(s)) for s in range(8, 12)]
  assert any(not np.array_equal(a, o) for o in others)
  e = T.build_transform(T.recipe_augment(name), 224, train=False)
  x = e(img)
  assert x.shape == (224, 224, 3) and x.dtype == np.float32
  np.testing.assert_array_equal(x, e(img, np.random.default_rng(3)))  # eval ignores rng


def test_transform_writes_into_out_buffer():
  img = _img()
  t = T.build_transform(T.recipe_augment("rafdb"), 64, train=True)
  out = np.full((64, 64, 3), np.nan, np.float32)
  r = t(img, np.random.default_rng(1), out=out)
  assert r is out
  np.testing.assert_array_equal(out, t(img, np.random.default_rng(1)))


def test_train_transform_needs_rng():
  t = T.build_transform(T.recipe_augment("rafdb"), 32, train=True)
  with pytest.raises(ValueError, match="Generator"):
    t(_img())


# ----------------------------------------------------------------- resize --


def test_resized_shape_follows_torchvision():
  assert T.resized_shape(100, 150, 224) == (224, 336)  # shorter side (h) -> 224
  assert T.resized_shape(150, 100, 224) == (336, 224)
  assert T.resized_shape(90, 200, 45) == (45, 100)
  assert T.resized_shape(101, 150, 50) == (50, 74)  # int() truncates the long side
  assert T.resized_shape(100, 150, (30, 40)) == (30, 40)


def test_resize_is_pil_bilinear_and_close_to_torch_antialias():
  torch = pytest.importorskip("torch")
  img = _img(100, 100)
  got = np.asarray(T.resize(Image.fromarray(img), (224, 224)))
  want = np.asarray(Image.fromarray(img).resize((224, 224), Image.BILINEAR))
  np.testing.assert_array_equal(got, want)
  # An independent implementation of antialiased bilinear (PyTorch's) agrees to 1 level.
  x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
  y = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True,
                                      align_corners=False)[0].permute(1, 2, 0).numpy()
  assert np.abs(np.clip(np.round(y), 0, 255) - got).max() <= 1
  # Downsampling (antialiased) as well.
  big = _img(300, 260)
  got = np.asarray(T.resize(Image.fromarray(big), 100)).astype(np.float64)
  assert got.shape == (115, 100, 3)  # shorter side 260 -> 100, 300 -> int(115.38)
  x = torch.from_numpy(big).permute(2, 0, 1)[None].float()
  y = torch.nn.functional.interpolate(x, size=(115, 100), mode="bilinear", antialias=True,
                                      align_corners=False)[0].permute(1, 2, 0).numpy()
  assert np.abs(np.clip(np.round(y), 0, 255) - got).max() <= 1


def test_eval_transform_is_resize_then_normalize():
  img = _img(100, 100)
  e = T.build_transform(T.recipe_augment("rafdb"), 224, train=False)
  resized = np.asarray(Image.fromarray(img).resize((224, 224), Image.BILINEAR))
  np.testing.assert_array_equal(e(img), T.normalize(resized))


# ------------------------------------------------------------------- crops --


def test_center_crop_offsets_use_python_round():
  assert T.center_crop_offsets(232, 232, 224, 224) == (4, 4)
  assert T.center_crop_offsets(233, 230, 224, 224) == (4, 3)  # round(4.5) == 4 (half to even)
  assert T.center_crop_offsets(235, 224, 224, 224) == (6, 0)  # round(5.5) == 6


def test_center_crop_window_and_padding():
  img = (np.arange(10 * 12 * 3) % 251).astype(np.uint8).reshape(10, 12, 3)
  got = np.asarray(T.center_crop(Image.fromarray(img), (6, 7)))
  top, left = int(round(4 / 2.0)), int(round(5 / 2.0))
  np.testing.assert_array_equal(got, img[top:top + 6, left:left + 7])
  small = np.full((3, 3, 3), 200, np.uint8)
  got = np.asarray(T.center_crop(Image.fromarray(small), 6))  # pads 1 left/top, 2 right/bottom
  assert got.shape == (6, 6, 3)
  mask = np.zeros((6, 6), bool)
  mask[1:4, 1:4] = True
  assert (got[mask] == 200).all() and (got[~mask] == 0).all()


def test_eval_crop_is_resize_then_centre_crop():
  img = _img(48, 48)
  aug = _only(resize=40, crop=True)
  e = T.build_transform(aug, 32, train=False)
  resized = np.asarray(Image.fromarray(img).resize((40, 40), Image.BILINEAR))
  np.testing.assert_array_equal(e(img), T.normalize(resized[4:36, 4:36]))


def test_random_crop_is_a_window_of_the_resized_image():
  img = _img(48, 48)
  t = T.build_transform(_only(resize=40, crop=True), 32, train=True)
  resized = T.normalize(np.asarray(Image.fromarray(img).resize((40, 40), Image.BILINEAR)))
  seen = set()
  for seed in range(12):
    out = t(img, np.random.default_rng(seed))
    hits = [(i, j) for i in range(9) for j in range(9)
            if np.array_equal(out, resized[i:i + 32, j:j + 32])]
    assert len(hits) == 1
    seen.add(hits[0])
  assert len(seen) > 3  # the offsets vary


def test_random_crop_offsets_bounds():
  rng = np.random.default_rng(0)
  offs = np.array([T.random_crop_offsets(rng, 10, 12, 8, 8) for _ in range(300)])
  assert offs[:, 0].min() == 0 and offs[:, 0].max() == 2
  assert offs[:, 1].min() == 0 and offs[:, 1].max() == 4
  assert T.random_crop_offsets(rng, 8, 8, 8, 8) == (0, 0)
  with pytest.raises(ValueError, match="larger"):
    T.random_crop_offsets(rng, 7, 8, 8, 8)


# --------------------------------------------------------- flip, rotation --


def test_hflip_exact_and_about_half_the_time():
  img = _img(32, 32)
  np.testing.assert_array_equal(np.asarray(T.hflip(Image.fromarray(img))), img[:, ::-1])
  t = T.build_transform(_only(hflip=True), 32, train=True)
  plain, flipped = T.normalize(img), T.normalize(img[:, ::-1])
  n_flip = 0
  for seed in range(200):
    out = t(img, np.random.default_rng(seed))
    is_plain, is_flip = np.array_equal(out, plain), np.array_equal(out, flipped)
    assert is_plain != is_flip
    n_flip += is_flip
  assert 70 < n_flip < 130


def test_rotate_direction_and_fill():
  img = _img(20, 20)
  np.testing.assert_array_equal(np.asarray(T.rotate(Image.fromarray(img), 90.0)),
                                np.rot90(img))  # counter-clockwise, like torchvision
  white = np.full((41, 41, 3), 255, np.uint8)
  out = np.asarray(T.rotate(Image.fromarray(white), 30.0))
  assert out.shape == white.shape  # no expansion
  assert (out[0, 0] == 0).all() and (out[-1, -1] == 0).all()  # corners filled with 0
  assert (out[20, 20] == 255).all()


def test_random_rotation_stays_within_degrees():
  img = np.zeros((41, 41, 3), np.uint8)
  img[20, 30] = 255  # a dot 10 px right of the centre
  t = T.build_transform(_only(resize=0, rotate=10.0), 41, train=True)
  angles = []
  for seed in range(40):
    out = t(img, np.random.default_rng(seed))
    ys, xs = np.nonzero(out[..., 0] > 0)
    assert len(ys) >= 1
    angles.append(math.degrees(math.atan2(-(ys.mean() - 20), xs.mean() - 20)))
  angles = np.array(angles)
  assert np.abs(angles).max() <= 10 + 6  # nearest-pixel quantisation at radius 10
  assert angles.min() < -3 and angles.max() > 3


# ------------------------------------------------------------------ colour --


def test_enhance_factor_one_is_identity_and_degenerate_images():
  img = _img(30, 40)
  im = Image.fromarray(img)
  for op in (T.adjust_brightness, T.adjust_contrast, T.adjust_saturation):
    np.testing.assert_array_equal(np.asarray(op(im, 1.0)), img)
  assert (np.asarray(T.adjust_brightness(im, 0.0)) == 0).all()
  gray = np.asarray(im.convert("L"))
  # contrast 0: a uniform image at the (rounded) mean of the grayscale image
  np.testing.assert_array_equal(np.asarray(T.adjust_contrast(im, 0.0)),
                                np.full_like(img, int(gray.mean() + 0.5)))
  # saturation 0: the grayscale image in every channel
  np.testing.assert_array_equal(np.asarray(T.adjust_saturation(im, 0.0)),
                                np.repeat(gray[:, :, None], 3, axis=2))
  brighter = np.asarray(T.adjust_brightness(im, 1.5)).astype(int)
  np.testing.assert_allclose(brighter, np.clip(np.round(img * 1.5), 0, 255), atol=1)


def test_hue_shift_semantics():
  red = np.zeros((4, 4, 3), np.uint8)
  red[..., 0] = 255
  green = np.asarray(T.adjust_hue(Image.fromarray(red), 1 / 3))
  np.testing.assert_array_equal(green, np.broadcast_to([0, 255, 0], red.shape))
  blue = np.asarray(T.adjust_hue(Image.fromarray(red), -1 / 3))  # wraps around below 0
  assert (blue.argmax(-1) == 2).all() and (blue[..., 2] == 255).all()
  img = _img(16, 16)
  roundtrip = np.asarray(Image.fromarray(img).convert("HSV").convert("RGB"))
  np.testing.assert_array_equal(np.asarray(T.adjust_hue(Image.fromarray(img), 0.0)), roundtrip)
  with pytest.raises(ValueError, match="hue"):
    T.adjust_hue(Image.fromarray(img), 0.6)


def test_color_jitter_zero_is_identity_and_ranges():
  img = _img(24, 24)
  cj = T.ColorJitter.from_values(0, 0, 0, 0)
  assert not cj.active
  np.testing.assert_array_equal(np.asarray(cj(Image.fromarray(img), np.random.default_rng(0))),
                                img)
  t = T.build_transform(_only(jitter=(0.0, 0.0, 0.0, 0.0)), 24, train=True)
  np.testing.assert_array_equal(t(img, np.random.default_rng(0)), T.normalize(img))
  # hue 0 is skipped (no lossy HSV round trip) while the other factors run
  cj = T.ColorJitter.from_values(0.9, 0.2, 0.2, 0.0)
  assert cj.hue is None and cj.brightness == (pytest.approx(0.1), pytest.approx(1.9))
  cj = T.ColorJitter.from_values(2.0, 0.2, 0.3, 0.1)
  assert cj.brightness == (0.0, 3.0)  # clipped at 0 as torchvision does
  rng = np.random.default_rng(0)
  orders = set()
  for _ in range(200):
    order, (b, c, s, h) = cj.params(rng)
    assert sorted(order) == [0, 1, 2, 3]
    orders.add(tuple(order))
    assert 0.0 <= b <= 3.0 and 0.8 <= c <= 1.2 and 0.7 <= s <= 1.3 and -0.1 <= h <= 0.1
  assert len(orders) > 12  # random permutations
  with pytest.raises(ValueError, match="hue"):
    T.ColorJitter.from_values(0, 0, 0, 0.7)


# -------------------------------------------------------------- normalise --


def test_normalize_matches_torchvision_arithmetic():
  torch = pytest.importorskip("torch")
  img = _img(17, 23)
  x = T.normalize(img)
  assert x.dtype == np.float32 and x.shape == (17, 23, 3)
  t = torch.from_numpy(img).permute(2, 0, 1).float().div(255)
  t = (t - torch.tensor(T.IMAGENET_MEAN)[:, None, None]) / torch.tensor(T.IMAGENET_STD)[:, None,
                                                                                           None]
  np.testing.assert_array_equal(x, t.permute(1, 2, 0).numpy())
  np.testing.assert_allclose(T.IMAGENET_MEAN, [0.485, 0.456, 0.406])
  np.testing.assert_allclose(T.IMAGENET_STD, [0.229, 0.224, 0.225])
  # An image at the mean maps to ~0; 0 and 255 map to -mean/std and (1-mean)/std.
  ext = np.zeros((2, 1, 3), np.uint8)
  ext[1] = 255
  y = T.normalize(ext)
  np.testing.assert_allclose(y[0, 0], -T.IMAGENET_MEAN / T.IMAGENET_STD, rtol=1e-6)
  np.testing.assert_allclose(y[1, 0], (1 - T.IMAGENET_MEAN) / T.IMAGENET_STD, rtol=1e-6)
  gray = T.normalize(img[..., 0])
  np.testing.assert_array_equal(gray, T.normalize(np.repeat(img[..., :1], 3, axis=2)))
  with pytest.raises(ValueError, match="uint8"):
    T.normalize(img.astype(np.float32))


# ---------------------------------------------------------------- erasing --


def _erased_box(x):
  ys, xs = np.nonzero((x == 0).all(-1))
  return ys.min(), xs.min(), ys.max() - ys.min() + 1, xs.max() - xs.min() + 1, len(ys)


def test_random_erasing_region_area_and_ratio():
  h = w = 64
  scale = (0.02, 0.1)
  rng = np.random.default_rng(0)
  for _ in range(100):
    x = np.ones((h, w, 3), np.float32)
    T.random_erase(x, rng, p=1.0, scale=scale)
    top, left, eh, ew, n = _erased_box(x)
    assert n == eh * ew  # a solid rectangle of zeros, all channels
    assert (x != 0).sum() == (h * w - n) * 3
    # h = round(sqrt(A r)), w = round(sqrt(A / r)) so A lies in [(h-.5)(w-.5), (h+.5)(w+.5)]
    assert (eh - 0.5) * (ew - 0.5) <= scale[1] * h * w
    assert (eh + 0.5) * (ew + 0.5) >= scale[0] * h * w
    assert (eh - 0.5) / (ew + 0.5) <= 3.3 and (eh + 0.5) / (ew - 0.5) >= 0.3


def test_random_erasing_probability_and_attempts():
  rng = np.random.default_rng(1)
  erased = 0
  for _ in range(200):
    x = np.ones((32, 32, 3), np.float32)
    T.random_erase(x, rng, p=0.5, scale=(0.02, 0.1))
    erased += (x == 0).any()
  assert 70 < erased < 130
  x = np.ones((32, 32, 3), np.float32)
  T.random_erase(x, rng, p=0.0, scale=(0.02, 0.1))
  assert (x == 1).all()
  # a box that can never fit (scale 1, ratio > 1): 10 failed attempts leave the image as is
  assert T.erase_params(rng, 8, 8, scale=(1.0, 1.0), ratio=(2.0, 3.0)) is None


def test_erasing_comes_after_normalisation():
  img = _img(32, 32)
  t = T.build_transform(_only(erase_scale=(0.05, 0.1), erase_p=1.0), 32, train=True)
  out = t(img, np.random.default_rng(3))
  ref = T.normalize(img)
  zero = (out == 0).all(-1)
  assert zero.sum() > 0.04 * 32 * 32
  np.testing.assert_array_equal(out[~zero], ref[~zero])


# ----------------------------------------------------------------- config --


def test_recipes_match_the_design_table():
  r = T.recipe_augment("rafdb")
  assert (r["resize"], r["rotate"], r["crop"], r["hflip"]) == (0, 0.0, False, True)
  assert r["jitter"] == (0.2, 0.2, 0.2, 0.1) and r["erase_scale"] == (0.02, 0.1)
  f = T.recipe_augment("ferplus")
  assert (f["resize"], f["rotate"], f["crop"], f["erase_scale"]) == (232, 10.0, True, (0.02, 0.1))
  a = T.recipe_augment("affectnet8")
  assert (a["resize"], a["rotate"], a["crop"], a["erase_scale"]) == (236, 12.0, True, (0.03, 0.1))
  assert T.recipe_augment("ferplus", img_size=112)["resize"] == 116
  s = T.recipe_augment("synthetic")
  assert s["hflip"] and s["jitter"] and s["erase_scale"] and not s["crop"]
  with pytest.raises(ValueError, match="recipe"):
    T.recipe_augment("mnist")


def test_config_validation():
  with pytest.raises(ValueError, match="unknown augment"):
    T.build_transform({"flip": True}, 32, train=True)
  with pytest.raises(ValueError, match="crop"):
    T.build_transform(_only(resize=40), 32, train=False)
  with pytest.raises(ValueError, match="smaller than the 32 crop"):
    T.build_transform(_only(resize=30, crop=True), 32, train=True)
  with pytest.raises(ValueError, match="jitter"):
    T.build_transform(_only(jitter=(0.1, 0.1)), 32, train=True)
  ml_collections = pytest.importorskip("ml_collections")
  cfg = ml_collections.ConfigDict(T.recipe_augment("ferplus", img_size=32))
  t = T.build_transform(cfg, 32, train=True)
  assert t(_img(48, 48), np.random.default_rng(0)).shape == (32, 32, 3)
  assert T.build_transform(None, 16, train=False)(_img()).shape == (16, 16, 3)


def test_keep_aspect_resizes_shorter_side_then_crops():
  img = _img(60, 90)
  e = T.build_transform(_only(resize=40, keep_aspect=True, crop=True), 32, train=False)
  resized = np.asarray(Image.fromarray(img).resize((60, 40), Image.BILINEAR))
  np.testing.assert_array_equal(e(img), T.normalize(resized[4:36, 14:46]))
