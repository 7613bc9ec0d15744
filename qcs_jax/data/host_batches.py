"""Batch builders of data.augment_on='host': decode and augment every image on the host.

Each image is decoded and augmented with a generator keyed by ``(seed, epoch,
position, branch)`` and written straight into a preallocated float32 array
(no per-image Python objects beyond decode + augment, no stacking).
"""
from __future__ import annotations

import numpy as np

from qcs_jax.data.bad_images import (BAD_IMAGE_ERRORS, SKIP_HINT, StandIns, keyed_rng,
                                     named_error)
from qcs_jax.data.sources import DataError

_AUGMENT_KEY = 0x41554720   # separates the augmentation streams from other seeded draws


def augment_rng(seed: int, epoch: int, position: int, branch: int) -> np.random.Generator:
  """The generator that augments branch `branch` of anchor `position` in `epoch`."""
  return keyed_rng(_AUGMENT_KEY, seed, epoch, position, branch)


class TrainStep:
  """Batch number g -> step g % num_steps of epoch first_epoch + g // num_steps.

  Picklable: it runs in grain worker processes.
  """

  def __init__(self, source, sampler, transform, batch_size, num_branches, seed, first_epoch,
               num_steps, on_bad_image, rows):
    self.source = source
    self.rows = rows   # [lo, hi) of the global batch (pipeline.process_rows)
    self.sampler = sampler
    self.transform = transform
    self.batch_size = batch_size
    self.num_branches = num_branches
    self.seed = seed
    self.first_epoch = first_epoch
    self.num_steps = num_steps
    self.skip = on_bad_image == "skip"
    self.labels = np.asarray(source.labels, dtype=np.int32)
    self.stand_ins = StandIns(source, self.labels, seed)
    self._known_bad: set[int] = set()

  def _load_into(self, i: int, rng: np.random.Generator, out: np.ndarray) -> bool:
    """Transforms image i into out; False if it is bad and bad images are skipped."""
    if i in self._known_bad:
      return False
    try:
      self.transform(self.source[i]["image"], rng, out=out)
      return True
    except BAD_IMAGE_ERRORS as e:
      if not self.skip:
        raise DataError(f"{named_error(self.source, i, e)}{SKIP_HINT}") from e
      self._known_bad.add(i)
      return False

  def _replace(self, i: int, epoch: int, position: int, branch: int, out: np.ndarray,
               bad: list[int]) -> int:
    """Loads a same-class stand-in for bad image i into out; returns its index."""
    return self.stand_ins.replace(
        i, epoch, position, branch,
        lambda j: self._load_into(j, augment_rng(self.seed, epoch, position, branch), out), bad)

  def __call__(self, g: int) -> dict[str, np.ndarray]:
    epoch, step = self.first_epoch + int(g) // self.num_steps, int(g) % self.num_steps
    b, nb, s = self.batch_size, self.num_branches, self.transform.img_size
    lo, hi = self.rows
    images = np.empty((hi - lo, nb, s, s, 3), np.float32)
    index = np.empty((hi - lo, nb), np.int32)
    bad = []
    for a in range(hi - lo):
      position = step * b + lo + a
      drawn = np.asarray(self.sampler.draw(epoch, position))
      for k in range(nb):
        i = int(drawn[k])
        if not self._load_into(i, augment_rng(self.seed, epoch, position, k), images[a, k]):
          bad.append(i)
          i = self._replace(i, epoch, position, k, images[a, k], bad)
        index[a, k] = i
    return {"image": images, "label": self.labels[index], "index": index,
            "bad": np.asarray(bad, np.int64)}


class EvalStep:
  """batch number -> one padded evaluation batch with a mask."""

  def __init__(self, source, transform, batch_size, on_bad_image, rows):
    self.source = source
    self.rows = rows
    self.transform = transform
    self.batch_size = batch_size
    self.skip = on_bad_image == "skip"
    self.labels = np.asarray(source.labels, dtype=np.int32)

  def __call__(self, batch: int) -> dict[str, np.ndarray]:
    b, s, n = self.batch_size, self.transform.img_size, len(self.labels)
    lo, hi = self.rows
    images = np.zeros((hi - lo, s, s, 3), np.float32)
    label = np.zeros((hi - lo,), np.int32)
    index = np.full((hi - lo,), -1, np.int32)
    mask = np.zeros((hi - lo,), bool)
    bad = []
    for a in range(hi - lo):
      i = int(batch) * b + lo + a
      if i >= n:
        break
      label[a], index[a] = self.labels[i], i
      try:
        self.transform(self.source[i]["image"], None, out=images[a])
        mask[a] = True
      except BAD_IMAGE_ERRORS as e:
        if not self.skip:
          raise DataError(f"{named_error(self.source, i, e)}{SKIP_HINT}") from e
        images[a] = 0.0
        bad.append(i)
    return {"image": images, "label": label, "index": index, "mask": mask,
            "bad": np.asarray(bad, np.int64)}
