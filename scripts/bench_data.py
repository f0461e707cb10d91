"""Throughput of the Cityscapes-sized training pipeline; prints one JSON object.

Inputs are 1024x2048 synthetic scenes standing in for Cityscapes (pre-rendered once), run through
the full training augmentation (scale 0.5-2.0, pad, 512x1024 crop, flip, brightness, normalise)
and batched, with 0 and with 2 grain worker processes. `decode_png` runs the same with every image
stored as PNG bytes and decoded per record, as a prepared Cityscapes record is.

  python scripts/bench_data.py [--batches 12] [--batch_size 4] [--decode_png]
"""
import gc
import json
import os
import time

import psutil

from absl import app
from absl import flags

from pixcon_jax import cli
from pixcon_jax.data import pipeline
from pixcon_jax.data import datasets
from pixcon_jax.data import synthetic
from pixcon_jax.data import transforms

_BATCHES = flags.DEFINE_integer("batches", 16, "Timed batches per setting (after 2 warm-up).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 4, "Images per batch.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 4, "Distinct pre-rendered 1024x2048 scenes.")
_DECODE_PNG = flags.DEFINE_bool("decode_png", True, "Also measure with per-record PNG decoding.")
_WORKERS = flags.DEFINE_list("workers", ["0", "2"], "Worker counts to measure.")


def _cpu_seconds() -> float:
  """CPU time (user + system) of this process and all its live descendants (grain workers)."""
  total = 0.0
  me = psutil.Process()
  for p in [me] + me.children(recursive=True):
    try:
      t = p.cpu_times()
      total += t.user + t.system
    except psutil.Error:
      pass
  return total


def _measure(source, workers: int) -> dict:
  loader = pipeline.make_train_loader(
      source, crop_size=(512, 1024), augment=transforms.AugmentConfig(),
      batch_size_per_process=_BATCH_SIZE.value, seed=0, worker_count=workers, prefetch=2,
      read_threads=2)
  it = iter(loader)
  for _ in range(2):  # Warm-up: worker start, first allocations.
    next(it)
  t, c = time.perf_counter(), _cpu_seconds()
  for _ in range(_BATCHES.value):
    batch = next(it)
  dt, dc = time.perf_counter() - t, _cpu_seconds() - c
  assert batch["image"].shape == (_BATCH_SIZE.value, 512, 1024, 3)
  del it, batch, loader  # Stop the workers now, not in interpreter shutdown.
  gc.collect()
  n = _BATCHES.value * _BATCH_SIZE.value
  # Wall-clock rates depend on the machine's load; images per CPU-second is the per-core rate.
  return {"worker_count": workers, "images_per_s": round(n / dt, 2),
          "images_per_cpu_s": round(n / dc, 2), "cpu_s": round(dc, 2), "wall_s": round(dt, 2)}


def main(argv):
  del argv
  worker_counts = cli.int_list(_WORKERS.value, "workers", minimum=0)  # Before the rendering.
  examples = [synthetic.render(0, i, (1024, 2048)) for i in range(_NUM_IMAGES.value)]
  n = 100_000
  result = {"input_size": [1024, 2048], "crop_size": [512, 1024],
            "batch_size": _BATCH_SIZE.value, "cpu_count": os.cpu_count(), "arrays": [],
            "decode_png": []}
  for w in worker_counts:
    result["arrays"].append(_measure(datasets.InMemorySource(examples, n), w))
  if _DECODE_PNG.value:
    for w in worker_counts:
      result["decode_png"].append(
          _measure(datasets.InMemorySource(examples, n, encode_png=True), w))
  print(json.dumps(result))


if __name__ == "__main__":
  cli.run(main)
