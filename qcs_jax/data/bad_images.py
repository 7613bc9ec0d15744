"""The bad-image policy shared by host-mode and device-mode batches.

``data.on_bad_image``: 'error' raises a ``DataError`` naming the file; 'skip'
replaces a bad training image by a deterministic other image of the same
class (``StandIns``: the candidates are drawn from ``(seed, epoch, position,
branch)``, so host and device batches pick the same stand-in) and masks a bad
evaluation image out.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from qcs_jax.data.sources import DataError

_REPLACE_KEY = 0x52504c43   # separates the replacement draws of skipped images
_MAX_REPLACEMENTS = 16
BAD_IMAGE_ERRORS = (DataError, OSError, ValueError)
ON_BAD_IMAGE = ("error", "skip")
SKIP_HINT = " (--config.data.on_bad_image=skip skips bad images and counts them)"


def get(cfg: Mapping[str, Any] | Any, key: str, default: Any = None) -> Any:
  """cfg.key for a ConfigDict or dict, default when absent."""
  getter = getattr(cfg, "get", None)
  return getter(key, default) if getter is not None else getattr(cfg, key, default)


def keyed_rng(*key: int) -> np.random.Generator:
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


def describe(source: Any, i: int) -> str:
  return source.describe(i) if hasattr(source, "describe") else f"item {i}"


def named_error(source: Any, i: int, err: Exception) -> DataError:
  """A DataError that names item i's file (as a source's own DataError usually does)."""
  where = describe(source, i)
  if isinstance(err, DataError) and where.split(" (", 1)[0] in str(err):
    return err
  return DataError(f"bad image {where}: {type(err).__name__}: {err}")


def bad_reason(source: Any, i: int) -> str:
  """One line naming item i and what is wrong; re-decodes it (workers pass only indices)."""
  try:
    source[i]
  except BAD_IMAGE_ERRORS as e:
    return str(named_error(source, i, e)).splitlines()[0]
  return f"{describe(source, i)}: decoded, but its transform failed"


class StandIns:
  """Same-class stand-ins for bad training images, a pure function of the draw's key."""

  def __init__(self, source: Any, labels: np.ndarray, seed: int):
    self.source = source
    self.labels = labels
    self.seed = seed
    self._members = None   # per-class index arrays, built on the first skip

  def candidates(self, i: int, epoch: int, position: int, branch: int) -> np.ndarray:
    """A deterministic list of other images of i's class to try instead of i."""
    if self._members is None:
      order = np.argsort(self.labels, kind="stable")
      bounds = np.searchsorted(self.labels[order], np.arange(self.labels.max() + 2))
      self._members = [order[bounds[k]:bounds[k + 1]] for k in range(len(bounds) - 1)]
    pool = self._members[self.labels[i]]
    pool = pool[pool != i]
    rng = keyed_rng(_REPLACE_KEY, self.seed, epoch, position, branch)
    return rng.choice(pool, size=min(len(pool), _MAX_REPLACEMENTS), replace=False)

  def replace(self, i: int, epoch: int, position: int, branch: int,
              load: Callable[[int], bool], bad: list[int]) -> int:
    """The first candidate for bad image i that `load(j)` accepts; the rejected go to bad."""
    candidates = self.candidates(i, epoch, position, branch)
    for j in candidates.tolist():
      if load(j):
        return j
      bad.append(j)
    if not len(candidates):
      raise DataError(f"bad image {describe(self.source, i)}: no other image of class "
                      f"{self.labels[i]} to use in its place")
    raise DataError(f"bad image {describe(self.source, i)} (class {self.labels[i]}): the "
                    f"{len(candidates)} other images of its class tried in its place are "
                    f"bad too")
