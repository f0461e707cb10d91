"""Static-shape sampling: candidate pools, anchors (random / seg-aware hard), pos/neg mining."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixcon_jax.contrast import sampling


@functools.partial(jax.jit, static_argnames=("k",))
def _pools(valid, k, keys):
  return jax.vmap(lambda key: sampling.sample_pool(valid, k, key))(keys)


def test_sample_pool_never_picks_invalid_and_is_uniform():
  n, k, draws = 40, 8, 4000
  valid = np.zeros((2, n), bool)
  valid[0, ::3] = True  # 14 valid entries
  valid[1, :5] = True  # fewer valid entries than k
  index, ok = map(np.asarray, _pools(jnp.asarray(valid), k, jax.random.split(jax.random.key(0),
                                                                             draws)))
  rows = np.broadcast_to(np.arange(2)[None, :, None], index.shape)
  assert valid[rows[ok], index[ok]].all()
  assert (ok[:, 0].sum(-1) == k).all() and (ok[:, 1].sum(-1) == 5).all()
  for d in range(50):  # distinct within a draw
    assert len(set(index[d, 0][ok[d, 0]])) == k
  np.testing.assert_array_equal(np.sort(index[:, 1][ok[:, 1]].reshape(draws, 5), -1),
                                np.broadcast_to(np.arange(5), (draws, 5)))
  freq = np.bincount(index[:, 0][ok[:, 0]], minlength=n)[::3] / draws
  np.testing.assert_allclose(freq, k / 14, atol=0.04)  # inclusion probability k / n


def test_sample_pool_larger_than_set_is_exact():
  valid = jnp.array([True, False, True])
  index, ok = sampling.sample_pool(valid, 5, jax.random.key(0))
  np.testing.assert_array_equal(index, [0, 1, 2])
  np.testing.assert_array_equal(ok, valid)


def _anchor_case():
  rng = np.random.default_rng(0)
  label = rng.integers(0, 4, size=300)
  label[:30] = 255
  label[label == 3] = 2  # class 3 absent
  label[np.flatnonzero(label == 1)[5:]] = 0  # class 1 has only 5 pixels
  predict = label.copy()
  wrong0 = np.flatnonzero(label == 0)[:7]  # 7 hard pixels of class 0 (< half of anchors)
  predict[wrong0] = 2
  predict[label == 2] = 0  # every class-2 pixel is hard (> half of anchors)
  predict[predict == 255] = 0
  return label, predict


@pytest.mark.parametrize("mode", ["random", "seg_aware_hard"])
def test_sample_anchors_valid_distinct_and_hard(mode):
  label, predict = _anchor_case()
  a = 20
  index, valid, hard = jax.jit(functools.partial(
      sampling.sample_anchors, num_classes=4, anchors_per_class=a, mode=mode))(
          jnp.asarray(label), jnp.asarray(predict), jax.random.key(1))
  index, valid, hard = map(np.asarray, (index, valid, hard))
  for c in range(4):
    chosen = index[c][valid[c]]
    assert (label[chosen] == c).all()
    assert len(set(chosen)) == len(chosen) == min(a, (label == c).sum())
    np.testing.assert_array_equal(hard[c][valid[c]], predict[chosen] != c)
  if mode == "seg_aware_hard":
    assert hard[0].sum() >= 7  # all 7 hard pixels are taken (fewer than half), rest random fill
    assert hard[2].sum() == a  # only hard pixels exist: the random half is hard too
    assert valid[1].sum() == 5 and not valid[3].any()


def test_seg_aware_hard_takes_half_hard_when_plenty():
  label = np.zeros(400, np.int64)
  predict = np.where(np.arange(400) < 100, 1, 0)  # 100 hard, 300 easy pixels of class 0
  index, valid, hard = sampling.sample_anchors(
      jnp.asarray(label), jnp.asarray(predict), jax.random.key(3), num_classes=2,
      anchors_per_class=50, mode="seg_aware_hard")
  hard0 = np.asarray(hard[0])
  # 25 forced hard + the random half drawn from all 375 remaining pixels (75 of them hard).
  assert 25 <= hard0.sum() <= 40 and np.asarray(valid[0]).all()
  np.testing.assert_array_equal(hard0, predict[np.asarray(index[0])] != 0)


@pytest.mark.parametrize("top_k", ["exact", "approx"])
def test_mine_selects_valid_extremes(top_k):
  rng = np.random.default_rng(0)
  sim = rng.uniform(-1, 1, size=(6, 50)).astype(np.float32)
  valid = rng.uniform(size=(6, 50)) < 0.6
  valid[5] = False  # an anchor with nothing to choose
  key = jax.random.key(0)
  for mode in ("random", "hardest", "semi_hard"):
    for harder in ("low", "high"):
      vals, ok = sampling.mine(jnp.asarray(sim), jnp.asarray(valid), key, num=4, mode=mode,
                               harder=harder, fraction=0.3, top_k=top_k)
      vals, ok = np.asarray(vals), np.asarray(ok)
      assert not ok[5].any()
      for a in range(5):
        pool = sim[a][valid[a]]
        assert ok[a].sum() == 4 and np.isin(vals[a][ok[a]], pool).all()
        order = np.sort(pool) if harder == "low" else -np.sort(-pool)
        if mode == "hardest" and top_k == "exact":
          np.testing.assert_array_equal(np.sort(vals[a]), np.sort(order[:4]))
        if mode == "semi_hard":
          top = order[:int(np.ceil(0.3 * len(pool)))]
          assert np.isin(vals[a][ok[a]], top).all()


def test_mine_semi_hard_random_within_top_fraction():
  sim = jnp.asarray(np.linspace(-1, 1, 100, dtype=np.float32)[None])
  valid = jnp.ones((1, 100), bool)
  picks = set()
  for s in range(20):
    vals, _ = sampling.mine(sim, valid, jax.random.key(s), num=3, mode="semi_hard",
                            harder="high", fraction=0.1)
    picks |= set(np.round(np.asarray(vals[0]), 5))
  top10 = set(np.round(np.asarray(sim[0, -10:]), 5))
  assert picks <= top10 and len(picks) > 3  # random among the top 10%, not always the same
