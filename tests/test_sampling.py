"""BranchSampler: purity, the anchor/positive/negative rules, balance, epoch slicing."""
import logging
import pickle
import time

import numpy as np
import pytest

from qcs_jax.data import sampling
from qcs_jax.data.sampling import BranchSampler

CONFIGS = [(a, n) for a in ("shuffle", "balanced") for n in ("random", "balanced")]


def long_tail_labels(counts=(400, 150, 60, 25, 10, 4, 2), seed=0):
  labels = np.concatenate([np.full(c, k) for k, c in enumerate(counts)])
  return np.random.default_rng(seed).permutation(labels)


@pytest.mark.parametrize("anchors,negatives", CONFIGS)
def test_same_key_same_tuple_and_epochs_differ(anchors, negatives):
  labels = long_tail_labels()
  s1 = BranchSampler(labels, 4, seed=11, anchors=anchors, negatives=negatives)
  s2 = BranchSampler(labels, 4, seed=11, anchors=anchors, negatives=negatives)
  # a fresh sampler, asked in a different order, gives the same tuples (pure function)
  late = s2.epoch_indices(3)
  np.testing.assert_array_equal(s1.epoch_indices(3), late)
  for pos in (0, 17, s1.epoch_length - 1):
    np.testing.assert_array_equal(s1.draw(3, pos), late[pos])
    np.testing.assert_array_equal(s1.draw(3, pos), s1.draw(3, pos))
  e0, e1 = s1.epoch_indices(0), s1.epoch_indices(1)
  assert (e0 != e1).any(axis=1).mean() > 0.9
  other_seed = BranchSampler(labels, 4, seed=12, anchors=anchors, negatives=negatives)
  assert (other_seed.epoch_indices(3) != late).any(axis=1).mean() > 0.9


@pytest.mark.parametrize("anchors,negatives", CONFIGS)
def test_class_rules(anchors, negatives):
  labels = long_tail_labels()
  s = BranchSampler(labels, 4, seed=5, anchors=anchors, negatives=negatives)
  t = np.concatenate([s.epoch_indices(e) for e in range(5)])
  assert t.dtype == np.int64 and t.shape == (5 * len(labels), 4)
  assert t.min() >= 0 and t.max() < len(labels)
  a, p, n, n2 = t.T
  assert (labels[p] == labels[a]).all() and (p != a).all()
  assert (labels[n] != labels[a]).all()
  assert (labels[n2] == labels[n]).all() and (n2 != n).all()
  # every image of a small class turns up as a positive of its class-mates
  small = np.flatnonzero(labels == 5)
  assert set(p[labels[a] == 5]) == set(small)


def test_dcs_and_baseline_shapes():
  labels = long_tail_labels()
  s2 = BranchSampler(labels, 2, seed=1)
  t = s2.epoch_indices(0)
  assert t.shape == (len(labels), 2)
  assert (labels[t[:, 1]] == labels[t[:, 0]]).all() and (t[:, 1] != t[:, 0]).all()
  s1 = BranchSampler(labels, 1, seed=1)
  assert s1.epoch_indices(0).shape == (len(labels), 1)
  assert s1.draw(0, 3).shape == (1,)
  # the anchors do not depend on how many branches are drawn around them
  np.testing.assert_array_equal(s1.epoch_indices(0)[:, 0], t[:, 0])


def test_negative_modes_distribution():
  """'random' is uniform over images of the other classes, 'balanced' uniform over classes."""
  labels = np.array([0] * 50 + [1] * 900 + [2] * 50)
  freq = {}
  for mode in ("random", "balanced"):
    s = BranchSampler(labels, 4, seed=2, negatives=mode)
    t = np.concatenate([s.epoch_indices(e) for e in range(4)])
    neg_of_0 = labels[t[labels[t[:, 0]] == 0, 2]]
    freq[mode] = np.mean(neg_of_0 == 1)  # 200 draws; expected 900/950 vs 1/2
  assert freq["random"] > 0.88
  assert 0.35 < freq["balanced"] < 0.65


def test_positive_uniform_over_class_mates():
  labels = np.array([0, 0, 0, 1, 1, 1, 1])
  s = BranchSampler(labels, 2, seed=9)
  t = np.concatenate([s.epoch_indices(e) for e in range(600)])
  pos_of_0 = t[t[:, 0] == 0, 1]  # 600 draws over items 1 and 2
  share = np.mean(pos_of_0 == 1)
  assert set(pos_of_0) == {1, 2} and 0.4 < share < 0.6


def test_balanced_anchors_uniform_over_classes():
  labels = long_tail_labels()  # 400 .. 2 images per class
  s = BranchSampler(labels, 1, seed=4, anchors="balanced")
  a = np.concatenate([s.epoch_indices(e)[:, 0] for e in range(30)])  # 19,530 draws
  freq = np.bincount(labels[a], minlength=7) / len(a)
  # binomial sd is ~0.0025; 0.02 is 8 sd, and the seed is fixed
  np.testing.assert_allclose(freq, 1 / 7, atol=0.02)
  # within a class images are drawn uniformly: both images of the 2-image class appear
  tiny = np.flatnonzero(labels == 6)
  share = np.mean(a[labels[a] == 6] == tiny[0])
  assert 0.4 < share < 0.6
  shuffled = BranchSampler(labels, 1, seed=4).epoch_indices(0)[:, 0]
  assert np.bincount(labels[shuffled])[0] == 400  # shuffle keeps the natural frequencies


def test_shuffle_epochs_are_permutations_and_fractions_tile_cycles():
  labels = long_tail_labels()
  n = len(labels)
  s = BranchSampler(labels, 1, seed=3)
  assert s.epoch_length == n
  np.testing.assert_array_equal(np.sort(s.epoch_indices(2)[:, 0]), np.arange(n))
  # 1/3 epochs (n = 651 = 3 * 217): three consecutive epochs cover the data set exactly once
  q = BranchSampler(labels, 1, seed=3, epoch_fraction=1 / 3)
  assert q.epoch_length == n // 3
  cycle = np.concatenate([q.epoch_indices(e)[:, 0] for e in range(3, 6)])
  np.testing.assert_array_equal(np.sort(cycle), np.arange(n))
  assert len(np.unique(q.epoch_indices(0)[:, 0])) == n // 3
  # a fraction that does not divide the set: epochs straddle cycles of the same stream
  r = BranchSampler(np.arange(10) % 3, 1, seed=3, epoch_fraction=0.3)
  assert r.epoch_length == 3
  stream = np.concatenate([r.epoch_indices(e)[:, 0] for e in range(10)])
  for c in range(3):
    np.testing.assert_array_equal(np.sort(stream[10 * c:10 * c + 10]), np.arange(10))


@pytest.mark.parametrize("n,fraction,expected", [
    (283901, 1 / 12, 23658), (283901, 1 / 8, 35488), (12271, 1.0, 12271), (5, 0.01, 1)])
def test_epoch_fraction_lengths(n, fraction, expected):
  s = BranchSampler(np.arange(n) % 7, 4, seed=0, anchors="balanced", epoch_fraction=fraction)
  assert s.epoch_length == expected == len(s)
  assert s.epoch_indices(1).shape == (expected, 4)


@pytest.mark.parametrize("anchors,negatives", CONFIGS)
@pytest.mark.parametrize("nb,fraction", [(1, 1.0), (2, 0.3), (4, 1.0), (4, 1 / 3)])
def test_epoch_indices_equal_stacked_draws(anchors, negatives, nb, fraction):
  labels = np.array([0, 0, 1, 2, 2, 2, 3, 3, 3, 3, 0, 2, 5, 5])  # class 1 single, 4 empty
  s = BranchSampler(labels, nb, seed=123456789, anchors=anchors, negatives=negatives,
                    epoch_fraction=fraction)
  for epoch in (0, 1, 7, 1000):
    stacked = np.stack([s.draw(epoch, p) for p in range(s.epoch_length)])
    np.testing.assert_array_equal(s.epoch_indices(epoch), stacked)
    assert stacked.dtype == np.int64


def test_singleton_class_reused_and_warned_once(caplog, monkeypatch):
  monkeypatch.setattr(sampling, "_warned", set())
  labels = np.array([0, 0, 0, 1, 2, 2])
  with caplog.at_level(logging.WARNING, logger="qcs_jax.data.sampling"):
    s = BranchSampler(labels, 4, seed=0)
    BranchSampler(labels, 4, seed=1)  # same label set: no second warning
  warnings = [r for r in caplog.records if "single image" in r.getMessage()]
  assert len(warnings) == 1 and "[1]" in warnings[0].getMessage()
  t = np.concatenate([s.epoch_indices(e) for e in range(200)])
  a, p, n, n2 = t.T
  assert (p[a == 3] == 3).all()            # the only class-1 image is its own positive
  assert (n2[n == 3] == 3).all() and (n == 3).any()
  assert (p[a != 3] != a[a != 3]).all()


def test_empty_classes_and_errors():
  labels = np.array([0, 2, 0, 2, 2, 0])  # classes 1, 3, 4 empty
  for anchors in ("shuffle", "balanced"):
    for negatives in ("random", "balanced"):
      s = BranchSampler(labels, 4, seed=0, num_classes=5, anchors=anchors, negatives=negatives)
      y = labels[np.concatenate([s.epoch_indices(e) for e in range(50)])]
      # An empty class drawn as the negative class would give some other class's image
      # (order[start[c]]), often the anchor's own: negatives always of the other class.
      assert (y[:, 0] == y[:, 1]).all() and (y[:, 2] == y[:, 3]).all()
      assert (y[:, 2] != y[:, 0]).all(), (anchors, negatives)
      assert set(np.unique(y[:, 0])) == {0, 2}, (anchors, negatives)  # both classes anchor
  with pytest.raises(ValueError, match="at least 2 classes"):
    BranchSampler(np.zeros(6, int), 4, seed=0)
  BranchSampler(np.zeros(6, int), 2, seed=0)  # DCS needs no negatives
  with pytest.raises(ValueError, match="num_branches"):
    BranchSampler(np.arange(4), 3, seed=0)
  with pytest.raises(ValueError, match="anchors"):
    BranchSampler(np.arange(4), 1, seed=0, anchors="random")
  with pytest.raises(ValueError, match="negatives"):
    BranchSampler(np.arange(4), 4, seed=0, negatives="hard")
  with pytest.raises(ValueError, match="epoch_fraction"):
    BranchSampler(np.arange(4), 1, seed=0, epoch_fraction=0.0)
  with pytest.raises(ValueError, match="negative label"):
    BranchSampler(np.array([0, -1]), 1, seed=0)
  with pytest.raises(ValueError, match="position"):
    s.draw(0, s.epoch_length)
  with pytest.raises(ValueError, match="epoch"):
    s.epoch_indices(-1)


def test_epoch_indices_fast_on_affectnet_size():
  labels = long_tail_labels((74874, 134415, 25459, 14090, 6378, 3803, 24882))
  for anchors, negatives in (("shuffle", "random"), ("balanced", "balanced")):
    s = BranchSampler(labels, 4, seed=0, anchors=anchors, negatives=negatives)
    t0 = time.perf_counter()
    t = s.epoch_indices(0)
    elapsed = time.perf_counter() - t0
    assert t.shape == (283901, 4)
    assert elapsed < 10.0, f"{anchors}/{negatives}: {elapsed:.2f} s for 283,901 anchors"


def test_pickled_sampler_draws_the_same():
  s = BranchSampler(long_tail_labels(), 4, seed=8, epoch_fraction=0.5)
  before = s.epoch_indices(3)
  clone = pickle.loads(pickle.dumps(s))
  assert clone._perms == {}
  np.testing.assert_array_equal(clone.epoch_indices(3), before)
