"""qcs_jax.data.pipeline: batches are a pure function of (seed, epoch, step)."""
import os

import numpy as np
import pytest
from PIL import Image

from qcs_jax.data import pipeline as P
from qcs_jax.data import transforms as T
from qcs_jax.data.sources import DataError, FileSource, InMemorySource

CLASSES = ("a", "b", "c", "d", "e")
SIZE = 16  # output image size: tiny keeps the tests fast


def _source(n=40, size=12, seed=0):
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % len(CLASSES)
  rng.shuffle(labels)
  return InMemorySource(labels=labels, class_names=CLASSES, name="mem/train",
                        images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def _cfg(**kw):
  cfg = dict(batch_size=4, workers=0, on_bad_image="error", anchors="shuffle",
             negatives="random", epoch_fraction=1.0, augment=T.recipe_augment("rafdb"))
  cfg.update(kw)
  return cfg


def _file_source(tmp_path, n=20, bad=(), missing=()):
  """PNG files on disk; items in `bad` are corrupt, items in `missing` do not exist."""
  rng = np.random.default_rng(1)
  labels = np.arange(n) % 4
  paths = []
  for i in range(n):
    p = os.path.join(tmp_path, f"img_{i:03d}.png")
    if i in bad:
      with open(p, "wb") as f:
        f.write(b"not a png at all")
    elif i not in missing:
      Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(p)
    paths.append(p)
  return FileSource(labels=labels, class_names=CLASSES[:4], name="files/train", paths=paths)


def _all(it):
  return [dict(b) for b in it]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ------------------------------------------------------------------ train --


@pytest.mark.parametrize("nb", [1, 2, 4])
def test_train_batch_shapes_dtypes_and_labels(nb):
  src = _source()
  it = P.train_batches(src, _cfg(), SIZE, nb, seed=3, epoch=0)
  batches = _all(it)
  assert len(batches) == P.steps_per_epoch(it.sampler, 4) == len(src) // 4
  anchors = []
  for b in batches:
    assert set(b) == {"image", "label", "index"}
    assert b["image"].shape == (4, nb, SIZE, SIZE, 3) and b["image"].dtype == np.float32
    assert b["label"].shape == (4, nb) and b["label"].dtype == np.int32
    assert b["index"].shape == (4, nb)
    assert np.isfinite(b["image"]).all()
    np.testing.assert_array_equal(b["label"], src.labels[b["index"]])
    anchors.extend(b["index"][:, 0].tolist())
    if nb == 2:  # DCS: anchor, positive
      assert (b["label"][:, 0] == b["label"][:, 1]).all()
      assert (b["index"][:, 0] != b["index"][:, 1]).all()
    if nb == 4:  # QCS: y, y, y_neg, y_neg
      lab = b["label"]
      assert (lab[:, 0] == lab[:, 1]).all() and (lab[:, 2] == lab[:, 3]).all()
      assert (lab[:, 0] != lab[:, 2]).all()
      assert (b["index"][:, 0] != b["index"][:, 1]).all()
      assert (b["index"][:, 2] != b["index"][:, 3]).all()
  assert sorted(anchors) == list(range(len(src)))  # shuffled epoch: every anchor once
  assert it.get_state() == {"seed": 3, "epoch": 1, "step": 0}  # next: epoch 1, step 0


def test_batches_follow_sampler_and_keyed_transform():
  src = _source()
  cfg = _cfg()
  it = P.train_batches(src, cfg, SIZE, 4, seed=5, epoch=2)
  b1 = next(it)
  b2 = next(it)
  sampler = P.make_sampler(src, cfg, 4, 5)
  t = T.build_transform(cfg["augment"], SIZE, train=True)
  for step, b in ((0, b1), (1, b2)):
    for a in range(4):
      position = step * 4 + a
      np.testing.assert_array_equal(b["index"][a], sampler.draw(2, position))
      for k in range(4):
        want = t(src[int(b["index"][a, k])]["image"], P.augment_rng(5, 2, position, k))
        np.testing.assert_array_equal(b["image"][a, k], want)


def test_determinism_and_resume():
  src = _source()
  full = _all(P.train_batches(src, _cfg(), SIZE, 4, seed=1, epoch=3))
  _assert_same(full, _all(P.train_batches(src, _cfg(), SIZE, 4, seed=1, epoch=3)))
  resumed = P.train_batches(src, _cfg(), SIZE, 4, seed=1, epoch=3, start_step=6)
  assert len(resumed) == len(full) - 6 and resumed.get_state()["step"] == 6
  _assert_same(full[6:], _all(resumed))
  # another seed or another epoch gives other batches
  other_seed = next(P.train_batches(src, _cfg(), SIZE, 4, seed=2, epoch=3))
  other_epoch = next(P.train_batches(src, _cfg(), SIZE, 4, seed=1, epoch=4))
  assert not np.array_equal(other_seed["image"], full[0]["image"])
  assert not np.array_equal(other_epoch["image"], full[0]["image"])


def test_get_state_set_state_round_trip():
  src = _source()
  it = P.train_batches(src, _cfg(), SIZE, 2, seed=0, epoch=1)
  first = [next(it) for _ in range(3)]
  state = it.get_state()
  assert state == {"seed": 0, "epoch": 1, "step": 3}
  rest = _all(it)
  it2 = P.train_batches(src, _cfg(), SIZE, 2, seed=0, epoch=1)
  next(it2)
  it2.set_state(state)
  _assert_same(rest, _all(it2))
  it2.set_state({"seed": 0, "epoch": 1, "step": 0})
  _assert_same(first, [next(it2) for _ in range(3)])
  with pytest.raises(ValueError, match="seed"):
    it2.set_state({"seed": 9, "epoch": 1, "step": 0})
  with pytest.raises(ValueError, match="outside"):
    it2.set_state({"seed": 0, "epoch": 1, "step": 99})


def test_multi_epoch_iterator_continues_into_the_next_epochs():
  src = _source(n=24)
  e2 = _all(P.train_batches(src, _cfg(), SIZE, 4, seed=1, epoch=2, start_step=4))
  e3 = _all(P.train_batches(src, _cfg(), SIZE, 4, seed=1, epoch=3))
  e4 = _all(P.train_batches(src, _cfg(), SIZE, 4, seed=1, epoch=4))
  it = P.train_batches(src, _cfg(), SIZE, 4, seed=1, epoch=2, start_step=4, num_epochs=3)
  assert len(it) == 2 + 6 + 6
  got, states = [], []
  for b in it:
    got.append(b)
    states.append((it.epoch, it.step))
  _assert_same(e2 + e3 + e4, got)
  assert states[1] == (3, 0) and states[7] == (4, 0) and states[-1] == (5, 0)
  it.set_state({"seed": 1, "epoch": 4, "step": 5})
  _assert_same(e4[5:], _all(it))
  with pytest.raises(ValueError, match="outside"):
    it.set_state({"seed": 1, "epoch": 1, "step": 0})


def test_last_incomplete_batch_dropped_and_bad_options():
  src = _source(n=23)
  it = P.train_batches(src, _cfg(batch_size=5), SIZE, 1, seed=0, epoch=0)
  assert len(it) == 4 and len(_all(it)) == 4
  with pytest.raises(ValueError, match="no full batch"):
    P.train_batches(src, _cfg(batch_size=64), SIZE, 1, seed=0, epoch=0)
  with pytest.raises(ValueError, match="on_bad_image"):
    P.train_batches(src, _cfg(on_bad_image="ignore"), SIZE, 1, seed=0, epoch=0)
  with pytest.raises(ValueError, match="workers"):
    P.train_batches(src, _cfg(workers=-1), SIZE, 1, seed=0, epoch=0)


def test_config_dict_is_accepted():
  ml_collections = pytest.importorskip("ml_collections")
  src = _source()
  cfg = ml_collections.ConfigDict(_cfg())
  b = next(P.train_batches(src, cfg, SIZE, 4, seed=0, epoch=0))
  np.testing.assert_array_equal(b["image"], next(P.train_batches(src, _cfg(), SIZE, 4, seed=0,
                                                                 epoch=0))["image"])


# ------------------------------------------------------------------- eval --


def test_eval_batches_pad_and_mask():
  src = _source(n=23)
  cfg = _cfg()
  it = P.eval_batches(src, cfg, SIZE, 8)
  assert len(it) == 3
  batches = _all(it)
  assert len(batches) == 3
  t = T.build_transform(cfg["augment"], SIZE, train=False)
  seen = []
  for b in batches:
    assert b["image"].shape == (8, SIZE, SIZE, 3) and b["image"].dtype == np.float32
    assert b["label"].shape == b["index"].shape == b["mask"].shape == (8,)
    assert b["mask"].dtype == bool
    for a in np.flatnonzero(b["mask"]):
      i = int(b["index"][a])
      assert b["label"][a] == src.labels[i]
      np.testing.assert_array_equal(b["image"][a], t(src[i]["image"]))
      seen.append(i)
  assert seen == list(range(23))
  last = batches[-1]
  np.testing.assert_array_equal(last["mask"], [True] * 7 + [False])
  assert last["index"][7] == -1 and (last["image"][7] == 0).all()


# ------------------------------------------------------------- bad images --


def test_bad_image_error_names_the_file(tmp_path):
  src = _file_source(tmp_path, bad={3})
  with pytest.raises(DataError, match="img_003.png"):
    _all(P.train_batches(src, _cfg(), SIZE, 1, seed=0, epoch=0))
  with pytest.raises(DataError, match="img_003.png"):
    _all(P.eval_batches(src, _cfg(), SIZE, 8))


def test_bad_image_skip_replaces_within_class_and_counts(tmp_path):
  src = _file_source(tmp_path, bad={3}, missing={6})
  cfg = _cfg(on_bad_image="skip")
  it = P.train_batches(src, cfg, SIZE, 4, seed=0, epoch=0)
  batches = _all(it)
  idx = np.concatenate([b["index"].ravel() for b in batches])
  assert 3 not in idx and 6 not in idx
  for b in batches:  # replacements keep the QCS label layout
    np.testing.assert_array_equal(b["label"], src.labels[b["index"]])
    assert (b["label"][:, 0] == b["label"][:, 1]).all()
    assert (b["label"][:, 2] == b["label"][:, 3]).all()
  assert it.num_skipped >= 2  # both are drawn as anchors at least once
  assert set(it.bad_items) == {3, 6}
  assert "img_003.png" in it.bad_items[3] and "img_006.png" in it.bad_items[6]
  # the replacement is deterministic
  again = P.train_batches(src, cfg, SIZE, 4, seed=0, epoch=0)
  _assert_same(batches, _all(again))
  assert again.num_skipped == it.num_skipped


def test_bad_image_skip_masks_eval_items(tmp_path):
  src = _file_source(tmp_path, bad={3}, missing={17})
  it = P.eval_batches(src, _cfg(on_bad_image="skip"), SIZE, 8)
  batches = _all(it)
  mask = np.concatenate([b["mask"] for b in batches])
  index = np.concatenate([b["index"] for b in batches])
  assert mask.sum() == 18
  assert not mask[3] and not mask[17] and index[3] == 3 and index[17] == 17
  assert it.num_skipped == 2 and set(it.bad_items) == {3, 17}


class _FlakySource(InMemorySource):
  """Item 2 fails with a non-DataError, as a custom reader might."""

  def describe(self, i):
    return f"/data/face_{i}.jpg (list.txt line {i + 1})"

  def load_image(self, i):
    if i == 2:
      raise OSError("truncated file")
    return super().load_image(i)


def test_non_data_errors_become_data_errors_naming_the_item():
  src = _source(n=12)
  flaky = _FlakySource(labels=src.labels, class_names=CLASSES, name="flaky", images=src.images)
  with pytest.raises(DataError, match=r"/data/face_2.jpg \(list.txt line 3\).*truncated"):
    _all(P.eval_batches(flaky, _cfg(), SIZE, 4))
  it = P.eval_batches(flaky, _cfg(on_bad_image="skip"), SIZE, 4)
  assert sum(int(b["mask"].sum()) for b in it) == 11
  assert it.bad_items == {2: "/data/face_2.jpg (list.txt line 3)"}


def test_class_with_only_bad_images_is_a_clear_error(tmp_path):
  src = _file_source(tmp_path, n=8, bad={1, 5})  # labels i % 4: class 1 = {1, 5}
  with pytest.raises(DataError, match="class"):
    _all(P.train_batches(src, _cfg(on_bad_image="skip"), SIZE, 1, seed=0, epoch=0))


# ---------------------------------------------------------- worker processes --


def test_workers_give_the_same_batches_and_counts(tmp_path):
  """Two grain worker processes: same batches as in-process, skips counted across processes."""
  src = _file_source(tmp_path, n=24, bad={5})
  cfg = _cfg(on_bad_image="skip")
  local = P.train_batches(src, cfg, SIZE, 4, seed=4, epoch=1, start_step=1)
  want = _all(local)
  with P.train_batches(src, dict(cfg, workers=2), SIZE, 4, seed=4, epoch=1,
                       start_step=1) as remote:
    got = _all(remote)
    assert remote.get_state() == {"seed": 4, "epoch": 2, "step": 0}
  _assert_same(want, got)
  assert remote.num_skipped == local.num_skipped and set(remote.bad_items) == {5}


def test_worker_error_reaches_the_caller(tmp_path):
  src = _file_source(tmp_path, n=16, bad={9})
  with pytest.raises(DataError, match="img_009.png"):
    with P.eval_batches(src, _cfg(workers=1), SIZE, 4) as it:
      _all(it)
