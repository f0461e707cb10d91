"""Dataset statistics: per-class pixel counts after id mapping, and frequency-derived weights."""
from __future__ import annotations

from typing import Any

import numpy as np

from pixcon_jax.data import datasets
from pixcon_jax.data.classes import IGNORE_LABEL
from pixcon_jax.data.datasets import get_dataset_info


def class_weights_from_counts(counts: np.ndarray) -> np.ndarray:
  """ENet-style weights 1 / ln(1.02 + p_c) from pixel frequencies p_c, rescaled to mean 1.

  Args:
    counts: [C] pixel counts.

  Returns:
    [C] float64 weights (absent classes get the weight of p = 0).
  """
  p = counts / max(1, counts.sum())
  w = 1.0 / np.log(1.02 + p)
  return w / w.mean()


def compute_stats(data_cfg: dict[str, Any], split: str, *, class_weights: bool = False,
                  max_examples: int | None = None) -> dict[str, Any]:
  """Pixel statistics of a split without augmentation.

  Returns a JSON-able dict: dataset, split, num_examples, pixel_counts {class name: count},
  ignored_pixels, total_pixels, and with `class_weights` the weights {class name: weight}.
  """
  info = get_dataset_info(data_cfg["dataset"])
  source = datasets.make_source(data_cfg, split)
  n = len(source) if max_examples is None else min(len(source), max_examples)
  counts = np.zeros((256,), np.int64)
  for i in range(n):
    counts += np.bincount(source[i]["label"].ravel(), minlength=256)
  per_class = counts[:info.num_classes]
  out = {
      "dataset": info.name, "split": split, "num_examples": n,
      "pixel_counts": {name: int(c) for name, c in zip(info.class_names, per_class)},
      "ignored_pixels": int(counts[IGNORE_LABEL]),
      "total_pixels": int(counts.sum()),
  }
  if class_weights:
    w = class_weights_from_counts(per_class.astype(np.float64))
    out["class_weights"] = {name: round(float(v), 4) for name, v in zip(info.class_names, w)}
  return out
