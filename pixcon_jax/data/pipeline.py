"""grain pipelines: seeded, per-process sharded, batched training and padded evaluation iterators.

Training: `IndexSampler` (shuffled with `seed`, endless, shard `process_index` of `process_count`
with drop_remainder) -> `TrainAugment` (a `RandomMapTransform`: grain gives every record a
generator derived from (seed, record position), so the same seed gives the same batches whatever
the worker count) -> `Batch(batch_size_per_process)`. The returned `DataLoader` iterator supports
`get_state()` / `set_state()` (and `grain.python.PyGrainCheckpointSave/Restore` for orbax), so a
resumed run continues at the same example.

Evaluation: the split of N examples is padded to `num_batches * batch_size * process_count`
records, so every process runs the same number of batches; padding records repeat example 0 with
`valid=False`, `image_id=-1` and an all-ignore label. Images are padded to `data.eval_pad_size`.

Worker processes ignore SIGTERM and SIGINT: a signal to the process group (a job scheduler's
stop, Ctrl-C) is the trainer's to act on (it saves, then stops its workers); a worker killed by
it would fail the trainer's next batch instead. Each worker process unpickles the pipeline, and
the transforms' `__setstate__` sets that up (`ignore_stop_signals_in_worker`).
"""
from __future__ import annotations

import math
import multiprocessing
import signal
import threading
from typing import Any, Mapping

import grain.python as grain
import numpy as np

from pixcon_jax.data import datasets
from pixcon_jax.data import transforms
from pixcon_jax.data.classes import IGNORE_LABEL
from pixcon_jax.data.datasets import get_dataset_info


def ignore_stop_signals_in_worker() -> bool:
  """In a child process's main thread: SIGTERM and SIGINT ignored from now on. Returns whether.

  The trainer (the parent) stops its grain workers itself (`close_iterator`; grain kills the
  ones that do not stop), so nothing is lost.
  """
  if (multiprocessing.parent_process() is None
      or threading.current_thread() is not threading.main_thread()
      # A process that handles SIGTERM itself (a trainer started by multiprocessing) keeps it.
      or signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)):
    return False
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, signal.SIG_IGN)
  return True


class _WorkerIgnoresStopSignals:
  """Mixin: unpickled in a worker process (grain sends the pipeline pickled), that worker
  ignores SIGTERM and SIGINT."""

  def __setstate__(self, state: dict[str, Any]) -> None:
    ignore_stop_signals_in_worker()
    self.__dict__.update(state)


class TrainAugment(_WorkerIgnoresStopSignals, grain.RandomMapTransform):
  """Training augmentation of one record with grain's per-record generator."""

  def __init__(self, crop_size: tuple[int, int], cfg: transforms.AugmentConfig):
    self._crop_size = tuple(int(v) for v in crop_size)
    self._cfg = cfg

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    try:
      image, label = transforms.train_transform(
          element["image"], element["label"], rng, crop_size=self._crop_size, cfg=self._cfg)
    except ValueError as e:
      raise ValueError(f"example {int(element['image_id'])}: {e}") from e
    return {"image": image, "label": label, "image_id": np.int32(element["image_id"])}


class PaddedEvalSource(_WorkerIgnoresStopSignals):
  """Evaluation records padded to `total` examples, transformed for whole-image evaluation.

  Records: `image` float32 [Hp, Wp, 3], `label` int32 [Hp, Wp] (255 in padding), `image_id` int32
  (-1 for padding examples), `valid` bool.
  """

  def __init__(self, source, total: int, *, pad_size, resize, cfg: transforms.AugmentConfig):
    self._source, self._total = source, int(total)
    self._pad_size = tuple(pad_size) if pad_size is not None else None
    self._resize = tuple(resize) if resize is not None else None
    self._cfg = cfg

  def __len__(self) -> int:
    return self._total

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    valid = index < len(self._source)
    rec = self._source[index if valid else 0]
    try:
      image, label = transforms.eval_transform(rec["image"], rec["label"], pad_size=self._pad_size,
                                               resize=self._resize, cfg=self._cfg)
    except ValueError as e:
      raise ValueError(f"eval example {index}: {e}") from e
    if not valid:
      label = np.full_like(label, IGNORE_LABEL)
    return {"image": image, "label": label, "image_id": np.int32(index if valid else -1),
            "valid": np.bool_(valid)}


def _get(cfg: Mapping[str, Any], key: str, default: Any) -> Any:
  v = cfg.get(key, default)
  return default if v is None else v


def _check_process(process_index: int, process_count: int, batch_size_per_process: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
  if batch_size_per_process <= 0:
    raise ValueError(f"batch_size_per_process must be > 0, got {batch_size_per_process}")


def make_train_iterator(data_cfg: Mapping[str, Any], augment_cfg: Mapping[str, Any] | None, *,
                        batch_size_per_process: int, seed: int, process_index: int = 0,
                        process_count: int = 1, worker_count: int | None = None
                        ) -> grain.PyGrainDatasetIterator:
  """Endless iterator of training batches for this process.

  Args:
    data_cfg: `config.data`.
    augment_cfg: `config.augment` (None = defaults).
    batch_size_per_process: B, the global batch size / process_count.
    seed: shuffle + augmentation seed.
    process_index / process_count: this host's shard (jax.process_index / jax.process_count).
    worker_count: grain worker processes; None = `data_cfg.worker_count`.

  Yields:
    {"image": float32 [B, h, w, 3], "label": int32 [B, h, w], "image_id": int32 [B]}; the
    iterator has `get_state() -> bytes` and `set_state(bytes)`.
  """
  _check_process(process_index, process_count, batch_size_per_process)
  info = get_dataset_info(data_cfg["dataset"])
  source = datasets.make_source(data_cfg, _get(data_cfg, "train_split", info.train_split))
  loader = make_train_loader(
      source, crop_size=_get(data_cfg, "crop_size", info.crop_size),
      augment=transforms.AugmentConfig.from_config(augment_cfg),
      batch_size_per_process=batch_size_per_process, seed=seed, process_index=process_index,
      process_count=process_count,
      worker_count=int(_get(data_cfg, "worker_count", 0) if worker_count is None else worker_count),
      prefetch=int(_get(data_cfg, "prefetch", 2)), read_threads=int(_get(data_cfg, "read_threads", 4)))
  return iter(loader)


def make_train_loader(source, *, crop_size: tuple[int, int], augment: transforms.AugmentConfig,
                      batch_size_per_process: int, seed: int, process_index: int = 0,
                      process_count: int = 1, worker_count: int = 0, prefetch: int = 2,
                      read_threads: int = 4) -> grain.DataLoader:
  """The training `grain.DataLoader` over any random-access `source` (see make_train_iterator)."""
  _check_process(process_index, process_count, batch_size_per_process)
  sampler = grain.IndexSampler(
      num_records=len(source),
      shard_options=grain.ShardOptions(shard_index=process_index, shard_count=process_count,
                                       drop_remainder=True),
      shuffle=True, num_epochs=None, seed=int(seed))
  return grain.DataLoader(
      data_source=source, sampler=sampler,
      operations=[TrainAugment(crop_size, augment),
                  grain.Batch(batch_size_per_process, drop_remainder=True)],
      worker_count=worker_count, worker_buffer_size=prefetch,
      read_options=grain.ReadOptions(num_threads=read_threads,
                                     prefetch_buffer_size=max(8, 4 * batch_size_per_process)))


def num_eval_batches(num_examples: int, batch_size_per_process: int, process_count: int) -> int:
  """Batches every process runs to cover `num_examples` (the last global batch is padded)."""
  return max(1, math.ceil(num_examples / (batch_size_per_process * process_count)))


def make_eval_iterator(data_cfg: Mapping[str, Any], augment_cfg: Mapping[str, Any] | None, *,
                       batch_size_per_process: int, process_index: int = 0,
                       process_count: int = 1, worker_count: int | None = None,
                       split: str | None = None) -> grain.PyGrainDatasetIterator:
  """One pass over the evaluation split, the same number of batches on every process.

  Args:
    data_cfg: `config.data` (`eval_split`, `eval_pad_size`, `eval_resize`).
    augment_cfg: `config.augment` (only normalisation / bgr / pad value are used).
    batch_size_per_process: B.
    process_index / process_count: this host's shard.
    worker_count: grain worker processes; None = `data_cfg.worker_count`.
    split: overrides `data_cfg.eval_split`.

  Yields:
    {"image": float32 [B, Hp, Wp, 3], "label": int32 [B, Hp, Wp] (255 in padding),
     "image_id": int32 [B] (-1 for padding examples), "valid": bool [B]}.
  """
  _check_process(process_index, process_count, batch_size_per_process)
  info = get_dataset_info(data_cfg["dataset"])
  split = split or _get(data_cfg, "eval_split", info.val_split)
  source = datasets.make_source(data_cfg, split)
  nb = num_eval_batches(len(source), batch_size_per_process, process_count)
  total = nb * batch_size_per_process * process_count
  pad_size = data_cfg.get("eval_pad_size", None)
  if pad_size is None:  # The dataset's common size (synthetic: the rendered size).
    pad_size = (tuple(_get(data_cfg, "synthetic_size", info.eval_pad_size))
                if data_cfg["dataset"] == "synthetic" else info.eval_pad_size)
  padded = PaddedEvalSource(source, total, pad_size=pad_size,
                            resize=data_cfg.get("eval_resize", None),
                            cfg=transforms.AugmentConfig.from_config(augment_cfg))
  # Contiguous equal shards (total is a multiple of process_count): no example is dropped.
  sampler = grain.IndexSampler(
      num_records=total,
      shard_options=grain.ShardOptions(shard_index=process_index, shard_count=process_count,
                                       drop_remainder=True),
      shuffle=False, num_epochs=1, seed=0)
  loader = grain.DataLoader(
      data_source=padded, sampler=sampler,
      operations=[grain.Batch(batch_size_per_process, drop_remainder=False)],
      worker_count=int(_get(data_cfg, "worker_count", 0) if worker_count is None else worker_count),
      worker_buffer_size=int(_get(data_cfg, "prefetch", 2)),
      read_options=grain.ReadOptions(num_threads=int(_get(data_cfg, "read_threads", 4)),
                                     prefetch_buffer_size=max(8, 2 * batch_size_per_process)))
  return iter(loader)


def close_iterator(iterator: Any) -> None:
  """Stops a loader iterator's worker processes now, releasing its prefetched batches.

  Left to garbage collection at interpreter exit, grain's finalizers ran after the workers'
  queues were closed ("OSError: handle is closed" after a run's last line) and the batches
  still in flight stayed in shared memory. `grain.DataLoaderIterator` has no public close,
  so this closes the dataset iterator it wraps; safe to call twice.
  """
  inner = getattr(iterator, "_iterator", iterator)
  close = getattr(inner, "close", None)
  if callable(close):
    close()
