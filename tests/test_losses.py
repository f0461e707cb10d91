"""Tests of pixcon_jax.losses (class-weighted CE with ignore, upsampling, OHEM)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixcon_jax import losses


def _np_log_softmax(x):
  x = x.astype(np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_resize_align_corners(x, size):
  """float64 bilinear align_corners=True on [B, H, W, C]."""
  def axis(x, ax, out):
    n = x.shape[ax]
    src = np.arange(out) * ((n - 1) / (out - 1) if out > 1 else 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n - 1)
    i1 = np.minimum(i0 + 1, n - 1)
    lam = (src - i0).reshape([-1 if a == ax else 1 for a in range(x.ndim)])
    return (1 - lam) * np.take(x, i0, ax) + lam * np.take(x, i1, ax)
  return axis(axis(x.astype(np.float64), 2, size[1]), 1, size[0])


def _np_ce(logits, label, weights=None, ignore=255):
  if logits.shape[1:3] != label.shape[1:]:
    logits = _np_resize_align_corners(logits, label.shape[1:])
  c = logits.shape[-1]
  weights = np.ones(c) if weights is None else np.asarray(weights, np.float64)
  lp = _np_log_softmax(logits).reshape(-1, c)
  y = label.reshape(-1)
  keep = y != ignore
  nll = -lp[keep, y[keep]]
  w = weights[y[keep]]
  return (w * nll).sum() / w.sum(), lp, y, keep, weights


def _np_ohem(logits, label, weights, thresh, min_kept, ignore=255):
  """The official FSOhemCELoss, with its boolean indexing and sort, in numpy."""
  _, lp, y, keep, weights = _np_ce(logits, label, weights, ignore)
  prob = np.exp(lp[np.arange(len(y)), np.where(keep, y, 0)])
  sort_idx = np.argsort(prob[keep], kind="stable")
  sort_prob = prob[keep][sort_idx]
  min_threshold = sort_prob[min(min_kept, sort_prob.size - 1)] if sort_prob.size else 0.0
  threshold = max(min_threshold, thresh)
  loss = -lp[keep, y[keep]] * weights[y[keep]]
  selected = loss[sort_idx][sort_prob < threshold]
  return selected.mean() if selected.size else 0.0, selected.size


def _case(seed, b=2, h=6, w=10, c=5, big=(12, 20), ignore_frac=0.2):
  rng = np.random.default_rng(seed)
  logits = (2 * rng.standard_normal((b, h, w, c))).astype(np.float32)
  label = rng.integers(0, c, (b,) + big).astype(np.int32)
  label[rng.random(label.shape) < ignore_frac] = 255
  return logits, label


def test_cross_entropy_matches_numpy_with_ignore_at_same_size():
  logits, label = _case(0, big=(6, 10))
  loss, metrics = jax.jit(losses.cross_entropy)(jnp.asarray(logits), jnp.asarray(label))
  ref = _np_ce(logits, label)[0]
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  assert int(metrics["num_valid_pixels"]) == int(np.sum(label != 255))


def test_cross_entropy_upsamples_logits_align_corners_and_weights_classes():
  logits, label = _case(1)
  weights = np.array([0.5, 1.0, 2.0, 1.5, 0.8], np.float32)
  ce = jax.jit(losses.cross_entropy)
  loss, _ = ce(jnp.asarray(logits), jnp.asarray(label), class_weights=weights)
  np.testing.assert_allclose(float(loss), _np_ce(logits, label, weights)[0], rtol=1e-5)
  unweighted, _ = ce(jnp.asarray(logits), jnp.asarray(label))
  assert abs(float(unweighted) - float(loss)) > 1e-4  # the weights do change the mean


def test_cross_entropy_all_ignored_is_zero_not_nan():
  logits, label = _case(2)
  label[:] = 255
  for ohem in (False, True):
    loss, grads = jax.jit(jax.value_and_grad(
        lambda x: losses.cross_entropy(x, jnp.asarray(label), ohem=ohem)[0]))(jnp.asarray(logits))
    assert float(loss) == 0.0
    assert np.all(np.isfinite(np.asarray(grads)))


def test_cityscapes_class_weights_has_19_entries():
  assert len(losses.CITYSCAPES_CLASS_WEIGHTS) == 19
  assert losses.CITYSCAPES_CLASS_WEIGHTS[0] == pytest.approx(0.8373)


@jax.jit
def _ohem_traced(logits, label, weights, thresh, min_kept):
  # Threshold and min_kept may also be traced: one compile serves every parametrisation.
  return losses.cross_entropy(logits, label, class_weights=weights, ohem=True,
                              ohem_threshold=thresh, ohem_min_kept=min_kept)


@pytest.mark.parametrize("thresh,min_kept", [(0.7, 50), (0.7, 100_000), (0.05, 10), (0.3, 0)])
def test_ohem_matches_official_selection(thresh, min_kept):
  logits, label = _case(3)
  weights = np.asarray(losses.CITYSCAPES_CLASS_WEIGHTS[:5], np.float32)
  loss, metrics = _ohem_traced(jnp.asarray(logits), jnp.asarray(label), weights, thresh, min_kept)
  ref, n_kept = _np_ohem(logits, label, weights, thresh, min_kept)
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  assert int(metrics["ohem_num_kept"]) == n_kept


def test_ohem_keeps_the_hardest_pixels():
  # threshold 0 and min_kept = 3: the threshold becomes the 4th smallest GT probability, so
  # exactly the 3 pixels with the lowest probability (the highest nll) are averaged.
  logits, label = _case(4, big=(6, 10), ignore_frac=0.0)
  loss, metrics = jax.jit(functools.partial(
      losses.cross_entropy, ohem=True, ohem_threshold=0.0, ohem_min_kept=3))(
          jnp.asarray(logits), jnp.asarray(label))
  lp = _np_log_softmax(logits).reshape(-1, 5)
  nll = -lp[np.arange(lp.shape[0]), label.reshape(-1)]
  assert int(metrics["ohem_num_kept"]) == 3
  np.testing.assert_allclose(float(metrics["ohem_threshold"]), np.sort(np.exp(-nll))[3], rtol=1e-6)
  np.testing.assert_allclose(float(loss), np.sort(nll)[-3:].mean(), rtol=1e-5)
