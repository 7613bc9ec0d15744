"""Device augmentation (qcs_jax.data.device_augment / device_ops) against the host ops.

Tolerances, in uint8 levels before normalisation: brightness, contrast,
saturation, hue, crop, flip: exact (0 levels); normalisation: exact float32;
erasing: exact; rotation: exact at angle 0, otherwise <= 0.1% of pixels may
take a neighbouring source pixel (source coordinate within ~1e-5 px of a pixel
edge: PIL's fixed-point matrix comes from double cos/sin, ours from float32).
The colour ops are compiled with XLA's full optimisation (the train step's
setting; the suite's default level 0 does not fuse multiply-adds into FMAs).
Set QCS_EXHAUSTIVE=1 to check the HSV round trip on all 2**24 colours.
"""
from __future__ import annotations

import itertools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import stats

from qcs_jax.data import device_augment as da
from qcs_jax.data import device_ops as ops
from qcs_jax.data import transforms as T

OPTIMISED = {"xla_backend_optimization_level": 3}
N_DRAWS = 20_000
P_MIN = 1e-4          # a law is rejected below this p-value (fixed seeds: deterministic)


def _jit(f, **kw):
  return jax.jit(f, compiler_options=OPTIMISED, **kw)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
  """Real-looking: colour gradients, a dark and a saturated patch, Gaussian noise."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w].astype(np.float64)
  base = np.stack([255 * x / w, 255 * y / h, 60 + 127 * (x + y) / (h + w)], -1)
  base[: h // 4, : w // 4] *= 0.15
  base[-h // 4:, -w // 4:] = (250, 20, 40)
  return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


# ------------------------------------------------------- ops == PIL ops --

_FACTORS = {"brightness": (0.0, 0.8, 0.93, 1.0, 1.13, 1.2),
            "contrast": (0.8, 0.93, 1.07, 1.2, 1.9),
            "saturation": (0.0, 0.8, 0.9, 1.1, 1.2),
            "hue": (-0.5, -0.1, -0.0313, 0.0, 0.05, 0.1, 0.5)}
_HOST = {"brightness": T.adjust_brightness, "contrast": T.adjust_contrast,
         "saturation": T.adjust_saturation, "hue": T.adjust_hue}
_DEVICE = dict(zip(_HOST, ops.JITTER_OPS))


@pytest.mark.parametrize("hw", [(224, 224), (37, 50)])
def test_colour_ops_equal_pil_exactly(hw):
  img = _image(*hw)
  pil = Image.fromarray(img)

  def all_ops(x):
    return {name: jax.vmap(lambda f: _DEVICE[name](x, f))(jnp.asarray(fs, jnp.float32))
            for name, fs in _FACTORS.items()}

  got = _jit(all_ops)(jnp.asarray(img, jnp.int32))
  for name, fs in _FACTORS.items():
    for i, f in enumerate(fs):
      f = float(np.float32(f))           # the host gets the device's float32 factor
      ref = np.asarray(_HOST[name](pil, f))
      np.testing.assert_array_equal(np.asarray(got[name][i]), ref, err_msg=f"{name} {f}")


def test_jitter_applies_each_of_the_24_orders_as_the_host():
  img = _image(16, 20, 4)
  factors = np.array([1.15, 0.85, 1.3, 0.07], np.float32)
  orders = np.array(list(itertools.permutations(range(4))), np.int32)
  aug = T.Augment(jitter=(0.2, 0.2, 0.4, 0.1))
  got = jax.jit(jax.vmap(lambda o: da.jitter_uint8(jnp.asarray(img, jnp.int32), jnp.asarray(factors),
                                                 o, aug)))(jnp.asarray(orders))
  for o, g in zip(orders, np.asarray(got)):
    ref = Image.fromarray(img)
    for k in o:
      ref = list(_HOST.values())[k](ref, float(factors[k]))
    np.testing.assert_array_equal(g, np.asarray(ref), err_msg=str(o))


def _colours(n: int, seed: int) -> np.ndarray:
  if os.environ.get("QCS_EXHAUSTIVE") == "1":
    c = np.arange(1 << 24, dtype=np.uint32)
  else:
    c = np.random.default_rng(seed).integers(0, 1 << 24, n, dtype=np.uint32)
  return np.stack([(c >> 16) & 255, (c >> 8) & 255, c & 255], -1).astype(np.uint8)


def test_hsv_round_trip_equals_pil():
  """rgb2hsv and hsv2rgb on 2**20 random triples (QCS_EXHAUSTIVE=1: all 2**24) + greys."""
  c = np.concatenate([_colours(1 << 20, 0), np.repeat(np.arange(256, dtype=np.uint8), 3)
                      .reshape(256, 3)]).reshape(1, -1, 3)
  hsv = np.asarray(Image.fromarray(c, "RGB").convert("HSV"))
  rgb = np.asarray(Image.merge("HSV", [Image.fromarray(c[..., k], "L") for k in range(3)])
                   .convert("RGB"))
  got_hsv, got_rgb = _jit(lambda x: (ops.rgb_to_hsv(x), ops.hsv_to_rgb(x)))(
      jnp.asarray(c, jnp.int32))
  np.testing.assert_array_equal(np.asarray(got_hsv), hsv)
  np.testing.assert_array_equal(np.asarray(got_rgb), rgb)


def test_hue_shift_levels_match_double_arithmetic():
  rng = np.random.default_rng(1)
  f = rng.uniform(-0.5, 0.5, 100_000).astype(np.float32)
  near = (np.arange(-127, 128) / 255.0).astype(np.float32)   # every float32 within 8 ulps of k/255
  lo, hi, parts = near, near, [f, near]
  for _ in range(8):
    lo, hi = np.nextafter(lo, np.float32(-1)), np.nextafter(hi, np.float32(1))
    parts += [lo, hi]
  f = np.clip(np.concatenate(parts), -0.5, 0.5).astype(np.float32)
  ref = np.array([int(float(v) * 255) % 256 for v in f])
  np.testing.assert_array_equal(np.asarray(_jit(ops.hue_shift_levels)(jnp.asarray(f))), ref)


@pytest.mark.parametrize("hw", [(224, 224), (37, 50)])
def test_rotation_crop_flip_equal_pil(hw):
  h, w = hw
  img = _image(h, w, 2)
  pil = Image.fromarray(img)
  angles = np.array([0.0, 0.001, 3.3, -7.77, 10.0, -12.0, 5.123456], np.float32)
  rot = _jit(jax.vmap(lambda a: ops.rotate_crop_flip(jnp.asarray(img, jnp.int32), a, 0, 0,
                                                     False, h, w)))(jnp.asarray(angles))
  for a, got in zip(angles, np.asarray(rot)):
    ref = np.asarray(T.rotate(pil, float(a)))
    differ = float((ref != got).any(-1).mean())
    assert differ <= (0.0 if a == 0 else 1e-3), (a, differ)
  # crop + flip of a rotation = PIL's rotate, crop, FLIP_LEFT_RIGHT (exact at a tie-free angle)
  s = min(h, w) - 5
  got = _jit(lambda x: ops.rotate_crop_flip(x, jnp.float32(10.0), 3, 4, True, s, s))(
      jnp.asarray(img, jnp.int32))
  ref = T.hflip(T.crop(T.rotate(pil, 10.0), 3, 4, s, s))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  got = jax.jit(lambda x: ops.crop_flip(x, 2, 5, True, s, s))(jnp.asarray(img, jnp.int32))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(T.hflip(T.crop(pil, 2, 5, s, s))))


def test_normalise_and_erase_equal_host():
  img = _image(32, 48, 3)
  got = jax.jit(da.eval_preprocess)(jnp.asarray(img))
  ref = T.to_normalized(img)
  np.testing.assert_array_equal(np.asarray(got), ref)      # exact float32
  levels = np.repeat(np.arange(256, dtype=np.uint8), 3).reshape(16, 16, 3)
  np.testing.assert_array_equal(np.asarray(ops.normalize(jnp.asarray(levels))),
                                T.to_normalized(levels))
  erased = np.asarray(ops.erase(jnp.asarray(ref), True, 3, 7, 5, 11))
  want = ref.copy()
  want[3:8, 7:18] = 0.0
  np.testing.assert_array_equal(erased, want)
  np.testing.assert_array_equal(np.asarray(ops.erase(jnp.asarray(ref), False, 3, 7, 5, 11)), ref)


# ----------------------------------------------------- torchvision's laws --


def _draws(augment: T.Augment, src: int, s: int, seed: int = 0) -> dict[str, np.ndarray]:
  keys = jax.random.split(jax.random.key(seed), N_DRAWS)
  f = jax.jit(jax.vmap(lambda k: da.draw_params(k, augment, (src, src), s)))
  return {k: np.asarray(v) for k, v in f(keys).items()}


def _uniform_ok(x: np.ndarray, lo: float, hi: float) -> bool:
  return bool(x.min() >= lo and x.max() <= hi and
              stats.kstest(x, stats.uniform(lo, hi - lo).cdf).pvalue > P_MIN)


def _counts_ok(values: np.ndarray, n: int) -> bool:
  """Chi-square: values uniform on 0..n-1 (each value must occur)."""
  counts = np.bincount(values, minlength=n)
  return counts.size == n and stats.chisquare(counts).pvalue > P_MIN


def _binomial_ok(hits: np.ndarray, p: float) -> bool:
  z = (hits.mean() - p) / math.sqrt(p * (1 - p) / hits.size)
  return abs(z) < 4.0


def test_draws_follow_torchvision_laws():
  aug = T.Augment(resize=236, rotate=10.0, crop=True, hflip=True, jitter=(0.2, 0.3, 0.4, 0.1),
                  erase_scale=(0.02, 0.1), erase_p=0.3)
  d = _draws(aug, 236, 224)
  assert _binomial_ok(d["flip"], 0.5)
  assert _uniform_ok(d["angle"], -10.0, 10.0)
  assert _counts_ok(d["top"], 13) and _counts_ok(d["left"], 13)
  assert np.corrcoef(d["top"], d["left"])[0, 1] ** 2 < 1e-3       # independent offsets
  f = d["jitter_factors"]
  for i, (lo, hi) in enumerate([(0.8, 1.2), (0.7, 1.3), (0.6, 1.4), (-0.1, 0.1)]):
    assert _uniform_ok(f[:, i], lo, hi), i
  perms = {p: i for i, p in enumerate(itertools.permutations(range(4)))}
  assert _counts_ok(np.array([perms[tuple(o)] for o in d["jitter_order"]]), 24)
  # RandomErasing: probability, area scale, log aspect, h/w rounding, box placement
  assert _binomial_ok(d["erase_on"], 0.3)
  assert _uniform_ok(d["erase_scales"].ravel(), 0.02, 0.1)
  assert _uniform_ok(d["erase_log_ratios"].ravel(), math.log(0.3), math.log(3.3))
  on = d["erase_on"]
  area = 224 * 224 * d["erase_scales"][:, 0].astype(np.float64)
  aspect = np.exp(d["erase_log_ratios"][:, 0].astype(np.float64))
  h = np.round(np.sqrt(area * aspect)).astype(int)   # numpy rounds half to even, as Python
  w = np.round(np.sqrt(area / aspect)).astype(int)
  assert np.mean(h[on] == d["erase_h"][on]) > 0.999 and np.mean(w[on] == d["erase_w"][on]) > 0.999
  u = stats.uniform(0, 1).rvs(on.sum(), random_state=2)
  for pos, size in (("erase_top", "erase_h"), ("erase_left", "erase_w")):
    span = 224 - d[size][on] + 1
    assert d[pos][on].min() >= 0 and np.all(d[pos][on] < span)
    assert stats.kstest((d[pos][on] + u) / span, "uniform").pvalue > P_MIN   # discrete PIT
    for end in (0, span - 1):     # both ends of 0..S-h are reached at rate 1 / span (Poisson)
      expected = np.sum(1.0 / span)
      assert abs(np.sum(d[pos][on] == end) - expected) < 4 * math.sqrt(expected), (pos, end)


def test_erasing_attempts_first_valid_wins_and_none_valid_means_no_erase():
  aug = T.Augment(hflip=True, erase_scale=(0.5, 1.0), erase_p=1.0)
  s = 64
  d = _draws(aug, s, s, seed=3)
  area = s * s * d["erase_scales"].astype(np.float64)
  aspect = np.exp(d["erase_log_ratios"].astype(np.float64))
  h = np.round(np.sqrt(area * aspect)).astype(int)
  w = np.round(np.sqrt(area / aspect)).astype(int)
  valid = (h < s) & (w < s)
  none_valid = ~valid.any(1)
  np.testing.assert_array_equal(d["erase_on"], ~none_valid)
  first = valid.argmax(1)
  rows = np.arange(N_DRAWS)[~none_valid]
  assert np.mean(d["erase_h"][rows] == h[rows, first[rows]]) > 0.999
  assert np.mean(d["erase_w"][rows] == w[rows, first[rows]]) > 0.999
  assert (first > 0).mean() > 0.3           # later attempts matter for this scale
  # the host's erase_params gives up at the same rate
  rng = np.random.default_rng(4)
  host_none = np.array([T.erase_params(rng, s, s, (0.5, 1.0)) is None for _ in range(N_DRAWS)])
  p = (host_none.sum() + none_valid.sum()) / (2 * N_DRAWS)
  z = (host_none.mean() - none_valid.mean()) / math.sqrt(2 * p * (1 - p) / N_DRAWS)
  assert none_valid.mean() > 0.02 and abs(z) < 4.0, (host_none.mean(), none_valid.mean())


# ------------------------------------------------------ recipes on device --


class _Replay:
  """An np.random.Generator stand-in that hands transforms.Transform the device's draws."""

  def __init__(self, params: dict[str, np.ndarray], augment: T.Augment):
    p, a = params, augment
    self.queue: list[tuple[str, object]] = []
    if a.rotate:
      self.queue.append(("uniform", float(p["angle"])))
    if a.crop:
      self.queue += [("integers", int(p["top"])), ("integers", int(p["left"]))]
    if a.hflip:
      self.queue.append(("random", 0.25 if p["flip"] else 0.75))
    if a.jitter and any(a.jitter):
      self.queue.append(("permutation", np.asarray(p["jitter_order"])))
      self.queue += [("uniform", float(p["jitter_factors"][i])) for i in range(4) if a.jitter[i]]
    if a.erase_scale:
      self.queue.append(("random", 0.0 if p["erase_apply"] else 1.0))
      if p["erase_apply"]:     # the host's attempts, up to its first valid one
        for sc, lr in zip(p["erase_scales"], p["erase_log_ratios"]):
          self.queue += [("uniform", float(sc)), ("uniform", float(lr))]
          area, aspect = float(p["_size"]) ** 2 * float(sc), math.exp(float(lr))
          if max(round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))) < p["_size"]:
            self.queue += [("integers", int(p["erase_top"])), ("integers", int(p["erase_left"]))]
            break

  def _next(self, kind: str):
    got, value = self.queue.pop(0)
    assert got == kind, (got, kind)
    return value

  def uniform(self, lo, hi):
    v = self._next("uniform")
    assert lo <= v <= hi, (lo, v, hi)
    return v

  def integers(self, lo, hi):
    v = self._next("integers")
    assert lo <= v < hi, (lo, v, hi)      # the device's bounds are the host's
    return v

  def random(self):
    return self._next("random")

  def permutation(self, n):
    assert n == 4
    return self._next("permutation")


RECIPES = ("rafdb", "ferplus", "ferplus_dcs", "affectnet", "affectnet8_dcs", "synthetic")
# No recipe crops without rotating (a separate path): one made-up augmentation does.
CROP_ONLY = dict(resize=52, crop=True, hflip=True, jitter=(0.0, 0.3, 0.3, 0.0),
                 erase_scale=(0.02, 0.3))


@pytest.mark.parametrize("name", RECIPES + ("crop_only",))
def test_recipe_runs_on_device_and_equals_host_transform(name):
  s = 48
  aug = T.Augment.from_cfg(CROP_ONLY if name == "crop_only" else T.recipe_augment(name, s))
  src = da.source_hw(aug, s)
  imgs = np.stack([[_image(*src, seed=a * 4 + k) for k in range(2)] for a in range(2)])
  key, epoch, pos = jax.random.key(5), jnp.array([3, 3], jnp.int32), jnp.array([10, 11], jnp.int32)
  out, drawn = jax.jit(da.augment_batch_with_params, static_argnums=(4, 5))(
      key, jnp.asarray(imgs), epoch, pos, aug, s)
  assert out.shape == (2, 2, s, s, 3) and out.dtype == jnp.float32
  host = T.Transform(aug, s, train=True)
  for a, k in itertools.product(range(2), range(2)):
    params = {n: np.asarray(v[a, k]) for n, v in drawn.items()}
    params["_size"] = np.int32(s)
    replay = _Replay(params, aug)
    ref = host(imgs[a, k], replay)
    assert not replay.queue, replay.queue
    got = np.asarray(out[a, k])
    if aug.rotate:   # rotation ties: <= 0.1% of pixels (module docstring)
      assert np.mean(np.any(got != ref, -1)) <= 1e-3
    else:
      np.testing.assert_array_equal(got, ref)


def test_keep_aspect_and_bad_inputs_raise_clear_errors():
  aug = T.Augment(resize=240, keep_aspect=True, crop=True, hflip=True)
  with pytest.raises(ValueError, match="keep_aspect"):
    da.source_hw(aug, 224)
  aug = T.Augment.from_cfg(T.recipe_augment("ferplus", 48))
  wrong = jnp.zeros((1, 1, 48, 48, 3), jnp.uint8)          # cache must hold 50x50
  with pytest.raises(ValueError, match="resize=50"):
    da.augment_batch(jax.random.key(0), wrong, jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32),
                     aug, 48)
  with pytest.raises(ValueError, match="uint8"):
    da.eval_preprocess(jnp.zeros((2, 8, 8, 3), jnp.float32))


# --------------------------------------------------- determinism, lowering --


def test_rows_depend_only_on_key_epoch_position_branch():
  """Same (key, epoch, position, branch) -> same row: in any batch, sharded, without jit.

  A cheap augmentation (every draw, one jitter op) keeps the compiles short; the
  recipe test above covers every op inside augment_batch.
  """
  s = 24
  aug = T.Augment(resize=28, crop=True, hflip=True, jitter=(0.3, 0.0, 0.0, 0.0),
                  erase_scale=(0.02, 0.2), erase_p=0.5)
  imgs = jnp.asarray(np.stack([[_image(28, 28, seed=k) for k in range(2)]] * 8))  # same anchor
  key = jax.random.key(5)
  f = jax.jit(da.augment_batch, static_argnums=(4, 5))
  epoch = jnp.full((8,), 3, jnp.int32)
  pos = jnp.arange(10, 18, dtype=jnp.int32)
  full = np.asarray(f(key, imgs, epoch, pos, aug, s))
  assert len({full[a, k].tobytes() for a in range(8) for k in range(2)}) == 16  # keys differ
  # the same rows, shuffled: each row moves with its (epoch, position)
  order = np.array([5, 0, 7, 2, 1, 6, 3, 4])
  moved = np.asarray(f(key, imgs[order], epoch[order], pos[order], aug, s))
  np.testing.assert_array_equal(moved, full[order])
  assert not np.array_equal(np.asarray(f(key, imgs, epoch + 1, pos, aug, s)), full)
  # a batch of 2 holding rows 2 and 6
  pair = np.asarray(f(key, imgs[2:7:4], epoch[2:7:4], pos[2:7:4], aug, s))
  np.testing.assert_array_equal(pair, full[2:7:4])
  # sharded over 8 devices on the anchor axis (conftest: 8 virtual CPU devices)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  sharded = f(key, jax.device_put(imgs, shard), jax.device_put(epoch, shard),
              jax.device_put(pos, shard), aug, s)
  assert sharded.sharding.spec[0] == "data"
  np.testing.assert_array_equal(np.asarray(sharded), full)
  # no jit: one row, op by op
  with jax.disable_jit():
    row = da.apply_params(da.draw_params(da.row_key(key, epoch[2], pos[2], 1), aug, (28, 28), s),
                          imgs[2, 1], aug, s)
  np.testing.assert_array_equal(np.asarray(row), full[2, 1])


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_augment_batch_lowers_for_accelerators(platform):
  s = 48
  aug = T.Augment.from_cfg(T.recipe_augment("affectnet", s))
  src = da.source_hw(aug, s)
  f = jax.jit(lambda k, x, e, p: da.augment_batch(k, x, e, p, aug, s))
  args = (jax.random.key(0), jax.ShapeDtypeStruct((2, 4) + src + (3,), jnp.uint8),
          jax.ShapeDtypeStruct((2,), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32))
  exp = jax.export.export(f, platforms=[platform])(*args)
  text = exp.mlir_module()
  assert exp.platforms == (platform,)
  assert "custom_call" not in text and "callback" not in text
  assert "stablehlo.gather" in text and "stablehlo.while" not in text
  assert exp.out_avals[0].shape == (2, 4, s, s, 3)
