"""grain wiring: sampler -> decode -> transforms -> batches.

One grain element is one whole batch: ``MapDataset.range(...).map(step_fn)``
where ``step_fn`` draws the branch indices of the batch's ``batch_size``
anchors (``BranchSampler.draw(epoch, position)``) and fills the batch:
``data.augment_on='host'`` (host_batches) decodes and augments every image
into float32 with a generator keyed by ``(seed, epoch, position, branch)``;
``'device'`` (device_batches) gathers uint8 images from the image cache
(image_cache, built once when the iterator is made) and leaves the random
augmentation to the jitted step. A batch is therefore a pure
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

from qcs_jax import runtime
from qcs_jax.data import bad_images, device_batches, host_batches, sampling, transforms
from qcs_jax.data.host_batches import augment_rng  # pylint: disable=unused-import

log = logging.getLogger(__name__)

AUGMENT_ON = ("auto", "host", "device")


def resolve_augment_on(value: str, platform: str | None = None) -> str:
  """'auto' -> 'device' on an accelerator, 'host' on CPU (runtime.expected_platform());
  'host' and 'device' as given."""
  if value not in AUGMENT_ON:
    raise ValueError(f"data.augment_on must be one of {AUGMENT_ON}, got {value!r}")
  if value != "auto":
    return value
  return "host" if (platform or runtime.expected_platform()) == "cpu" else "device"
ON_BAD_IMAGE = bad_images.ON_BAD_IMAGE
_get = bad_images.get


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


def _check_options(data_cfg: Any) -> tuple[str, int, bool]:
  """(on_bad_image, workers, whether images come from the uint8 cache)."""
  on_bad = _get(data_cfg, "on_bad_image", "error")
  if on_bad not in ON_BAD_IMAGE:
    raise ValueError(f"data.on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad!r}")
  workers = int(_get(data_cfg, "workers", 0))
  if workers < 0:
    raise ValueError(f"data.workers must be >= 0, got {workers}")
  return on_bad, workers, resolve_augment_on(_get(data_cfg, "augment_on", "auto")) == "device"


def _ensure_flags_parsed() -> None:
  """grain's worker start-up reads absl flags: outside absl.app, use their defaults."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class _Batches(Iterator[dict]):
  """Iterates a grain pipeline of whole batches; counts and logs skipped images."""

  def __init__(self, source: Any, workers: int):
    self.source = source
    self.workers = workers
    self.cache = None   # device mode: the image_cache.ImageCache batches are gathered from
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
        self.bad_items[i] = bad_images.describe(self.source, i)
        self.bad_reasons[i] = self._reason(i)
        log.warning("skipping bad image %s (%d skipped so far)", self.bad_reasons[i],
                    self.num_skipped)

  def _reason(self, i: int) -> str:
    if self.cache is not None:
      return self.cache.bad[i]
    return bad_images.bad_reason(self.source, i)

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
    on_bad, workers, device = _check_options(data_cfg)
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
    if device:
      self.cache = device_batches.open_cache(source, data_cfg, img_size, True, workers)
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
    if self.cache is not None:
      fn = device_batches.CachedTrainStep(
          self.cache, self.source, self.sampler, self.batch_size, self.num_branches, self.seed,
          self.first_epoch, self.num_steps, self._on_bad, process_rows(self.batch_size, *self.part))
    else:
      fn = host_batches.TrainStep(
          self.source, self.sampler, self.transform, self.batch_size, self.num_branches,
          self.seed, self.first_epoch, self.num_steps, self._on_bad,
          process_rows(self.batch_size, *self.part))
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
    on_bad, workers, device = _check_options(data_cfg)
    super().__init__(source, workers)
    self.batch_size = int(batch_size)
    if self.batch_size < 1:
      raise ValueError(f"eval batch size must be >= 1, got {self.batch_size}")
    process_rows(self.batch_size, *part)
    self.part = tuple(part)
    self.num_batches = math.ceil(len(source) / self.batch_size)
    self.transform = transforms.build_transform(_get(data_cfg, "augment"), img_size, train=False)
    if device:
      self.cache = device_batches.open_cache(source, data_cfg, img_size, False, workers)
    self._on_bad = on_bad
    self._done = 0

  def _dataset(self):
    if self.cache is not None:
      fn = device_batches.CachedEvalStep(self.cache, self.source, self.batch_size, self._on_bad,
                                         process_rows(self.batch_size, *self.part))
    else:
      fn = host_batches.EvalStep(self.source, self.transform, self.batch_size, self._on_bad,
                                 process_rows(self.batch_size, *self.part))
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
  data_cfg.augment_on='device': image is the cached uint8 (B, nb, R, R, 3), not
  yet augmented, plus epoch and position int32 (B,) (p of each row, its
  augmentation key); see device_batches.

  ``part=(i, P)``: process i of P builds only rows process_rows(B, i, P) of every
  batch (B / P anchors); the P parts are disjoint and together the global batch.
  """
  return TrainBatches(source, data_cfg, img_size, num_branches, seed, epoch, start_step,
                      num_epochs, part)


def eval_batches(source: Any, data_cfg: Any, img_size: int, batch_size: int,
                 part: tuple[int, int] = (0, 1)) -> EvalBatches:
  """The whole split in order: dict(image (B, S, S, 3), label (B,), index (B,), mask (B,)).

  image is float32 normalised, or with data_cfg.augment_on='device' the cached
  uint8 (resized and centre-cropped, to be normalised on the device).
  The last batch is padded (mask False, index -1, label 0, image 0); with
  on_bad_image='skip' a bad image is masked out too (its label and index kept).
  ``part=(i, P)``: only rows process_rows(batch_size, i, P) of every batch.
  """
  return EvalBatches(source, data_cfg, img_size, batch_size, part)
