"""Batch builders of data.augment_on='device': uint8 images gathered from the image cache.

The host only picks items (the same ``BranchSampler`` draws and the same
same-class stand-ins for bad items as host mode) and copies their cached
pixels; the random augmentation runs in the jitted step, keyed by each row's
``epoch`` and global anchor ``position`` (and the branch), so a batch is
still a pure function of (seed, epoch, step).

Training batch: image uint8 (B_local, nb, H, W, 3) (the resized, not yet
augmented image), label / index int32 (B_local, nb), epoch / position int32
(B_local,). Evaluation batch: image uint8 (B_local, S, S, 3) (resized and
centre-cropped), label, index, mask as in host mode.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from qcs_jax.data import bad_images, image_cache
from qcs_jax.data.sources import DataError

# How the cache is built with data.workers > 0 (tools/benchmark_input.py --cache-build
# measures threads against processes).
BUILD_PARALLEL = "threads"


def open_cache(source: Any, data_cfg: Any, img_size: int, train: bool,
               workers: int) -> image_cache.ImageCache:
  """The (built if needed) cache of source for the data config's augment recipe."""
  lay = image_cache.layout(bad_images.get(data_cfg, "augment"), img_size, train)
  return image_cache.ensure_cache(source, lay, bad_images.get(data_cfg, "cache_dir", "") or None,
                                  workers=workers, parallel=BUILD_PARALLEL)


class CachedTrainStep:
  """Batch number g -> the uint8 batch of step g % num_steps of epoch first_epoch + g // num_steps.

  Picklable (runs in grain worker processes): the cache is mapped again there.
  """

  def __init__(self, cache: image_cache.ImageCache, source: Any, sampler: Any, batch_size: int,
               num_branches: int, seed: int, first_epoch: int, num_steps: int,
               on_bad_image: str, rows: tuple[int, int]):
    self.cache = cache
    self.sampler = sampler
    self.batch_size, self.num_branches = batch_size, num_branches
    self.first_epoch, self.num_steps = first_epoch, num_steps
    self.skip = on_bad_image == "skip"
    self.rows = rows   # [lo, hi) of the global batch (pipeline.process_rows)
    self.labels = np.asarray(source.labels, dtype=np.int32)
    self.is_bad = cache.bad_mask
    self.stand_ins = bad_images.StandIns(source, self.labels, seed)

  def _good(self, i: int) -> bool:
    if not self.is_bad[i]:
      return True
    if not self.skip:
      raise DataError(f"{self.cache.bad[i]}{bad_images.SKIP_HINT}")
    return False

  def __call__(self, g: int) -> dict[str, np.ndarray]:
    epoch, step = self.first_epoch + int(g) // self.num_steps, int(g) % self.num_steps
    (lo, hi), b, nb = self.rows, self.batch_size, self.num_branches
    position = np.arange(step * b + lo, step * b + hi, dtype=np.int32)
    index = np.empty((hi - lo, nb), np.int32)
    bad = []
    for a, p in enumerate(position.tolist()):
      drawn = np.asarray(self.sampler.draw(epoch, p))
      for k in range(nb):
        i = int(drawn[k])
        if not self._good(i):
          bad.append(i)
          i = self.stand_ins.replace(i, epoch, p, k, self._good, bad)
        index[a, k] = i
    images = np.asarray(self.cache.array()[index.reshape(-1)])  # a copy, not a memmap
    return {"image": images.reshape(hi - lo, nb, *images.shape[1:]),
            "label": self.labels[index], "index": index,
            "epoch": np.full((hi - lo,), epoch, np.int32), "position": position,
            "bad": np.asarray(bad, np.int64)}


class CachedEvalStep:
  """batch number -> one padded uint8 evaluation batch with a mask."""

  def __init__(self, cache: image_cache.ImageCache, source: Any, batch_size: int,
               on_bad_image: str, rows: tuple[int, int]):
    self.cache = cache
    self.batch_size = batch_size
    self.skip = on_bad_image == "skip"
    self.rows = rows   # [lo, hi) of the global batch (pipeline.process_rows)
    self.labels = np.asarray(source.labels, dtype=np.int32)
    self.is_bad = cache.bad_mask

  def __call__(self, batch: int) -> dict[str, np.ndarray]:
    (lo, hi), n = self.rows, len(self.labels)
    first = int(batch) * self.batch_size
    items = np.arange(first + lo, min(first + hi, n), dtype=np.int32)
    bad = items[self.is_bad[items]]
    if len(bad) and not self.skip:
      raise DataError(f"{self.cache.bad[int(bad[0])]}{bad_images.SKIP_HINT}")
    c = self.cache
    images = np.zeros((hi - lo, c.height, c.width, 3), np.uint8)
    label = np.zeros((hi - lo,), np.int32)
    index = np.full((hi - lo,), -1, np.int32)
    mask = np.zeros((hi - lo,), bool)
    m = len(items)
    label[:m], index[:m], mask[:m] = self.labels[items], items, ~self.is_bad[items]
    good = np.flatnonzero(mask)
    images[good] = c.array()[items[good]]
    return {"image": images, "label": label, "index": index, "mask": mask,
            "bad": bad.astype(np.int64)}
