"""Hostile and unusual image files: one DataError line naming the file, or a proper RGB array.

`make_hostile_files` writes every fault class the README table lists; the
evaluate test runs a data set holding them with data.on_bad_image=skip.
"""
from __future__ import annotations

import io
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from qcs_jax import recipes as config
from qcs_jax.apps import evaluation as evaluate
from qcs_jax.model_files import model_dir as checkpoint
from qcs_jax.data import images, synthetic
from qcs_jax.data.base import DataError, FileSource
from qcs_jax.models import build_model
from qcs_jax.apps.throughput import random_variables


def _png_chunk(kind: bytes, data: bytes) -> bytes:
  return (struct.pack(">I", len(data)) + kind + data
          + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def bomb_png(width: int, height: int) -> bytes:
  """A valid PNG header declaring width x height grey pixels, with a tiny IDAT."""
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
          + _png_chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + _png_chunk(b"IEND", b""))


def face(seed: int = 0, size: int = 32) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _encoded(arr: np.ndarray, fmt: str) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, fmt)
  return buf.getvalue()


def make_hostile_files(d) -> dict[str, str]:
  """Writes one file per fault under d; file name -> regex its error must match."""
  d.mkdir(parents=True, exist_ok=True)
  jpg, png = _encoded(face(1), "JPEG"), _encoded(face(2), "PNG")
  files = {
      "bomb.png": (bomb_png(100_000, 100_000), r"decompression bomb refused before decoding: .*10000000000 pixels"),
      "empty.jpg": (b"", r"empty file \(0 bytes\)"),
      "truncated.jpg": (jpg[:len(jpg) // 2], r"truncated"),
      "truncated.png": (png[:len(png) // 2], r"truncated|corrupt"),
      "text.jpg": (b"this is not an image\n", r"not an image \(starts with b'this is "),
      "html.png": (b"<html><body>404</body></html>", r"not an image"),
      "garbage_after_header.png": (png[:16] + bytes(range(256)) * 4, r"corrupt PNG file"),
  }
  for name, (data, _) in files.items():
    (d / name).write_bytes(data)
  (d / "folder.jpg").mkdir(exist_ok=True)
  out = {name: msg for name, (_, msg) in files.items()}
  out["folder.jpg"] = "is a directory"
  return out


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
  d = tmp_path_factory.mktemp("hostile")
  return d, make_hostile_files(d)


def test_each_fault_is_one_line_naming_the_file(hostile):
  d, expected = hostile
  for name, msg in expected.items():
    with pytest.raises(DataError, match=msg) as e:
      images.decode_rgb(str(d / name))
    text = str(e.value)
    assert str(d / name) in text and "\n" not in text, text


def test_missing_file(tmp_path):
  with pytest.raises(DataError, match=f"missing image file: {tmp_path}/nope.png"):
    images.decode_rgb(str(tmp_path / "nope.png"))


def test_pixel_limit_is_checked_before_decoding(tmp_path):
  p = tmp_path / "big.png"
  p.write_bytes(_encoded(face(0, 64), "PNG"))
  assert images.decode_rgb(str(p)).shape == (64, 64, 3)
  with pytest.raises(DataError, match="bomb refused before decoding: 64x64 = 4096 pixels, over the 4000-pixel limit"):
    images.decode_rgb(str(p), max_pixels=4000)


def test_bad_file_in_a_file_source_names_its_list_line(hostile):
  d, _ = hostile
  src = FileSource(labels=[0], class_names=("a",), name="t", paths=[str(d / "empty.jpg")],
                   origins=["list.txt line 4"])
  with pytest.raises(DataError, match=r"empty\.jpg: empty file .*\[list.txt line 4\]"):
    src[0]


# ------------------------------------------------------------------ unusual but valid modes
def test_cmyk_tiff_and_jpeg(tmp_path):
  rgb = face(3)
  cmyk = Image.fromarray(rgb).convert("CMYK")
  cmyk.save(tmp_path / "c.tif")
  np.testing.assert_array_equal(images.decode_rgb(str(tmp_path / "c.tif")), rgb)
  cmyk.save(tmp_path / "c.jpg", quality=95)
  got = images.decode_rgb(str(tmp_path / "c.jpg")).astype(int)
  assert got.shape == rgb.shape and np.abs(got - rgb).mean() < 12


def _s15(x: float) -> bytes:
  return struct.pack(">i", int(round(x * 65536)))


def flat_cmyk_profile(y: float) -> bytes:
  """A minimal ICC v2 CMYK printer profile whose A2B0 maps *every* CMYK value to one grey
  (PCS XYZ = y x D50 white): what its conversion gives cannot come from the plain formula."""
  lut = b"mft2" + bytes(4) + bytes([4, 3, 2, 0])
  lut += b"".join(_s15(1.0 if r == c else 0.0) for r in range(3) for c in range(3))
  lut += struct.pack(">HH", 2, 2) + struct.pack(">HH", 0, 65535) * 4  # identity input curves
  grey = [min(65535, round(v * y * 32768)) for v in (0.9642, 1.0, 0.8249)]
  lut += struct.pack(">HHH", *grey) * 2 ** 4 + struct.pack(">HH", 0, 65535) * 3
  wtpt = b"XYZ " + bytes(4) + _s15(0.9642) + _s15(1.0) + _s15(0.8249)
  table_end = 128 + 4 + 12 * 2
  body = lut + wtpt
  size = table_end + len(body)
  head = (struct.pack(">I", size) + b"lcms" + struct.pack(">I", 0x02100000) + b"prtrCMYKXYZ "
          + bytes(12) + b"acsp" + bytes(28) + _s15(0.9642) + _s15(1.0) + _s15(0.8249)
          + bytes(48))
  tags = (b"A2B0" + struct.pack(">II", table_end, len(lut))
          + b"wtpt" + struct.pack(">II", table_end + len(lut), len(wtpt)))
  return head + struct.pack(">I", 2) + tags + body


def test_cmyk_with_icc_profile_uses_it(tmp_path):
  from PIL import ImageCms
  profile = flat_cmyk_profile(0.2)
  rgb = face(4)
  Image.fromarray(rgb).convert("CMYK").save(tmp_path / "icc.tif", icc_profile=profile)
  got = images.decode_rgb(str(tmp_path / "icc.tif")).astype(int)
  with Image.open(tmp_path / "icc.tif") as im:
    plain = np.asarray(im.convert("RGB")).astype(int)
    want = np.asarray(ImageCms.profileToProfile(
        im, ImageCms.ImageCmsProfile(io.BytesIO(profile)), ImageCms.createProfile("sRGB"),
        outputMode="RGB")).astype(int)
  assert plain.max() - plain.min() > 200           # the plain formula keeps the colours
  grey = np.median(got)  # the profile's one grey (lcms rounds a pixel or two at the corners)
  assert (np.abs(got - grey).max(-1) <= 2).mean() >= 0.99 and 10 < grey < 245
  np.testing.assert_array_equal(got, want)


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
  grey = np.random.default_rng(5).integers(0, 256, (20, 30), dtype=np.uint16)
  Image.fromarray(grey * 257).save(tmp_path / "g16.png")  # a 16-bit PNG
  with Image.open(tmp_path / "g16.png") as im:
    assert im.mode.startswith("I")
  got = images.decode_rgb(str(tmp_path / "g16.png"))
  np.testing.assert_array_equal(got, np.repeat(grey.astype(np.uint8)[..., None], 3, -1))


def test_palette_and_alpha_modes(tmp_path):
  rgb = face(6, 16)
  pal = Image.fromarray(rgb).convert("P")
  pal.save(tmp_path / "p.png")
  np.testing.assert_array_equal(images.decode_rgb(str(tmp_path / "p.png")),
                                np.asarray(pal.convert("RGB")))
  rgba = np.dstack([rgb, np.zeros((16, 16), np.uint8)])
  rgba[:8, :, 3] = 255                              # top half opaque, bottom transparent
  Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
  got = images.decode_rgb(str(tmp_path / "a.png"))
  np.testing.assert_array_equal(got[:8], rgb[:8])
  assert (got[8:] == 255).all()                     # onto white, not the hidden colours
  la = Image.fromarray(rgba, "RGBA").convert("LA")
  la.save(tmp_path / "la.png")
  got = images.decode_rgb(str(tmp_path / "la.png"))
  assert (got[8:] == 255).all() and got.shape == (16, 16, 3)
  trans = Image.fromarray(rgb).convert("P")
  trans.info["transparency"] = int(np.asarray(trans)[15, 15])
  trans.save(tmp_path / "pt.png", transparency=trans.info["transparency"])
  assert (images.decode_rgb(str(tmp_path / "pt.png"))[15, 15] == 255).all()


def test_exif_orientation_only_when_asked(tmp_path):
  rgb = face(7, 8)[:, :6]
  im = Image.fromarray(rgb)
  exif = im.getexif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise to view
  im.save(tmp_path / "o.png", exif=exif)  # lossless: the pixels themselves are compared
  np.testing.assert_array_equal(images.decode_rgb(str(tmp_path / "o.png")), rgb)
  upright = images.decode_rgb(str(tmp_path / "o.png"), exif_transpose=True)
  # Orientation 6: the stored image turned 90 degrees clockwise (np.rot90 turns anticlockwise).
  np.testing.assert_array_equal(upright, np.rot90(rgb, k=-1))


# ------------------------------------------------------------------ evaluate skips and counts
def test_evaluate_skips_counts_and_names_each_bad_file(tmp_path, caplog):
  tiny = dict(name="qcs", csa="sd", num_classes=7, img_size=32, stage_channels=(8, 8, 16),
              stage_units=(1, 1, 1), embed_dim=16, num_heads=2, base_depth=1, cross_depth=1)
  model = build_model(tiny)
  ckpt = checkpoint.save_variables(tmp_path / "ckpt", random_variables(model, 32, seed=0,
                                                                     inference_only=False),
                                   tiny)
  root = tmp_path / "data"
  names = synthetic.CLASS_NAMES
  for c, cls in enumerate(names):
    for split in ("train", "test"):
      (root / split / cls).mkdir(parents=True)
      Image.fromarray(face(10 + c)).save(root / split / cls / "good.png")
  expected = make_hostile_files(root / "test" / names[0])
  cfg = config.synthetic()
  cfg.data.update(name="folder", root=str(root), test_split="test", eval_batch_size=8,
                  on_bad_image="skip")
  cfg.data.augment.resize = 32
  caplog.set_level("WARNING")
  r = evaluate.evaluate_checkpoint(cfg, str(ckpt), progress=False)
  n_bad = len(expected) - 1  # folder.jpg is a directory: the folder reader never lists it
  assert r["num_images"] == 7 and r["num_skipped"] == n_bad == len(r["bad_images"])
  for name, msg in expected.items():
    if name != "folder.jpg":
      line = next(b for b in r["bad_images"] if f"/{name}:" in b)
      assert "\n" not in line
      assert re.search(msg, line), line
  report = evaluate.format_report(r)
  assert f"{n_bad} bad images skipped" in report and "bomb.png" in report
  logged = [rec.getMessage() for rec in caplog.records if "skipping bad image" in
            rec.getMessage()]
  assert len(logged) == n_bad

  cfg.data.on_bad_image = "error"
  with pytest.raises(DataError, match=r"on_bad_image=skip"):
    evaluate.evaluate_checkpoint(cfg, str(ckpt), progress=False)


def test_training_batches_replace_each_hostile_file_and_say_why(tmp_path):
  from qcs_jax.data import pipeline
  d = tmp_path / "imgs"
  expected = make_hostile_files(d)
  bad = sorted(n for n in expected if n != "folder.jpg")
  good = []
  for k in range(8):
    Image.fromarray(face(20 + k, 16)).save(d / f"good{k}.png")
    good.append(str(d / f"good{k}.png"))
  paths = good + [str(d / n) for n in bad]
  labels = [k % 2 for k in range(8)] + [k % 2 for k in range(len(bad))]
  src = FileSource(labels=labels, class_names=("a", "b"), name="t", paths=paths)
  cfg = config.synthetic().data
  cfg.update(on_bad_image="skip", batch_size=4, workers=0)
  cfg.augment.resize = 16
  it = pipeline.train_batches(src, cfg, 16, 4, seed=0, epoch=0, num_epochs=3)
  for b in it:
    assert not np.isin(b["index"], np.arange(8, len(paths))).any()
  assert it.num_skipped >= len(it.bad_reasons) > 0
  for i, reason in it.bad_reasons.items():
    name = paths[i].rsplit("/", 1)[1]
    assert reason.startswith(paths[i]) and re.search(expected[name], reason), reason


def test_training_loop_prints_and_records_skipped_totals(tmp_path, capsys):
  """train_and_evaluate over a folder with hostile files: the run finishes, and each
  epoch prints and records (eval row of metrics.jsonl) how many were skipped."""
  import json
  from qcs_jax.training import loop
  root = tmp_path / "data"
  names = synthetic.CLASS_NAMES
  for c, cls in enumerate(names):
    for split in ("train", "test"):
      (root / split / cls).mkdir(parents=True)
      for k in range(2):
        Image.fromarray(face(40 + 2 * c + k)).save(root / split / cls / f"good{k}.png")
  make_hostile_files(root / "train" / names[0])
  (root / "test" / names[1] / "empty.png").write_bytes(b"")
  cfg = config.synthetic("qcs")
  cfg.model.update(img_size=32, stage_channels=(8, 8, 16), stage_units=(1, 1, 1),
                   embed_dim=16, num_heads=2, base_depth=1, cross_depth=1)
  cfg.data.update(name="folder", root=str(root), test_split="test", batch_size=8,
                  eval_batch_size=8, workers=0, on_bad_image="skip")
  cfg.data.augment.resize = 32
  cfg.init.backbone = "scratch"
  cfg.train.update(epochs=1, progress=False, checkpoint_every=1, log_every=1)
  loop.train_and_evaluate(cfg, str(tmp_path / "run"))
  out = capsys.readouterr().out
  rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
  ev = [r for r in rows if r["kind"] == "eval"]
  assert len(ev) == 1 and ev[0]["train_skipped"] > 0 and ev[0]["test_skipped"] == 1
  assert ev[0]["num_images"] == 14  # the empty file is masked out, not counted
  assert (f"bad images skipped (data.on_bad_image='skip'): {ev[0]['train_skipped']} training "
          "draws so far") in out and "1 test images, not counted" in out
  # Stopped after the first step and resumed: the count of the first step comes back from
  # the checkpoint, so the resumed run's eval row is the uninterrupted run's.
  assert sum(r["kind"] == "train" for r in rows) >= 2
  cfg.train.stop_after_steps = 1
  loop.train_and_evaluate(cfg, str(tmp_path / "resumed"))
  cfg.train.stop_after_steps = 0
  loop.train_and_evaluate(cfg, str(tmp_path / "resumed"))
  assert "(global step 1)" in capsys.readouterr().out
  again = [json.loads(x) for x in open(tmp_path / "resumed" / "metrics.jsonl")]
  assert [r for r in again if r["kind"] == "eval"] == ev


def test_mutated_images_decode_or_raise_one_line(tmp_path):
  """Random byte edits of six formats: an RGB array or a one-line DataError, nothing else."""
  rng = np.random.default_rng(0)
  sources = {fmt: _encoded(face(30, 24), fmt) for fmt in
             ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")}
  errors = 0
  for k in range(300):
    fmt = list(sources)[k % len(sources)]
    b = bytearray(sources[fmt])
    for _ in range(int(rng.integers(1, 6))):
      pos, op = int(rng.integers(len(b))), int(rng.integers(3))
      if op == 0:
        b[pos] = int(rng.integers(256))
      elif op == 1:
        del b[pos]
      else:
        b.insert(pos, int(rng.integers(256)))
    path = tmp_path / f"m{k}.{fmt.lower()}"
    path.write_bytes(bytes(b))
    try:
      rgb = images.decode_rgb(str(path))
      assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    except DataError as e:
      errors += 1
      assert str(path) in str(e) and "\n" not in str(e)
  assert errors > 50
