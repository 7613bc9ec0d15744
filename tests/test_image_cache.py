"""qcs_jax.data.image_cache and data.augment_on='device' batches (uint8 from the cache)."""
import json
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
from PIL import Image
import pytest

from qcs_jax import recipes as config_lib
from qcs_jax.recipes import checks
from qcs_jax.data import image_cache as C
from qcs_jax.data import pipeline as P
from qcs_jax.data import transforms as T
from qcs_jax.data.sources import DataError, FERSource, FileSource, InMemorySource

CLASSES = ("a", "b", "c", "d")
SIZE = 16
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_images(folder, n=20, bad=(), seed=1):
  """JPEG and PNG files of several sizes (one grey PNG); items in `bad` are corrupt."""
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  paths = []
  for i in range(n):
    ext = "jpg" if i % 2 else "png"
    p = os.path.join(folder, f"img_{i:03d}.{ext}")
    if i in bad:
      with open(p, "wb") as f:
        f.write(b"not an image at all")
    elif i == 4:
      Image.fromarray(rng.integers(0, 256, (13, 11), dtype=np.uint8), "L").save(p)
    else:
      h, w = 10 + i % 7, 12 + i % 5
      Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p, quality=90)
    paths.append(p)
  return paths


def _files(tmp_path, n=20, bad=()):
  paths = _write_images(str(tmp_path / "img"), n, bad)
  return FileSource(labels=np.arange(n) % 4, class_names=CLASSES, name="files/train",
                    paths=paths)


def _cfg(tmp_path, recipe="ferplus", **kw):
  cfg = dict(batch_size=4, workers=0, on_bad_image="skip", anchors="shuffle",
             negatives="random", epoch_fraction=1.0, augment=T.recipe_augment(recipe, SIZE),
             augment_on="device", cache_dir=str(tmp_path / "cache"))
  cfg.update(kw)
  return cfg


def _all(it):
  return [dict(b) for b in it]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ------------------------------------------------------------- cache content --


@pytest.mark.parametrize("recipe", ["ferplus", "rafdb"])
def test_cache_holds_the_host_resize_bit_for_bit(tmp_path, recipe):
  src = _files(tmp_path)
  aug = T.recipe_augment(recipe, SIZE)
  train = C.ensure_cache(src, C.layout(aug, SIZE, True), str(tmp_path / "c"), progress=False)
  evals = C.ensure_cache(src, C.layout(aug, SIZE, False), str(tmp_path / "c"), progress=False)
  host_eval = T.build_transform(aug, SIZE, train=False)
  size = T.build_transform(aug, SIZE, train=True).resize_size
  assert train.array().shape == (20, *size, 3) and evals.array().shape == (20, SIZE, SIZE, 3)
  assert train.array().dtype == np.uint8 and not train.bad
  for i in range(len(src)):
    img = src[i]["image"]
    want = np.asarray(T.resize(Image.fromarray(T._as_rgb_uint8(img)), size))
    np.testing.assert_array_equal(train.array()[i], want)
    # the eval cache, normalised, is exactly the host's eval transform
    np.testing.assert_array_equal(T.to_normalized(evals.array()[i]), host_eval(img))
  # the host's random train transform gives the same from the cached image as from the file
  host_train = T.build_transform(aug, SIZE, train=True)
  for i in (1, 4, 6):
    np.testing.assert_array_equal(host_train(train.array()[i], P.augment_rng(0, 0, i, 0)),
                                  host_train(src[i]["image"], P.augment_rng(0, 0, i, 0)))
  # with every random op off, the host train transform is the cached image normalised
  plain = dict(aug, rotate=0.0, hflip=False, jitter=(), erase_scale=(), crop=False, resize=0)
  cached = C.ensure_cache(src, C.layout(plain, SIZE, True), str(tmp_path / "c"), progress=False)
  t = T.build_transform(plain, SIZE, train=True)
  for i in (0, 4, 7):
    np.testing.assert_array_equal(T.to_normalized(cached.array()[i]),
                                  t(src[i]["image"], np.random.default_rng(0)))


def test_parallel_builds_equal_the_serial_build(tmp_path):
  src = _files(tmp_path, n=40, bad={9})
  lay = C.layout(T.recipe_augment("ferplus", SIZE), SIZE, True)
  serial = C.ensure_cache(src, lay, str(tmp_path / "s"), progress=False)
  for parallel in C.PARALLEL:
    other = C.ensure_cache(src, lay, str(tmp_path / parallel), workers=2, parallel=parallel,
                           progress=False)
    assert other.built and other.bad == serial.bad
    np.testing.assert_array_equal(other.array(), serial.array())


def test_changed_data_set_gets_a_new_cache(tmp_path):
  cache_dir = str(tmp_path / "c")
  lay = C.layout(T.recipe_augment("rafdb", SIZE), SIZE, False)
  src = _files(tmp_path)
  first = C.ensure_cache(src, lay, cache_dir, progress=False)
  same = C.ensure_cache(FileSource(labels=src.labels, class_names=CLASSES, name=src.name,
                                   paths=list(src.paths)), lay, cache_dir, progress=False)
  assert first.built and not same.built and same.path == first.path
  # new content (mtime set back to the old one: only the size tells)
  st = os.stat(src.paths[2])
  Image.fromarray(np.full((30, 30, 3), 7, np.uint8)).save(src.paths[2])
  os.utime(src.paths[2], ns=(st.st_atime_ns, st.st_mtime_ns))
  changed = C.ensure_cache(src, lay, cache_dir, progress=False)
  assert changed.built
  np.testing.assert_array_equal(changed.array()[2], 7)
  os.utime(src.paths[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10**6))  # touched only
  assert C.ensure_cache(src, lay, cache_dir, progress=False).built
  fewer = FileSource(labels=src.labels[:-1], class_names=CLASSES, name=src.name,
                     paths=src.paths[:-1])
  more = FileSource(labels=np.append(src.labels, 0), class_names=CLASSES, name=src.name,
                    paths=list(src.paths) + [src.paths[0]])
  relabelled = FileSource(labels=np.roll(src.labels, 1), class_names=CLASSES, name=src.name,
                          paths=src.paths)
  for s in (fewer, more, relabelled):
    assert C.ensure_cache(s, lay, cache_dir, progress=False).built
  assert len(C.cache_sizes(cache_dir)) == 6
  # an in-memory source is keyed by its pixels
  images = np.zeros((8, 12, 12, 3), np.uint8)
  mem = InMemorySource(labels=np.arange(8) % 4, class_names=CLASSES, name="mem", images=images)
  key = C.cache_key(mem, lay)
  images[5, 3, 3, 1] = 1
  assert C.cache_key(mem, lay) != key


# --------------------------------------------------------- interrupted builds --


class _Stop(BaseException):
  pass


class _Counting(FileSource):
  """Counts decodes; raises _Stop at item `stop_at`."""

  stop_at = -1
  decoded = []

  def load_image(self, i):
    if i == self.stop_at:
      raise _Stop()
    self.decoded.append(i)
    return super().load_image(i)


def test_interrupted_build_is_never_used_and_a_rerun_resumes(tmp_path, monkeypatch):
  monkeypatch.setattr(C, "_CHUNK", 4)
  monkeypatch.setattr(C, "_CHECKPOINT_S", 1e9)  # only the interruption saves a checkpoint
  files = _files(tmp_path, n=24, bad={13})
  src = _Counting(labels=files.labels, class_names=CLASSES, name=files.name, paths=files.paths)
  lay = C.layout(T.recipe_augment("ferplus", SIZE), SIZE, True)
  cache_dir = str(tmp_path / "c")
  base = C.cache_base(src, lay, cache_dir)
  _Counting.stop_at, _Counting.decoded = 17, []
  with pytest.raises(_Stop):
    C.ensure_cache(src, lay, cache_dir, progress=False)
  assert not os.path.exists(base + ".npy") and not os.path.exists(base + ".json")
  assert C.cache_sizes(cache_dir) == []
  with open(base + ".partial.json") as f:
    assert json.load(f)["done"] == 16  # the chunks before the interrupted one
  _Counting.stop_at, _Counting.decoded = -1, []
  cache = C.ensure_cache(src, lay, cache_dir, progress=False)
  assert cache.built and sorted(_Counting.decoded) == list(range(16, 24))  # resumed at 16
  assert list(cache.bad) == [13] and "img_013.jpg" in cache.bad[13]
  want = C.ensure_cache(files, lay, str(tmp_path / "fresh"), progress=False)
  np.testing.assert_array_equal(cache.array(), want.array())
  assert not os.path.exists(base + ".partial.json") and not os.path.exists(base + ".npy.partial")


_BUILDER = """
import logging, sys, time
import numpy as np
sys.path.insert(0, {repo!r})
from qcs_jax.data import image_cache as C, transforms as T
from qcs_jax.data.sources import InMemorySource

class Slow(InMemorySource):
  def load_image(self, i):
    time.sleep({delay})
    return super().load_image(i)

C._CHUNK, C._CHECKPOINT_S = 4, 0.0
rng = np.random.default_rng(0)
src = Slow(labels=np.arange(40) % 4, class_names=tuple("abcd"), name="slow",
           images=rng.integers(0, 256, (40, 20, 20, 3), dtype=np.uint8))
lay = C.layout(T.recipe_augment("ferplus", 16), 16, True)
logging.basicConfig(level=logging.INFO)
c = C.ensure_cache(src, lay, {cache_dir!r}, progress=False)
print("built" if c.built else "reused", c.path, flush=True)
"""


def _builder(tmp_path, cache_dir, delay):
  script = tmp_path / f"build_{delay}.py"
  script.write_text(_BUILDER.format(repo=REPO, cache_dir=cache_dir, delay=delay))
  return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def test_killed_build_is_not_used_and_two_builders_give_one_cache(tmp_path):
  cache_dir = str(tmp_path / "c")
  p = _builder(tmp_path, cache_dir, 0.02)
  deadline = time.monotonic() + 60
  while not (os.path.isdir(cache_dir)
             and any(f.endswith(".partial.json") for f in os.listdir(cache_dir))):
    assert time.monotonic() < deadline and p.poll() is None, p.communicate()
    time.sleep(0.01)
  p.send_signal(signal.SIGKILL)  # mid-build: after a checkpoint, before the last item
  p.wait()
  assert C.cache_sizes(cache_dir) == []
  assert not [f for f in os.listdir(cache_dir) if f.endswith((".npy", ".json"))
              and not f.endswith(".partial.json")]
  both = [_builder(tmp_path, cache_dir, 0.002) for _ in range(2)]
  outs = [b.communicate(timeout=120) for b in both]
  assert [b.returncode for b in both] == [0, 0], outs
  words = [o[0].split() for o in outs]
  assert sorted(w[0] for w in words) == ["built", "reused"], outs
  assert words[0][1] == words[1][1]  # the same file
  builder = outs[[w[0] for w in words].index("built")]
  assert "resuming the image cache" in builder[1]  # from the killed build's checkpoint
  (row,) = C.cache_sizes(cache_dir)
  assert row["shape"] == [40, 17, 17, 3] and row["bytes"] == C.disk_bytes(40, 17, 17)
  arr = np.load(row["path"], mmap_mode="r")
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (40, 20, 20, 3), dtype=np.uint8)
  lay = C.layout(T.recipe_augment("ferplus", 16), 16, True)
  for i in (0, 17, 39):
    np.testing.assert_array_equal(arr[i], C.prepare(images[i], lay))


# ------------------------------------------------------------- uint8 batches --


def test_device_batches_match_host_batches(tmp_path):
  src = _files(tmp_path, n=24, bad={5})
  cfg = _cfg(tmp_path)
  dev = P.train_batches(src, cfg, SIZE, 4, seed=3, epoch=2)
  host = P.train_batches(src, dict(cfg, augment_on="host"), SIZE, 4, seed=3, epoch=2)
  got, want = _all(dev), _all(host)
  arr = dev.cache.array()
  assert len(got) == len(want) == 6
  for step, (d, h) in enumerate(zip(got, want)):
    assert set(d) == {"image", "label", "index", "epoch", "position"}
    assert d["image"].dtype == np.uint8 and d["image"].shape == (4, 4, 17, 17, 3)
    for k in ("label", "index", "epoch", "position"):
      assert d[k].dtype == np.int32, k
    np.testing.assert_array_equal(d["index"], h["index"])  # same draws and stand-ins
    np.testing.assert_array_equal(d["label"], h["label"])
    np.testing.assert_array_equal(d["image"], arr[d["index"]])
    np.testing.assert_array_equal(d["epoch"], [2] * 4)
    np.testing.assert_array_equal(d["position"], step * 4 + np.arange(4))
  assert 5 not in np.concatenate([d["index"].ravel() for d in got])
  assert dev.num_skipped == host.num_skipped > 0
  assert dev.bad_items == host.bad_items and dev.bad_reasons == host.bad_reasons


def test_parts_resume_and_workers_give_the_same_batches(tmp_path):
  src = _files(tmp_path, n=24, bad={5})
  cfg = _cfg(tmp_path)
  full = _all(P.train_batches(src, cfg, SIZE, 4, seed=1, epoch=0, num_epochs=2))
  parts = [_all(P.train_batches(src, cfg, SIZE, 4, seed=1, epoch=0, num_epochs=2, part=(i, 2)))
           for i in range(2)]
  for g, (a, b) in enumerate(zip(*parts)):
    for k in full[g]:
      np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), full[g][k], err_msg=k)
  resumed = P.train_batches(src, cfg, SIZE, 4, seed=1, epoch=0, start_step=4, num_epochs=2)
  _assert_same(full[4:], _all(resumed))
  it = P.train_batches(src, cfg, SIZE, 4, seed=1, epoch=0, num_epochs=2)
  it.set_state({"seed": 1, "epoch": 1, "step": 2})
  _assert_same(full[8:], _all(it))
  with P.train_batches(src, dict(cfg, workers=2), SIZE, 4, seed=1, epoch=0,
                       num_epochs=2) as remote:
    got = _all(remote)
    assert remote.num_skipped > 0 and set(remote.bad_items) == {5}
  _assert_same(full, got)


def test_device_eval_batches(tmp_path):
  src = _files(tmp_path, n=19, bad={3})
  cfg = _cfg(tmp_path)
  dev = _all(P.eval_batches(src, cfg, SIZE, 8))
  host_it = P.eval_batches(src, dict(cfg, augment_on="host"), SIZE, 8)
  host = _all(host_it)
  for d, h in zip(dev, host):
    assert d["image"].dtype == np.uint8 and d["image"].shape == (8, SIZE, SIZE, 3)
    for k in ("label", "index", "mask"):
      np.testing.assert_array_equal(d[k], h[k], err_msg=k)
    for a in range(8):
      if d["mask"][a]:
        np.testing.assert_array_equal(h["image"][a], T.to_normalized(d["image"][a]))
      else:  # padding or the bad image: zeros, as in host mode
        assert not d["image"][a].any() and not h["image"][a].any()
  parts = [_all(P.eval_batches(src, cfg, SIZE, 8, part=(i, 2))) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([parts[0][1]["image"], parts[1][1]["image"]]),
                                dev[1]["image"])


def test_bad_images_raise_or_are_skipped_as_in_host_mode(tmp_path):
  src = _files(tmp_path, n=8, bad={3})
  with pytest.raises(DataError, match="img_003.jpg.*on_bad_image=skip"):
    _all(P.train_batches(src, _cfg(tmp_path, on_bad_image="error"), SIZE, 1, seed=0, epoch=0))
  with pytest.raises(DataError, match="img_003.jpg"):
    _all(P.eval_batches(src, _cfg(tmp_path, on_bad_image="error"), SIZE, 4))
  two_bad = _files(tmp_path / "b", n=8, bad={1, 5})  # class 1 = {1, 5}: no stand-in
  with pytest.raises(DataError, match="class"):
    _all(P.train_batches(two_bad, _cfg(tmp_path), SIZE, 1, seed=0, epoch=0))


def test_options_are_checked(tmp_path, monkeypatch):
  src = _files(tmp_path, n=8)
  aspect = dict(T.recipe_augment("ferplus", SIZE), keep_aspect=True)
  with pytest.raises(ValueError, match="keep_aspect.*augment_on=host"):
    P.train_batches(src, _cfg(tmp_path, augment=aspect), SIZE, 1, seed=0, epoch=0)
  assert C.layout(aspect, SIZE, False).height == SIZE  # eval: centre crop -> fixed size
  with pytest.raises(ValueError, match="augment_on"):
    P.train_batches(src, _cfg(tmp_path, augment_on="gpu"), SIZE, 1, seed=0, epoch=0)
  cfg = config_lib.base_config()
  assert cfg.data.augment_on == "auto"
  assert P.resolve_augment_on("auto", "cpu") == "host"      # CPU: the host path, as before
  assert P.resolve_augment_on("auto", "cuda") == "device"
  assert P.resolve_augment_on("auto", "tpu") == "device"
  assert P.resolve_augment_on("auto") == "host"             # this test runs on CPU
  assert P.resolve_augment_on("host", "cuda") == "host"
  assert P.resolve_augment_on("device", "cpu") == "device"
  cfg.data.augment_on = "tpu"
  with pytest.raises(checks.ConfigError, match="data.augment_on='tpu'"):
    checks.check_config(cfg)

  class NoPrint(InMemorySource):
    fingerprint = None

  class Custom(FERSource):  # a user's source type: FERSource's fingerprint() refuses
    def load_image(self, i):
      return np.zeros((8, 8, 3), np.uint8)

  odd = NoPrint(labels=np.arange(4), class_names=CLASSES, name="odd",
                images=np.zeros((4, 8, 8, 3), np.uint8))
  for s in (odd, Custom(labels=np.arange(4), class_names=CLASSES, name="custom")):
    with pytest.raises(ValueError, match="fingerprint.*augment_on='host'"):
      P.eval_batches(s, _cfg(tmp_path), SIZE, 4)
  (tmp_path / "a_file").write_text("")
  with pytest.raises(OSError, match="a_file.*data.cache_dir"):
    P.eval_batches(src, _cfg(tmp_path, cache_dir=str(tmp_path / "a_file" / "c")), SIZE, 4)
  monkeypatch.setattr(C.shutil, "disk_usage", lambda d: types.SimpleNamespace(free=1000))
  with pytest.raises(OSError, match="needs 0.00 GiB.*larger disk"):
    P.eval_batches(src, _cfg(tmp_path), SIZE, 4)
  env = {"HOME": "/home/u", "QCS_JAX_CACHE_DIR": "/elsewhere"}
  assert C.default_cache_dir(env) == "/home/u/.cache/qcs_jax/images"
  assert C.default_cache_dir(dict(env, XDG_CACHE_HOME="/x")) == "/x/qcs_jax/images"
