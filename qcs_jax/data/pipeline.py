"""grain wiring: sampler -> decode -> transforms -> batches.

One grain element is one whole batch: ``MapDataset.range(...).map(step_fn)``
where ``step_fn`` draws the branch indices of the batch's ``batch_size``
anchors (``BranchSampler.draw(epoch, position)``), decodes and augments every
image with a generator keyed by ``(seed, epoch, position, branch)`` and
writes it straight into a preallocated float32 array (no per-image Python
objects beyond decode + augment, no stacking). A batch is therefore a pure
function of ``(seed, epoch, step)``: two iterators agree, a run resumed at
``start_step`` sees exactly the batches it would have seen, and the number of
worker processes changes nothing but speed.

``data_cfg.workers`` = 0 runs in the calling process (one prefetch thread);
> 0 runs ``workers`` grain worker processes (``mp_prefetch``: spawned, each
producing whole batches into shared memory, in order). Starting workers costs
seconds (each imports grain, which imports jax), so ``train_batches`` can
span several epochs (``num_epochs``) with one set of workers.

Bad images (``data_cfg.on_bad_image``): 'error' raises a ``DataError`` naming
the file (also from a worker process); 'skip' replaces a training image by a
deterministic other image of the same class and masks an evaluation image
out. Every skip is counted on the iterator (``num_skipped``, ``bad_items``)
and logged once per file with its name.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterator, Mapping

from absl import flags
import grain
import numpy as np

from qcs_jax.data import sampling
from qcs_jax.data import transforms
from qcs_jax.data.sources import DataError

log = logging.getLogger(__name__)

_AUGMENT_KEY = 0x41554720   # separates the augmentation streams from other seeded draws
_REPLACE_KEY = 0x52504c43   # ... and the replacement draws of skipped images
_MAX_REPLACEMENTS = 16
_BAD_IMAGE_ERRORS = (DataError, OSError, ValueError)
ON_BAD_IMAGE = ("error", "skip")
_SKIP_HINT = " (--config.data.on_bad_image=skip skips bad images and counts them)"


def _get(cfg: Mapping[str, Any] | Any, key: str, default: Any = None) -> Any:
  """cfg.key for a ConfigDict or dict, default when absent."""
  getter = getattr(cfg, "get", None)
  return getter(key, default) if getter is not None else getattr(cfg, key, default)


def _rng(*key: int) -> np.random.Generator:
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


def augment_rng(seed: int, epoch: int, position: int, branch: int) -> np.random.Generator:
  """The generator that augments branch `branch` of anchor `position` in `epoch`."""
  return _rng(_AUGMENT_KEY, seed, epoch, position, branch)


def process_rows(batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
  """Rows [lo, hi) of a global batch that process `process_index` of `process_count` builds.

  Contiguous equal blocks in process order, the order in which
  ``jax.make_array_from_process_local_data`` places them on a ``data`` mesh.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process index {process_index} outside 0..{process_count - 1}")
  if batch_size % process_count:
    raise ValueError(f"a global batch of {batch_size} does not divide among "
                     f"{process_count} processes")
  per = batch_size // process_count
  return process_index * per, (process_index + 1) * per


def steps_per_epoch(sampler: Any, batch_size: int) -> int:
  """Full batches per epoch (the last incomplete batch is dropped)."""
  return int(sampler.epoch_length) // int(batch_size)


def make_sampler(source: Any, data_cfg: Any, num_branches: int, seed: int):
  """The BranchSampler of a training source under data_cfg's sampling options."""
  return sampling.BranchSampler(
      np.asarray(source.labels), num_branches, seed,
      anchors=_get(data_cfg, "anchors", "shuffle"),
      negatives=_get(data_cfg, "negatives", "random"),
      epoch_fraction=float(_get(data_cfg, "epoch_fraction", 1.0)))


def _named_error(source: Any, i: int, err: Exception) -> DataError:
  """A DataError that names item i's file (as a source's own DataError usually does)."""
  where = _describe(source, i)
  if isinstance(err, DataError) and where.split(" (", 1)[0] in str(err):
    return err
  return DataError(f"bad image {where}: {type(err).__name__}: {err}")


def _check_options(data_cfg: Any) -> tuple[str, int]:
  on_bad = _get(data_cfg, "on_bad_image", "error")
  if on_bad not in ON_BAD_IMAGE:
    raise ValueError(f"data.on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad!r}")
  workers = int(_get(data_cfg, "workers", 0))
  if workers < 0:
    raise ValueError(f"data.workers must be >= 0, got {workers}")
  return on_bad, workers


class _TrainStep:
  """Batch number g -> step g % num_steps of epoch first_epoch + g // num_steps.

  Picklable: it runs in grain worker processes.
  """

  def __init__(self, source, sampler, transform, batch_size, num_branches, seed, first_epoch,
               num_steps, on_bad_image, part=(0, 1)):
    self.source = source
    self.part = part
    self.sampler = sampler
    self.transform = transform
    self.batch_size = batch_size
    self.num_branches = num_branches
    self.seed = seed
    self.first_epoch = first_epoch
    self.num_steps = num_steps
    self.skip = on_bad_image == "skip"
    self.labels = np.asarray(source.labels, dtype=np.int32)
    self._members = None   # per-class index arrays, built on the first skip
    self._known_bad: set[int] = set()

  def _load_into(self, i: int, rng: np.random.Generator, out: np.ndarray) -> bool:
    """Transforms image i into out; False if it is bad and bad images are skipped."""
    if i in self._known_bad:
      return False
    try:
      self.transform(self.source[i]["image"], rng, out=out)
      return True
    except _BAD_IMAGE_ERRORS as e:
      if not self.skip:
        raise DataError(f"{_named_error(self.source, i, e)}{_SKIP_HINT}") from e
      self._known_bad.add(i)
      return False

  def _replacements(self, i: int, epoch: int, position: int, branch: int) -> np.ndarray:
    """A deterministic list of other images of i's class to try instead of i."""
    if self._members is None:
      order = np.argsort(self.labels, kind="stable")
      bounds = np.searchsorted(self.labels[order], np.arange(self.labels.max() + 2))
      self._members = [order[bounds[k]:bounds[k + 1]] for k in range(len(bounds) - 1)]
    pool = self._members[self.labels[i]]
    pool = pool[pool != i]
    rng = _rng(_REPLACE_KEY, self.seed, epoch, position, branch)
    return rng.choice(pool, size=min(len(pool), _MAX_REPLACEMENTS), replace=False)

  def _replace(self, i: int, epoch: int, position: int, branch: int, out: np.ndarray,
               bad: list[int]) -> int:
    """Loads a same-class stand-in for bad image i into out; returns its index."""
    candidates = self._replacements(i, epoch, position, branch)
    for j in candidates.tolist():
      if self._load_into(j, augment_rng(self.seed, epoch, position, branch), out):
        return j
      bad.append(j)
    if not len(candidates):
      raise DataError(f"bad image {_describe(self.source, i)}: no other image of class "
                      f"{self.labels[i]} to use in its place")
    raise DataError(f"bad image {_describe(self.source, i)} (class {self.labels[i]}): the "
                    f"{len(candidates)} other images of its class tried in its place are "
                    f"bad too")

  def __call__(self, g: int) -> dict[str, np.ndarray]:
    epoch, step = self.first_epoch + int(g) // self.num_steps, int(g) % self.num_steps
    b, nb, s = self.batch_size, self.num_branches, self.transform.img_size
    lo, hi = process_rows(b, *self.part)
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


class _EvalStep:
  """batch number -> one padded evaluation batch with a mask."""

  def __init__(self, source, transform, batch_size, on_bad_image, part=(0, 1)):
    self.source = source
    self.part = part
    self.transform = transform
    self.batch_size = batch_size
    self.skip = on_bad_image == "skip"
    self.labels = np.asarray(source.labels, dtype=np.int32)

  def __call__(self, batch: int) -> dict[str, np.ndarray]:
    b, s, n = self.batch_size, self.transform.img_size, len(self.labels)
    lo, hi = process_rows(b, *self.part)
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
      except _BAD_IMAGE_ERRORS as e:
        if not self.skip:
          raise DataError(f"{_named_error(self.source, i, e)}{_SKIP_HINT}") from e
        images[a] = 0.0
        bad.append(i)
    return {"image": images, "label": label, "index": index, "mask": mask,
            "bad": np.asarray(bad, np.int64)}


def _ensure_flags_parsed() -> None:
  """grain's worker start-up reads absl flags: outside absl.app, use their defaults."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _describe(source: Any, i: int) -> str:
  return source.describe(i) if hasattr(source, "describe") else f"item {i}"


def _bad_reason(source: Any, i: int) -> str:
  """One line naming item i and what is wrong; re-decodes it (workers pass only indices)."""
  try:
    source[i]
  except _BAD_IMAGE_ERRORS as e:
    return str(_named_error(source, i, e)).splitlines()[0]
  return f"{_describe(source, i)}: decoded, but its transform failed"


class _Batches(Iterator[dict]):
  """Iterates a grain pipeline of whole batches; counts and logs skipped images."""

  def __init__(self, source: Any, workers: int):
    self.source = source
    self.workers = workers
    self.num_skipped = 0                    # bad-image events (replaced or masked)
    self.bad_items: dict[int, str] = {}     # source index -> file, each bad item once
    self.bad_reasons: dict[int, str] = {}   # source index -> one line: file and what is wrong
    self._it = None

  def _dataset(self) -> grain.IterDataset:
    raise NotImplementedError

  def _start(self) -> None:
    ds = self._dataset()
    if self.workers > 0:
      _ensure_flags_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers,
                                                       per_worker_buffer_size=2))
    self._it = iter(ds)

  def _pipeline(self, step_fn, start: int, stop: int) -> grain.IterDataset:
    ds = grain.MapDataset.range(start, max(start, stop)).map(step_fn)
    # In-process: one thread prepares the next batch while the caller works.
    # In a worker process: the worker itself is the prefetcher.
    threads = 1 if self.workers == 0 else 0
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                prefetch_buffer_size=threads))

  def _record(self, bad: np.ndarray) -> None:
    for i in np.asarray(bad).tolist():
      self.num_skipped += 1
      if i not in self.bad_items:
        self.bad_items[i] = _describe(self.source, i)
        self.bad_reasons[i] = _bad_reason(self.source, i)
        log.warning("skipping bad image %s (%d skipped so far)", self.bad_reasons[i],
                    self.num_skipped)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if len(self) <= 0:
      self.close()
      raise StopIteration
    if self._it is None:
      self._start()
    batch = dict(next(self._it))
    self._record(batch.pop("bad"))
    self._advance()
    return batch

  def _advance(self) -> None:
    pass

  def close(self) -> None:
    """Stops worker processes (also done on garbage collection)."""
    it, self._it = self._it, None
    if it is not None and hasattr(it, "close"):
      it.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass


class TrainBatches(_Batches):
  """Training batches from (epoch, start_step) to the end of epoch + num_epochs - 1.

  ``epoch`` / ``step`` (and ``get_state()``) say which batch comes next; after
  the last batch of an epoch that is (epoch + 1, 0). One iterator may span
  several epochs (``num_epochs``) so that worker processes are started once.
  """

  def __init__(self, source, data_cfg, img_size, num_branches, seed, epoch, start_step=0,
               num_epochs=1, part=(0, 1)):
    on_bad, workers = _check_options(data_cfg)
    super().__init__(source, workers)
    if int(seed) < 0:
      raise ValueError(f"seed must be >= 0, got {seed}")
    if int(epoch) < 0 or int(num_epochs) < 1:
      raise ValueError(f"need epoch >= 0 and num_epochs >= 1, got {epoch}, {num_epochs}")
    self.seed, self.num_branches = int(seed), int(num_branches)
    self.first_epoch, self.num_epochs = int(epoch), int(num_epochs)
    self.batch_size = int(_get(data_cfg, "batch_size"))
    if self.batch_size < 1:
      raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
    process_rows(self.batch_size, *part)  # checks that the batch divides
    self.part = tuple(part)
    self.sampler = make_sampler(source, data_cfg, self.num_branches, self.seed)
    self.num_steps = steps_per_epoch(self.sampler, self.batch_size)
    if self.num_steps == 0:
      raise ValueError(f"{getattr(source, 'name', 'source')}: an epoch of "
                       f"{self.sampler.epoch_length} anchors holds no full batch of "
                       f"{self.batch_size}")
    self.transform = transforms.build_transform(_get(data_cfg, "augment"), img_size, train=True)
    self._on_bad = on_bad
    self._total = self.num_epochs * self.num_steps
    self._next = self._position(self.first_epoch, start_step)  # batches from (epoch, 0)

  def _position(self, epoch: int, step: int) -> int:
    g = (int(epoch) - self.first_epoch) * self.num_steps + int(step)
    if not (0 <= int(step) <= self.num_steps and 0 <= g <= self._total):
      last = self.first_epoch + self.num_epochs - 1
      raise ValueError(f"(epoch {epoch}, step {step}) is outside this pipeline: epochs "
                       f"{self.first_epoch}..{last} of {self.num_steps} steps")
    return g

  @property
  def epoch(self) -> int:
    return self.first_epoch + self._next // self.num_steps

  @property
  def step(self) -> int:
    return self._next % self.num_steps

  def _dataset(self):
    fn = _TrainStep(self.source, self.sampler, self.transform, self.batch_size,
                    self.num_branches, self.seed, self.first_epoch, self.num_steps,
                    self._on_bad, self.part)
    return self._pipeline(fn, self._next, self._total)

  def _advance(self) -> None:
    self._next += 1

  def __len__(self) -> int:
    return self._total - self._next

  def get_state(self) -> dict[str, int]:
    """Where the iterator is: the next batch it yields is step `step` of `epoch`."""
    return {"seed": self.seed, "epoch": self.epoch, "step": self.step}

  def set_state(self, state: Mapping[str, int]) -> None:
    """Moves to a state from get_state (restarts the workers)."""
    if int(state.get("seed", self.seed)) != self.seed:
      raise ValueError(f"state of seed {state['seed']} restored into a pipeline of seed "
                       f"{self.seed}")
    g = self._position(state["epoch"], state["step"])
    self.close()
    self._next = g


class EvalBatches(_Batches):
  """The padded batches of a whole split; see eval_batches."""

  def __init__(self, source, data_cfg, img_size, batch_size, part=(0, 1)):
    on_bad, workers = _check_options(data_cfg)
    super().__init__(source, workers)
    self.batch_size = int(batch_size)
    if self.batch_size < 1:
      raise ValueError(f"eval batch size must be >= 1, got {self.batch_size}")
    process_rows(self.batch_size, *part)
    self.part = tuple(part)
    self.num_batches = math.ceil(len(source) / self.batch_size)
    self.transform = transforms.build_transform(_get(data_cfg, "augment"), img_size, train=False)
    self._on_bad = on_bad
    self._done = 0

  def _dataset(self):
    fn = _EvalStep(self.source, self.transform, self.batch_size, self._on_bad, self.part)
    return self._pipeline(fn, 0, self.num_batches)

  def _advance(self) -> None:
    self._done += 1

  def __len__(self) -> int:
    return self.num_batches - self._done


def train_batches(source: Any, data_cfg: Any, img_size: int, num_branches: int, seed: int,
                  epoch: int, start_step: int = 0, num_epochs: int = 1,
                  part: tuple[int, int] = (0, 1)) -> TrainBatches:
  """Batches of one epoch, steps start_step..steps_per_epoch-1 (then of the next
  num_epochs - 1 epochs, from step 0, in the same worker processes).

  Each is dict(image float32 (B, nb, S, S, 3), label int32 (B, nb), index int32
  (B, nb)), B = data_cfg.batch_size anchors; branch k of anchor p is
  BranchSampler(...).draw(epoch, p)[k] (QCS labels: y, y, y_neg, y_neg)
  augmented by data_cfg.augment with augment_rng(seed, epoch, p, k).

  ``part=(i, P)``: process i of P builds only rows process_rows(B, i, P) of every
  batch (B / P anchors); the P parts are disjoint and together the global batch.
  """
  return TrainBatches(source, data_cfg, img_size, num_branches, seed, epoch, start_step,
                      num_epochs, part)


def eval_batches(source: Any, data_cfg: Any, img_size: int, batch_size: int,
                 part: tuple[int, int] = (0, 1)) -> EvalBatches:
  """The whole split in order: dict(image (B, S, S, 3), label (B,), index (B,), mask (B,)).

  The last batch is padded (mask False, index -1, label 0, image 0); with
  on_bad_image='skip' a bad image is masked out too (its label and index kept).
  ``part=(i, P)``: only rows process_rows(batch_size, i, P) of every batch.
  """
  return EvalBatches(source, data_cfg, img_size, batch_size, part)
