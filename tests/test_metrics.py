"""Confusion-matrix metrics: equal to a direct numpy computation, ignore/padding excluded."""
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from pixcon_jax import metrics


def _random_case(seed=0, b=3, h=7, w=9, c=5):
  rng = np.random.default_rng(seed)
  pred = rng.integers(0, c, (b, h, w))
  label = rng.integers(0, c, (b, h, w))
  label[rng.random((b, h, w)) < 0.2] = 255  # ignore pixels
  valid = np.array([True] * (b - 1) + [False])  # last example is padding
  return pred, label, valid


def _direct_metrics(pred, label, valid, c):
  """Per-class IoU straight from pixel sets, no confusion matrix."""
  keep = (label != 255) & valid[:, None, None]
  p, g = pred[keep], label[keep]
  ious = []
  for k in range(c):
    inter = np.sum((p == k) & (g == k))
    union = np.sum((p == k) | (g == k))
    ious.append(inter / union if union else float("nan"))
  ious = np.array(ious)
  return {"iou": ious, "miou": np.nanmean(ious), "pixel_accuracy": np.mean(p == g)}


def test_confusion_matrix_device_equals_numpy_with_ignore_and_padding():
  pred, label, valid = _random_case()
  cm_dev = np.asarray(metrics.confusion_matrix(jnp.asarray(pred), jnp.asarray(label), 5,
                                               jnp.asarray(valid)[:, None, None]))
  cm_np = metrics.confusion_matrix_numpy(pred, label, 5, valid[:, None, None])
  np.testing.assert_array_equal(cm_dev, cm_np)
  # Padding example and 255 pixels never counted.
  assert cm_np.sum() == np.sum((label[:-1] != 255))


def test_metrics_equal_direct_computation():
  c = 5
  pred, label, valid = _random_case(seed=1, c=c)
  cm = metrics.confusion_matrix_numpy(pred, label, c, valid[:, None, None])
  names = [f"class{k}" for k in range(c)]
  got = metrics.metrics_from_confusion_matrix(cm, names)
  ref = _direct_metrics(pred, label, valid, c)
  np.testing.assert_allclose(got["miou"], ref["miou"], rtol=1e-12)
  np.testing.assert_allclose(got["pixel_accuracy"], ref["pixel_accuracy"], rtol=1e-12)
  for k in range(c):
    np.testing.assert_allclose(got[f"iou/class{k}"], ref["iou"][k], rtol=1e-12)


def test_class_absent_from_gt_and_prediction_is_excluded_from_mean():
  c = 4
  pred = np.array([[0, 0, 1, 1]])
  label = np.array([[0, 1, 1, 255]])
  # Class 2: only predicted nowhere and never in GT -> NaN, excluded. Class 3 too.
  cm = metrics.confusion_matrix_numpy(pred, label, c)
  got = metrics.metrics_from_confusion_matrix(cm)
  assert math.isnan(got["iou/2"]) and math.isnan(got["iou/3"])
  np.testing.assert_allclose(got["miou"], np.mean([1 / 2, 1 / 2]))
  assert got["num_classes_present"] == 2
  # A class predicted but absent from the GT counts with IoU 0.
  cm2 = metrics.confusion_matrix_numpy(np.array([[2, 0]]), np.array([[0, 0]]), c)
  got2 = metrics.metrics_from_confusion_matrix(cm2)
  assert got2["iou/2"] == 0.0 and got2["miou"] == pytest.approx(0.25)
  # JSON-safe conversion maps NaN to null.
  json.dumps(metrics.json_safe(got), allow_nan=False)


def test_dataset_level_not_mean_of_batches():
  """The Evaluator's mIoU is that of the whole split (one summed confusion matrix), which here
  differs from the mean of the per-batch mIoUs: batch 0 is all-correct class 0 (mIoU 1), batch 1
  half-wrong classes 1 and 2 (mIoU 0.25); the split's mIoU is (1 + 0.5 + 0) / 3 = 0.5, not 0.625."""
  from pixcon_jax import evaluate, inference, sharding  # pylint: disable=g-import-not-at-top
  c, h, w = 3, 4, 8
  pred = np.zeros((2, h, w), np.int64)
  label = np.zeros((2, h, w), np.int64)
  pred[1] = 1
  label[1, :, : w // 2] = 1
  label[1, :, w // 2:] = 2
  label[0, 0, :2] = 255  # ignored pixels count nowhere
  valid = np.ones(2, bool)
  per_batch = [_direct_metrics(pred[i:i + 1], label[i:i + 1], valid[i:i + 1], c)["miou"]
               for i in range(2)]
  dataset = _direct_metrics(pred, label, valid, c)["miou"]
  assert abs(np.mean(per_batch) - dataset) > 0.1, (per_batch, dataset)
  # A "model" whose logits are its input: the image is the one-hot prediction.
  image = np.eye(c, dtype=np.float32)[pred]
  ev = evaluate.Evaluator(lambda variables, x: x, sharding.make_mesh(), num_classes=c,
                          settings=inference.InferenceSettings())
  batches = [{"image": image[i:i + 1], "label": label[i:i + 1].astype(np.int32)} for i in range(2)]
  got = ev({"params": {}}, batches)
  assert got["num_images"] == 2
  np.testing.assert_allclose(got["miou"], dataset, rtol=1e-12)
  np.testing.assert_allclose(dataset, 0.5, rtol=1e-12)


def test_clu_confusion_matrix_metric_merges():
  pred, label, valid = _random_case(seed=3)
  m = metrics.ConfusionMatrix.empty(5)
  for i in range(3):
    m = m.merge(helpers.confusion_metric(
        prediction=jnp.asarray(pred[i:i + 1]), label=jnp.asarray(label[i:i + 1]), num_classes=5))
  np.testing.assert_array_equal(m.compute(), metrics.confusion_matrix_numpy(pred, label, 5))


def _bincount_reference(pred, label, c, valid):
  """cm[g, p] straight from numpy's bincount over the counted pixels."""
  keep = (label < c) & valid[:, None, None]
  return np.bincount(label[keep] * c + pred[keep], minlength=c * c).reshape(c, c)


@pytest.mark.parametrize("chunk", [metrics.EXACT_CHUNK, 7])
def test_confusion_matrix_is_a_matmul_equal_to_bincount(chunk, monkeypatch):
  # chunk=7: several partial matmuls, the last one padded (3 * 13 * 17 = 663 pixels).
  monkeypatch.setattr(metrics, "EXACT_CHUNK", chunk)
  import jax  # pylint: disable=g-import-not-at-top
  c = 6
  pred, label, valid = _random_case(seed=3, b=3, h=13, w=17, c=c)
  label[0, 0, :4] = [0, 255, 7, 200]  # Ignore and other out-of-range labels.
  cm_fn = jax.jit(lambda p, l, v: metrics.confusion_matrix(p, l, c, v[:, None, None]))
  args = (jnp.asarray(pred), jnp.asarray(label), jnp.asarray(valid))
  cm = np.asarray(cm_fn(*args))
  assert cm.dtype == np.int32
  np.testing.assert_array_equal(cm, _bincount_reference(pred, label, c, valid))
  # No scatter in the graph: TPUs serialise a scatter-add of every pixel.
  text = cm_fn.lower(*args).as_text()
  assert "dot_general" in text and "scatter" not in text
