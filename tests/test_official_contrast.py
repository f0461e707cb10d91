"""Tests of pixcon_jax.contrast.official (the official PixelContrastLoss recipe, static-shaped)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixcon_jax.contrast import official

TAU, BASE_TAU = 0.1, 0.07


def _np_contrastive(x, y):
  """The official `_contrastive`, transcribed to float64 numpy (NaN rows dropped by nanmean)."""
  a, v, d = x.shape
  z = np.concatenate([x[:, i] for i in range(v)], 0).astype(np.float64)
  labels = np.tile(y, v)
  mask = (labels[:, None] == labels[None, :]).astype(np.float64)
  s = z @ z.T / TAU
  logits = s - s.max(1, keepdims=True)
  neg_mask = 1 - mask
  mask = mask * (1 - np.eye(a * v))
  neg = (np.exp(logits) * neg_mask).sum(1, keepdims=True)
  log_prob = logits - np.log(np.exp(logits) + neg)
  with np.errstate(invalid="ignore"):
    mean_pos = (mask * log_prob).sum(1) / mask.sum(1)
  return np.nanmean(-(TAU / BASE_TAU) * mean_pos)


def _unit(rng, shape):
  x = rng.standard_normal(shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


core = jax.jit(functools.partial(official.official_contrastive_core, temperature=TAU,
                                 base_temperature=BASE_TAU))


@pytest.mark.parametrize("a,v,d,num_classes", [(4, 1, 8, 2), (3, 2, 16, 3), (5, 4, 8, 3),
                                               (7, 3, 32, 5)])
def test_core_matches_numpy_reference(a, v, d, num_classes):
  rng = np.random.default_rng(a * 100 + v)
  x = _unit(rng, (a, v, d))
  y = np.arange(a) % num_classes  # every class held by >= 1 anchor; v=1 cases hold >= 2
  loss, metrics = core(jnp.asarray(x), jnp.asarray(y))
  np.testing.assert_allclose(float(loss), _np_contrastive(x, y), rtol=1e-5)
  assert int(metrics["num_rows"]) == a * v


def test_core_single_class_is_exactly_zero():
  x = _unit(np.random.default_rng(1), (3, 4, 16))
  loss, _ = core(jnp.asarray(x), jnp.asarray([2, 2, 2]))
  assert float(loss) == 0.0


def test_core_view_mask_equals_dropping_the_views():
  rng = np.random.default_rng(2)
  x = _unit(rng, (4, 5, 16))
  y = np.array([0, 1, 0, 2])
  mask = np.ones((4, 5), bool)
  mask[:, 3:] = False
  loss, metrics = core(jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask))
  np.testing.assert_allclose(float(loss), _np_contrastive(x[:, :3], y), rtol=1e-5)
  assert int(metrics["num_rows"]) == 12


def test_core_row_without_positive_is_excluded_and_counted():
  x = _unit(np.random.default_rng(3), (3, 1, 8))
  y = np.array([0, 1, 1])  # anchor 0 alone in its class: the official 0/0 row
  loss, metrics = core(jnp.asarray(x), jnp.asarray(y))
  assert np.isfinite(float(loss))
  np.testing.assert_allclose(float(loss), _np_contrastive(x, y), rtol=1e-5)
  assert int(metrics["num_rows"]) == 2 and int(metrics["num_rows_without_positive"]) == 1


def _np_sampling(label, predict, num_classes, max_samples, max_views):
  """The official `_hard_anchor_sampling` decisions as a Python loop."""
  classes = [[c for c in np.unique(l)
              if c != 255 and c < num_classes and np.sum(l == c) > max_views]
             for l in label.reshape(label.shape[0], -1)]
  total = sum(len(c) for c in classes)
  if total == 0:
    return 0, []
  n_view = min(max_samples // total, max_views)
  out = []
  for b, cs in enumerate(classes):
    l, p = label[b].reshape(-1), predict[b].reshape(-1)
    for c in cs:
      nh, ne = int(np.sum((l == c) & (p != c))), int(np.sum((l == c) & (p == c)))
      if nh >= n_view / 2 and ne >= n_view / 2:
        hk = n_view // 2
      elif nh >= n_view / 2:
        hk = n_view - ne
      else:
        hk = nh
      out.append((b, c, nh, ne, hk, n_view - hk))
  return n_view, out


@pytest.mark.parametrize("seed,max_samples,max_views", [(0, 64, 10), (1, 30, 8), (2, 1024, 100)])
def test_anchor_sampling_matches_official_loop(seed, max_samples, max_views):
  rng = np.random.default_rng(seed)
  # Blocky GT (so some classes pass the count threshold) and a noisy prediction of it.
  label = np.repeat(np.repeat(rng.integers(0, 6, (3, 4, 4)), 4, 1), 8, 2).astype(np.int32)
  label[rng.random(label.shape) < 0.1] = 255
  predict = np.where(rng.random(label.shape) < 0.6, label, rng.integers(0, 6, label.shape))
  predict = np.where(predict == 255, 0, predict).astype(np.int32)
  sample = jax.jit(functools.partial(official.official_anchor_sampling, num_classes=6,
                                     max_samples=max_samples, max_views=max_views))(
                                         jnp.asarray(label), jnp.asarray(predict),
                                         jax.random.key(seed))
  n_view, anchors = _np_sampling(label, predict, 6, max_samples, max_views)
  n = int(sample.num_anchors)
  assert n == len(anchors) and (n == 0 or int(sample.n_view) == n_view)
  fields = (sample.image, sample.cls, sample.num_hard, sample.num_easy, sample.hard_kept,
            sample.easy_kept)
  ours = np.stack([np.asarray(f)[:n] for f in fields], 1)
  np.testing.assert_array_equal(ours, np.array(anchors).reshape(-1, 6))
  assert int(np.asarray(sample.view_mask).sum()) == n * n_view


def test_contrast_loss_equals_core_on_anchor_view_layout():
  # Packing the (anchor, view) rows must not change the loss against the [A, V] + mask layout.
  rng = np.random.default_rng(5)
  label = np.repeat(np.repeat(rng.integers(0, 4, (2, 2, 4)), 8, 1), 8, 2).astype(np.int32)
  predict = np.where(rng.random(label.shape) < 0.7, label, rng.integers(0, 4, label.shape))
  emb = _unit(rng, (2, 16, 32, 8))
  key = jax.random.key(7)
  kw = dict(num_classes=4, max_samples=50, max_views=12)

  @jax.jit
  def both(emb, label, predict):
    loss, metrics = official.official_contrast_loss(emb, label, predict, key, **kw)
    s = official.official_anchor_sampling(label, predict, key, **kw)
    x = emb.reshape(2, -1, 8)[s.image[:, None], s.pixel]
    ref, _ = official.official_contrastive_core(x, s.cls, s.view_mask)
    return loss, metrics, ref

  loss, metrics, ref = both(jnp.asarray(emb), jnp.asarray(label), jnp.asarray(predict))
  assert int(metrics["num_valid_anchors"]) > 0
  np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5)
  assert int(metrics["num_rows"]) == int(metrics["num_valid_anchors"]) * int(metrics["n_view"])


def test_contrast_loss_no_class_qualifies_gives_zero_and_finite_grads():
  rng = np.random.default_rng(6)
  label = np.full((2, 8, 8), 255, np.int32)
  label[:, 0, :3] = 1  # too few pixels for max_views = 10
  emb = jnp.asarray(_unit(rng, (2, 8, 8, 4)))
  fn = jax.jit(functools.partial(official.official_contrast_loss, num_classes=3, max_samples=64,
                                 max_views=10))
  (loss, metrics), grads = jax.value_and_grad(fn, has_aux=True)(
      emb, jnp.asarray(label), jnp.zeros((2, 8, 8), jnp.int32), jax.random.key(0))
  assert float(loss) == 0.0 and int(metrics["num_valid_anchors"]) == 0
  assert np.all(np.isfinite(np.asarray(grads)))


def test_contrast_ce_losses_jit_with_finite_grads():
  rng = np.random.default_rng(7)
  logits = jnp.asarray(rng.standard_normal((2, 8, 8, 3)).astype(np.float32))
  emb = jnp.asarray(_unit(rng, (2, 8, 8, 4)))
  label = jnp.asarray(np.repeat(np.repeat(rng.integers(0, 3, (2, 2, 2)), 8, 1), 8, 2), jnp.int32)
  kw = dict(class_weights=None, max_samples=32, max_views=10)

  def total(logits, emb):
    a, _ = official.contrast_ce_loss(logits, emb, label, jax.random.key(1), **kw)
    b, _ = official.contrast_aux_ce_loss(logits, 0.5 * logits, emb, label, jax.random.key(1), **kw)
    return a + b

  value, grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(logits, emb)
  assert np.isfinite(float(value))
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
  assert float(jnp.abs(grads[1]).sum()) > 0  # the contrast term reaches the embedding


def test_anchor_sampling_map_smaller_than_max_views_keeps_nothing():
  label = jnp.zeros((1, 4, 4), jnp.int32)
  s = jax.jit(functools.partial(official.official_anchor_sampling, num_classes=2, max_views=20))(
      label, label, jax.random.key(0))
  assert int(s.num_anchors) == 0 and s.pixel.shape == (2, 20) and not bool(s.view_mask.any())
