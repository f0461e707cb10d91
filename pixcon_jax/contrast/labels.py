"""Label-map resizing shared by the contrastive loss and the pixel memory.

The official losses downsample the GT to the embedding resolution with
`F.interpolate(label.float(), size, mode='nearest').long()`, PyTorch's *legacy*
nearest rule (golden README, quirk 2). Both `official.py` (anchor sampling)
and `memory.py` (enqueueing) must pick the same source pixels, so the rule
lives here once.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def legacy_nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source indices of PyTorch's legacy `mode='nearest'` along one axis.

  index(o) = min(floor(float32(o) * float32(in / out)), in - 1), with the
  scale and the product both rounded to float32 as in PyTorch's CPU kernel
  (`area_pixel_compute_scale<float>` / `nearest_idx`). There is no half-pixel
  offset; the exact rational `o * in // out` picks another pixel for some
  sizes (the `nearest_odd_in` golden case).

  Returns:
    [out_size] int32 numpy array (static: computed at trace time).
  """
  if in_size == out_size:
    return np.arange(out_size, dtype=np.int32)
  # float32 / float32 is the correctly rounded quotient, i.e. float32(in / out).
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.floor(np.arange(out_size, dtype=np.float32) * scale)
  return np.minimum(src.astype(np.int64), in_size - 1).astype(np.int32)


def downsample_labels(label: jax.Array, size: Sequence[int]) -> jax.Array:
  """Resizes a label map with PyTorch's legacy nearest rule (no interpolation of ids).

  Args:
    label: [B, H, W] integer class ids (255 = ignore; any value passes through).
    size: static (h, w) output size.
  Returns:
    [B, h, w] with label's dtype; label[b, rows[i], cols[j]].
  """
  h, w = int(size[0]), int(size[1])
  if label.ndim != 3:
    raise ValueError(f"label must be [B, H, W], got shape {label.shape}")
  rows = legacy_nearest_indices(label.shape[1], h)
  cols = legacy_nearest_indices(label.shape[2], w)
  label = jnp.asarray(label)
  return jnp.take(jnp.take(label, jnp.asarray(rows), axis=1), jnp.asarray(cols), axis=2)
