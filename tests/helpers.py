"""Helpers only the tests use: the inverse weight conversion and a CLU-style metric constructor.

Importable from any test module (pytest puts tests/ on sys.path: `import helpers`).
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import numpy as np

from pixcon_jax import convert
from pixcon_jax import metrics


def flax_to_state_dict(variables: Any) -> dict[str, np.ndarray]:
  """The inverse of `convert.convert_state_dict`: Flax variables -> a torch-style state_dict.

  Numpy arrays in torch layouts (conv kernels [O, I, kh, kw], dense [out, in]), keys named by
  `convert.torch_leaf_name`; `num_batches_tracked` is not produced. Tests convert it back to
  check the round trip.
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  out = {}
  for path, value in flat.items():
    value = np.asarray(value)
    if path[0] == "params" and path[-1] == "kernel":
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    out[convert.torch_leaf_name(path)] = value
  return out


def confusion_metric(*, prediction: jax.Array, label: jax.Array, num_classes: int,
                     mask: jax.Array | None = None) -> metrics.ConfusionMatrix:
  """`metrics.ConfusionMatrix` of one batch: prediction / label [B, H, W], mask [B, 1, 1] or None."""
  return metrics.ConfusionMatrix.from_confusion(
      metrics.confusion_matrix(prediction, label, num_classes, mask))
