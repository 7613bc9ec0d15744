"""Index tuples for training: anchors, plus positives and negatives for DCS / QCS.

One row per anchor, ``num_branches`` source indices:
  1: (anchor,)                                   baseline training, evaluation order
  2: (anchor, positive)                          DCS
  4: (anchor, positive, negative, negative2)     QCS
positive = another image of the anchor's class; negative = an image of another class
('random': uniform over those images, 'balanced': a uniform other class, then an image);
negative2 = another image of the negative's class. A class with a single image reuses
it as its own positive / negative2 (logged once).

Anchors: 'shuffle' walks an endless stream of permutations of the data set, one per
cycle keyed by (seed, cycle); epoch e takes positions [e*L, (e+1)*L) of that stream,
so with epoch_fraction 1/N (AffectNet) N consecutive epochs cover the data set once
and with 1.0 each epoch is one permutation. 'balanced' draws with replacement with
weight 1/count(class) per image (a uniform class, then a uniform image of it).

Every draw is a pure function of (seed, epoch, position): a counter-based hash
(splitmix64 finaliser) replaces a stateful RNG, so a resumed run sees the same
tuples, ``draw`` is O(1) (per-class index arrays are built once; the permutation of
a cycle is computed once and cached; Python-int arithmetic, a few microseconds) and
``epoch_indices`` is its vectorised numpy twin (same bits, tested equal).
"""
from __future__ import annotations

import functools
import logging

import numpy as np

log = logging.getLogger(__name__)

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
# hash streams: one independent random number per purpose and position
(_ANCHOR_CLASS, _ANCHOR_ITEM, _POSITIVE, _NEG_CLASS, _NEG_ITEM, _NEGATIVE2,
 _PERMUTATION) = range(1, 8)
_warned: set[tuple] = set()


def _mix_int(x: int) -> int:
  """splitmix64 finaliser on a Python int (exact 64-bit wrap-around)."""
  x &= _M64
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
  return x ^ (x >> 31)


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64 finaliser on a uint64 array (numpy array arithmetic wraps modulo 2**64)."""
  x = x ^ (x >> np.uint64(30))
  x *= np.uint64(0xBF58476D1CE4E5B9)
  x ^= x >> np.uint64(27)
  x *= np.uint64(0x94D049BB133111EB)
  x ^= x >> np.uint64(31)
  return x


@functools.lru_cache(maxsize=4096)
def _key(seed: int, epoch: int, stream: int) -> int:
  return _mix_int(_mix_int(_mix_int(seed + _GOLDEN) ^ epoch) + stream * _GOLDEN)


def _hash(seed: int, epoch: int, positions: np.ndarray, stream: int) -> np.ndarray:
  """64 random bits per position, a pure function of (seed, epoch, position, stream)."""
  x = (positions.astype(np.uint64) + np.uint64(1)) * np.uint64(_GOLDEN)
  x ^= np.uint64(_key(seed, epoch, stream))
  return _mix(x)


def _hash_one(seed: int, epoch: int, position: int, stream: int) -> int:
  """Scalar twin of ``_hash`` (same bits) for fast single draws."""
  return _mix_int((((position + 1) * _GOLDEN) & _M64) ^ _key(seed, epoch, stream))


def _below(bits: np.ndarray, n) -> np.ndarray:
  """Integers uniform in [0, n) (n >= 1, < 2**32, scalar or per element) from random bits."""
  return (((bits >> np.uint64(32)) * np.asarray(n, np.uint64)) >> np.uint64(32)).astype(np.int64)


class BranchSampler:
  """Pure-function sampler of (num_branches,) index tuples; see the module docstring."""

  def __init__(self, labels, num_branches: int, seed: int, anchors: str = "shuffle",
               negatives: str = "random", epoch_fraction: float = 1.0,
               num_classes: int | None = None):
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
      raise ValueError(f"BranchSampler: labels must be a non-empty 1-D array, "
                       f"got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"BranchSampler: labels must be integers, got dtype {labels.dtype}")
    if labels.min() < 0:
      raise ValueError(f"BranchSampler: negative label {int(labels.min())} "
                       f"at index {int(np.argmin(labels))}")
    if num_branches not in (1, 2, 4):
      raise ValueError(f"BranchSampler: num_branches must be 1, 2 or 4, got {num_branches}")
    if anchors not in ("shuffle", "balanced"):
      raise ValueError(f"BranchSampler: anchors must be 'shuffle' or 'balanced', got {anchors!r}")
    if negatives not in ("random", "balanced"):
      raise ValueError(f"BranchSampler: negatives must be 'random' or 'balanced', "
                       f"got {negatives!r}")
    if not 0.0 < float(epoch_fraction) <= 1.0:
      raise ValueError(f"BranchSampler: epoch_fraction must be in (0, 1], got {epoch_fraction}")
    n = labels.shape[0]
    if n >= 1 << 32:
      raise ValueError(f"BranchSampler: at most 2**32 - 1 items, got {n}")
    k = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    if labels.max() >= k:
      raise ValueError(f"BranchSampler: label {int(labels.max())} >= num_classes {k}")

    self.labels = labels.astype(np.int64)
    self.num_branches = num_branches
    self.seed = int(seed) & _M64
    self.anchors, self.negatives = anchors, negatives
    self.epoch_fraction = float(epoch_fraction)
    self.num_items, self.num_classes = n, k
    self.epoch_length = max(1, int(round(n * self.epoch_fraction)))
    # per-class index arrays: members of class c are order[start[c]:start[c] + counts[c]]
    self.counts = np.bincount(self.labels, minlength=k).astype(np.int64)
    self.order = np.argsort(self.labels, kind="stable").astype(np.int64)
    self.start = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
    self.rank = np.empty(n, np.int64)  # each item's position within its class
    self.rank[self.order] = np.arange(n) - self.start[self.labels[self.order]]
    self.present = np.flatnonzero(self.counts > 0)
    self.class_rank = np.full(k, -1, np.int64)
    self.class_rank[self.present] = np.arange(self.present.size)
    self._perms: dict[int, np.ndarray] = {}

    if num_branches == 4 and self.present.size < 2:
      raise ValueError(f"BranchSampler: QCS negatives need images of at least 2 classes; "
                       f"all {n} labels are class {int(self.present[0])}")
    singles = tuple(int(c) for c in np.flatnonzero(self.counts == 1))
    if num_branches >= 2 and singles and (n, singles) not in _warned:
      _warned.add((n, singles))
      log.warning("classes %s have a single image: it is reused as its own positive%s",
                  list(singles), " / negative2" if num_branches == 4 else "")

  # ---- anchors -------------------------------------------------------------------------------
  def _permutation(self, cycle: int) -> np.ndarray:
    """The anchor order of one pass over the data set (cached: O(N) once per cycle)."""
    perm = self._perms.get(cycle)
    if perm is None:
      keys = _hash(self.seed, cycle, np.arange(self.num_items), _PERMUTATION)
      perm = np.argsort(keys, kind="stable").astype(np.int64)
      if len(self._perms) >= 4:  # keep the last few cycles; tolerant of concurrent callers
        try:
          self._perms.pop(next(iter(self._perms)), None)
        except (StopIteration, RuntimeError):
          pass
      self._perms[cycle] = perm
    return perm

  def __getstate__(self) -> dict:
    """Pickles (e.g. to loader workers) without the permutation cache."""
    state = dict(self.__dict__)
    state["_perms"] = {}
    return state

  def _anchors(self, epoch: int, pos: np.ndarray) -> np.ndarray:
    if self.anchors == "shuffle":
      g = epoch * self.epoch_length + pos  # position in the endless stream of permutations
      cycle, offset = g // self.num_items, g % self.num_items
      out = np.empty(pos.shape, np.int64)
      for c in np.unique(cycle):
        sel = cycle == c
        out[sel] = self._permutation(int(c))[offset[sel]]
      return out
    cls = self.present[_below(_hash(self.seed, epoch, pos, _ANCHOR_CLASS), self.present.size)]
    item = _below(_hash(self.seed, epoch, pos, _ANCHOR_ITEM), self.counts[cls])
    return self.order[self.start[cls] + item]

  # ---- partners ------------------------------------------------------------------------------
  def _same_class_other(self, items: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Another image of each item's class (the item itself if its class has one image)."""
    y = self.labels[items]
    cnt = self.counts[y]
    r = _below(bits, np.maximum(cnt - 1, 1))
    r += r >= self.rank[items]  # skip the item itself: uniform over the other cnt - 1
    r = np.where(cnt > 1, r, self.rank[items])
    return self.order[self.start[y] + r]

  def _negatives(self, epoch: int, pos: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    y = self.labels[anchors]
    if self.negatives == "random":  # uniform over the images of all other classes
      r = _below(_hash(self.seed, epoch, pos, _NEG_ITEM), self.num_items - self.counts[y])
      r = np.where(r < self.start[y], r, r + self.counts[y])
      return self.order[r]
    rc = _below(_hash(self.seed, epoch, pos, _NEG_CLASS), self.present.size - 1)
    rc += rc >= self.class_rank[y]  # a uniform class among the other non-empty ones
    cls = self.present[rc]
    item = _below(_hash(self.seed, epoch, pos, _NEG_ITEM), self.counts[cls])
    return self.order[self.start[cls] + item]

  def _draw_one(self, epoch: int, p: int) -> np.ndarray:
    """Scalar twin of ``_draw_many`` (same rules, same bits): a few microseconds per tuple."""
    h = lambda stream: _hash_one(self.seed, epoch, p, stream)
    below = lambda stream, n: ((h(stream) >> 32) * int(n)) >> 32
    if self.anchors == "shuffle":
      cycle, offset = divmod(epoch * self.epoch_length + p, self.num_items)
      a = int(self._permutation(cycle)[offset])
    else:
      c = int(self.present[below(_ANCHOR_CLASS, self.present.size)])
      a = int(self.order[self.start[c] + below(_ANCHOR_ITEM, self.counts[c])])

    def other(item: int, stream: int) -> int:
      y = int(self.labels[item])
      cnt, rank = int(self.counts[y]), int(self.rank[item])
      if cnt == 1:
        return item
      r = below(stream, cnt - 1)
      return int(self.order[self.start[y] + r + (r >= rank)])

    out = [a]
    if self.num_branches >= 2:
      out.append(other(a, _POSITIVE))
    if self.num_branches == 4:
      y = int(self.labels[a])
      if self.negatives == "random":
        r = below(_NEG_ITEM, self.num_items - self.counts[y])
        neg = int(self.order[r if r < self.start[y] else r + self.counts[y]])
      else:
        rc = below(_NEG_CLASS, self.present.size - 1)
        c = int(self.present[rc + (rc >= self.class_rank[y])])
        neg = int(self.order[self.start[c] + below(_NEG_ITEM, self.counts[c])])
      out += [neg, other(neg, _NEGATIVE2)]
    return np.array(out, np.int64)

  def _draw_many(self, epoch: int, pos: np.ndarray) -> np.ndarray:
    a = self._anchors(epoch, pos)
    cols = [a]
    if self.num_branches >= 2:
      cols.append(self._same_class_other(a, _hash(self.seed, epoch, pos, _POSITIVE)))
    if self.num_branches == 4:
      neg = self._negatives(epoch, pos, a)
      cols += [neg, self._same_class_other(neg, _hash(self.seed, epoch, pos, _NEGATIVE2))]
    return np.stack(cols, axis=1)

  # ---- public --------------------------------------------------------------------------------
  def _check_epoch(self, epoch) -> int:
    if int(epoch) != epoch or epoch < 0:
      raise ValueError(f"BranchSampler: epoch must be a non-negative integer, got {epoch}")
    return int(epoch)

  def draw(self, epoch: int, position: int) -> np.ndarray:
    """The (num_branches,) int64 source indices at ``position`` of ``epoch``."""
    epoch = self._check_epoch(epoch)
    if not 0 <= position < self.epoch_length:
      raise ValueError(f"BranchSampler: position {position} outside 0..{self.epoch_length - 1}")
    return self._draw_one(epoch, int(position))

  def epoch_indices(self, epoch: int) -> np.ndarray:
    """All tuples of an epoch, (epoch_length, num_branches) int64; equals stacking draw()."""
    epoch = self._check_epoch(epoch)
    return self._draw_many(epoch, np.arange(self.epoch_length, dtype=np.int64))

  def __len__(self) -> int:
    return self.epoch_length

  def __repr__(self) -> str:
    return (f"BranchSampler(items={self.num_items}, classes={self.num_classes}, "
            f"branches={self.num_branches}, anchors={self.anchors!r}, "
            f"negatives={self.negatives!r}, epoch_length={self.epoch_length})")

