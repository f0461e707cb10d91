"""Segmentation metrics from a dataset-level confusion matrix.

Every number reported by evaluation comes from ONE confusion matrix summed
over all valid pixels of the split (all batches, devices and hosts), never
from a mean of per-batch or per-image scores; this is the Cityscapes / scenic
/ official `RunningScore` convention.

Conventions (identical to the official `lib/metrics/running_score.py`):
- rows are ground truth, columns are predictions: `cm[g, p]`;
- a pixel counts only if its label is in `[0, C)`; label 255 (ignore), any
  other out-of-range label, and every pixel of a padding example are excluded;
- IoU_c = TP / (TP + FP + FN). A class absent from both the ground truth and
  the prediction has 0 / 0: its IoU is NaN and it is excluded from the mean
  (`nanmean`). A class predicted but never in the ground truth has IoU 0 and
  does count.
- pixel accuracy = trace / total; mean accuracy = nanmean over classes of
  TP / (TP + FN) (classes absent from the ground truth excluded).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

IGNORE_LABEL = 255


# float32 sums of ones are exact up to 2**24; each partial matmul counts at most this many pixels.
EXACT_CHUNK = 1 << 22


def confusion_matrix(prediction: jax.Array, label: jax.Array, num_classes: int,
                     mask: jax.Array | None = None) -> jax.Array:
  """Confusion matrix of one batch, on device (jit / shard_map safe).

  Computed as `one_hot(label)^T @ one_hot(prediction)` over the pixels, a matmul, rather than
  a scatter-add into C^2 bins, which TPUs serialise. The one-hot entries are 0 and 1 (exact in
  bf16 and TF32 passes) and each partial product sums at most `EXACT_CHUNK` pixels in float32,
  so the counts are exact integers.

  Args:
    prediction: [...] int, predicted class per pixel.
    label: [...] int, same shape; values outside [0, num_classes) (255) are ignored.
    num_classes: C (static).
    mask: optional bool, broadcastable to `label` (e.g. `valid[:, None, None]`);
      False pixels are ignored.
  Returns:
    [C, C] int32, `cm[g, p]` = number of counted pixels with label g predicted p.
  """
  label = label.astype(jnp.int32)
  prediction = prediction.astype(jnp.int32)
  keep = (label >= 0) & (label < num_classes)
  if mask is not None:
    keep = keep & jnp.broadcast_to(mask, label.shape)
  # An ignored pixel gets label -1, whose one-hot row is all zeros.
  gt = jnp.where(keep, label, -1).reshape(-1)
  pred = prediction.reshape(-1)
  n = gt.shape[0]
  chunk = max(1, min(n, EXACT_CHUNK))
  pad = -n % chunk
  if pad:
    gt = jnp.pad(gt, (0, pad), constant_values=-1)
    pred = jnp.pad(pred, (0, pad))
  gt_hot = jax.nn.one_hot(gt.reshape(-1, chunk), num_classes, dtype=jnp.float32)
  pred_hot = jax.nn.one_hot(pred.reshape(-1, chunk), num_classes, dtype=jnp.float32)
  counts = jnp.einsum("knc,knd->kcd", gt_hot, pred_hot, precision=jax.lax.Precision.DEFAULT,
                      preferred_element_type=jnp.float32)
  return counts.astype(jnp.int32).sum(axis=0)


def confusion_matrix_numpy(prediction: np.ndarray, label: np.ndarray, num_classes: int,
                           mask: np.ndarray | None = None) -> np.ndarray:
  """Host (numpy, int64) twin of `confusion_matrix`, for tests and small tools."""
  label = np.asarray(label).astype(np.int64)
  prediction = np.asarray(prediction).astype(np.int64)
  keep = (label >= 0) & (label < num_classes)
  if mask is not None:
    keep &= np.broadcast_to(np.asarray(mask, bool), label.shape)
  idx = label[keep] * num_classes + prediction[keep]
  return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def metrics_from_confusion_matrix(cm: np.ndarray,
                                  class_names: Sequence[str] | None = None) -> dict[str, Any]:
  """mIoU, per-class IoU, pixel and mean accuracy from a dataset-level confusion matrix.

  Args:
    cm: [C, C] counts, rows ground truth, columns prediction.
    class_names: C names; per-class IoU is reported as `iou/<name>` (index if None).
  Returns:
    dict with floats `miou`, `pixel_accuracy`, `mean_accuracy`, `fw_iou`,
    `num_pixels`, `num_classes_present` and `iou/<name>` for every class
    (NaN for a class absent from both GT and prediction; excluded from `miou`).
  """
  cm = np.asarray(cm, np.float64)
  num_classes = cm.shape[0]
  if cm.shape != (num_classes, num_classes):
    raise ValueError(f"confusion matrix must be square, got shape {cm.shape}")
  if class_names is None:
    class_names = [str(i) for i in range(num_classes)]
  if len(class_names) != num_classes:
    raise ValueError(f"{len(class_names)} class names for a {num_classes}-class confusion matrix")
  tp = np.diag(cm)
  gt = cm.sum(axis=1)
  pred = cm.sum(axis=0)
  union = gt + pred - tp
  total = cm.sum()
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = np.where(union > 0, tp / union, np.nan)
    acc = np.where(gt > 0, tp / gt, np.nan)
  present = ~np.isnan(iou)
  out: dict[str, Any] = {
      "miou": float(np.mean(iou[present])) if present.any() else float("nan"),
      "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
      "mean_accuracy": float(np.nanmean(acc)) if (gt > 0).any() else float("nan"),
      # Frequency-weighted IoU, as in the official RunningScore.
      "fw_iou": float(np.nansum(gt / total * iou)) if total > 0 else float("nan"),
      "num_pixels": float(total),
      "num_classes_present": float(present.sum()),
  }
  for name, value in zip(class_names, iou):
    out[f"iou/{name}"] = float(value)
  return out


def scalars_for_writer(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
  """Finite float metrics, keys prefixed (e.g. `eval/`), for CLU `write_scalars`."""
  out = {}
  for key, value in metrics.items():
    if isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(float(value)):
      out[prefix + key] = float(value)
  return out


def json_safe(metrics: Mapping[str, Any]) -> dict[str, Any]:
  """Metrics with NaN/inf replaced by None (JSON has no NaN) and arrays as lists."""
  out = {}
  for key, value in metrics.items():
    if isinstance(value, np.ndarray):
      out[key] = value.tolist()
    elif isinstance(value, (float, np.floating)):
      out[key] = float(value) if math.isfinite(float(value)) else None
    elif isinstance(value, (np.integer,)):
      out[key] = int(value)
    else:
      out[key] = value
  return out


@flax.struct.dataclass
class ConfusionMatrix(clu_metrics.Metric):
  """CLU metric: a summed confusion matrix; `compute()` returns it as [C, C] numpy int64.

  Usage: `ConfusionMatrix.from_confusion(cm)` per batch, `.merge()` across
  batches, then `metrics_from_confusion_matrix(m.compute(), names)`. Merging
  in int64 on the host avoids int32 overflow over a large split.
  """
  matrix: np.ndarray

  @classmethod
  def empty(cls, num_classes: int = 1) -> "ConfusionMatrix":
    return cls(matrix=np.zeros((num_classes, num_classes), np.int64))

  @classmethod
  def from_confusion(cls, cm: Any) -> "ConfusionMatrix":
    return cls(matrix=np.asarray(jax.device_get(cm), np.int64))

  def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
    if self.matrix.shape != other.matrix.shape:
      if not self.matrix.any():
        return other
      raise ValueError(f"cannot merge confusion matrices {self.matrix.shape} and {other.matrix.shape}")
    return type(self)(matrix=self.matrix + other.matrix)

  def compute(self) -> np.ndarray:
    return self.matrix
