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
  anchors = jax.jit(functools.partial(
      sampling.sample_anchors, num_classes=4, anchors_per_class=a, mode=mode))(
          jnp.asarray(label), jnp.asarray(predict), jax.random.key(1))
  index, owned, valid, hard = map(np.asarray, anchors)
  np.testing.assert_array_equal(owned, valid)  # one device holds every anchor
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
  index, _, valid, hard = sampling.sample_anchors(
      jnp.asarray(label), jnp.asarray(predict), jax.random.key(3), num_classes=2,
      anchors_per_class=50, mode="seg_aware_hard")
  hard0 = np.asarray(hard[0])
  # 25 forced hard + the random half drawn from all 375 remaining pixels (75 of them hard).
  assert 25 <= hard0.sum() <= 40 and np.asarray(valid[0]).all()
  np.testing.assert_array_equal(hard0, predict[np.asarray(index[0])] != 0)


def _top_k_mask_cases(a=6, q=59):
  rng = np.random.default_rng(0)
  for trial in range(40):
    if trial % 3 == 0:  # many ties, extremes (-inf is how the sort path masks, so not a score)
      values = [-3e38, -1.0, -0.5, 0.0, 0.25, 1.0, 3e38, np.inf]
      score = rng.choice(values, size=(a, q)).astype(np.float32)
    else:
      score = (rng.normal(size=(a, q)) * 10.0 ** rng.integers(-30, 30)).astype(np.float32)
    valid = rng.uniform(size=(a, q)) < rng.uniform(0.0, 1.0)
    k = rng.integers(0, q + 3, size=(a,))
    yield score, valid, k


@functools.partial(jax.jit, static_argnames=("impl",))
def _top_k_mask(score, valid, k, impl):
  return sampling.top_k_mask(score, valid, k, k_max=score.shape[-1], impl=impl)


def test_top_k_mask_bisect_selects_the_set_of_lax_top_k():
  for score, valid, k in _top_k_mask_cases():
    bisect = np.asarray(_top_k_mask(score, valid, k, "bisect"))
    np.testing.assert_array_equal(bisect, np.asarray(_top_k_mask(score, valid, k, "sort")))
    # And against numpy: min(k, n_valid) entries, all valid, none smaller than one left out.
    for row in range(score.shape[0]):
      sel, ok = bisect[row], valid[row]
      assert sel.sum() == min(k[row], ok.sum()) and not (sel & ~ok).any()
      if sel.any() and (ok & ~sel).any():
        assert score[row][sel].min() >= score[row][ok & ~sel].max()


def test_top_k_mask_ties_keep_the_lower_column_ids():
  # With column ids, ties at the k-th value are broken by id, not by position: the selection is
  # the index-order selection of the entries sorted by id (how a row split over devices, in
  # another order, still selects what one device does).
  rng = np.random.default_rng(2)
  select = jax.jit(lambda s, v, k, c: sampling.top_k_mask(s, v, k, column=c))
  for score, valid, k in _top_k_mask_cases():
    column = rng.permutation(score.shape[-1]).astype(np.int32)
    by_id = np.argsort(column)  # entry holding id j
    want = np.zeros_like(valid)
    want[:, by_id] = np.asarray(_top_k_mask(score[:, by_id], valid[:, by_id], k, "sort"))
    np.testing.assert_array_equal(np.asarray(select(score, valid, k, column)), want)


def test_uniform_rank_selects_what_the_uniforms_select():
  # The random mining bisects on u * 2^23 instead of u: exact only while JAX's float32 uniforms
  # are multiples of 2^-23 (this checks the installed JAX), and then the same set, ties included.
  u = jax.random.uniform(jax.random.key(0), (40, 3000))
  scaled = np.asarray(u, np.float64) * 2.0 ** 23
  np.testing.assert_array_equal(scaled, np.floor(scaled))
  rank = sampling.uniform_rank(u)
  assert rank.dtype == jnp.uint32 and int(rank.max()) < 2 ** 23
  np.testing.assert_array_equal(np.asarray(rank), scaled.astype(np.uint32))
  # Ties at the k-th value: coarse uniforms (multiples of 1/64) tie in many rows.
  coarse = jnp.floor(u * 64) / 64
  valid = jax.random.uniform(jax.random.key(1), u.shape) < 0.8
  k = jnp.asarray(np.random.default_rng(0).integers(0, 3000, 40), jnp.int32)
  column = jnp.asarray(np.random.default_rng(1).permutation(3000), jnp.int32)
  for score in (u, coarse):
    for ids in (None, column):
      want = sampling.top_k_mask(score, valid, k, column=ids)
      got = sampling.top_k_mask(sampling.uniform_rank(score), valid, k, column=ids)
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_top_k_mask_static_k_under_jit_and_map():
  rng = np.random.default_rng(1)
  score = jnp.asarray(rng.normal(size=(3, 4, 500)).astype(np.float32))
  valid = jnp.asarray(rng.uniform(size=(3, 4, 500)) < 0.9)
  fn = jax.jit(lambda s, v: jax.lax.map(lambda x: sampling.top_k_mask(x[0], x[1], 37), (s, v)))
  mask = np.asarray(fn(score, valid))
  expect = np.zeros_like(mask)
  for i in range(3):
    for j in range(4):
      order = np.argsort(-np.where(np.asarray(valid[i, j]), np.asarray(score[i, j]), -np.inf),
                         kind="stable")
      expect[i, j, order[:37]] = True
  np.testing.assert_array_equal(mask, expect)
  with pytest.raises(ValueError, match="top_k must be"):
    sampling.top_k_mask(score, valid, 3, impl="heap")


@pytest.mark.parametrize("top_k", ["bisect", "sort", "approx"])
def test_mine_selects_valid_extremes(top_k):
  rng = np.random.default_rng(0)
  sim = rng.uniform(-1, 1, size=(6, 50)).astype(np.float32)
  valid = rng.uniform(size=(6, 50)) < 0.6
  valid[5] = False  # an anchor with nothing to choose
  key = jax.random.key(0)
  for mode in ("random", "hardest", "semi_hard", "hardness_weighted"):
    for harder in ("low", "high"):
      sel = sampling.mine_mask(jnp.asarray(sim), jnp.asarray(valid), key, num=4, mode=mode,
                               harder=harder, fraction=0.3, top_k=top_k)
      sel = np.asarray(sel)
      assert not sel[5].any() and not (sel & ~valid).any()
      for a in range(5):
        pool = sim[a][valid[a]]
        assert sel[a].sum() == 4
        order = np.sort(pool) if harder == "low" else -np.sort(-pool)
        if mode == "hardest" and top_k != "approx":
          np.testing.assert_array_equal(np.sort(sim[a][sel[a]]), np.sort(order[:4]))
        if mode == "semi_hard":
          top = order[:int(np.ceil(0.3 * len(pool)))]
          assert np.isin(sim[a][sel[a]], top).all()


def test_mine_semi_hard_random_within_top_fraction():
  sim = jnp.asarray(np.linspace(-1, 1, 100, dtype=np.float32)[None])
  valid = jnp.ones((1, 100), bool)
  picks = set()
  mine = jax.jit(functools.partial(sampling.mine_mask, num=3, mode="semi_hard", harder="high",
                                   fraction=0.1))
  for s in range(20):
    sel = mine(sim, valid, jax.random.key(s))
    assert int(sel.sum()) == 3
    picks |= set(np.round(np.asarray(sim[0][sel[0]]), 5))
  top10 = set(np.round(np.asarray(sim[0, -10:]), 5))
  assert picks <= top10 and len(picks) > 3  # random among the top 10%, not always the same


@pytest.mark.parametrize("harder", ["low", "high"])
def test_mine_hardness_weighted_draws_in_proportion_to_exp_hardness(harder):
  # One draw per anchor row: entry j is taken with probability softmax(hardness / T)_j over the
  # valid entries (the Gumbel top-k property). 20000 independent rows, 4-sigma bounds.
  temperature, rows = 0.25, 20000
  sim_row = np.array([-0.6, -0.2, 0.0, 0.1, 0.3, 0.5, 0.9, 0.95], np.float32)
  valid_row = np.array([1, 1, 1, 1, 1, 1, 1, 0], bool)
  sim = jnp.asarray(np.broadcast_to(sim_row, (rows, 8)))
  valid = jnp.asarray(np.broadcast_to(valid_row, (rows, 8)))
  sel = np.asarray(jax.jit(functools.partial(
      sampling.mine_mask, num=1, mode="hardness_weighted", harder=harder,
      temperature=temperature))(sim, valid, jax.random.key(7)))
  assert (sel.sum(-1) == 1).all() and not sel[:, ~valid_row].any()
  hardness = -sim_row if harder == "low" else sim_row
  p = np.where(valid_row, np.exp(hardness / temperature), 0.0)
  p /= p.sum()
  freq = sel.mean(0)
  bound = 4 * np.sqrt(p * (1 - p) / rows) + 1e-9
  assert (np.abs(freq - p) <= bound).all(), (freq, p)
  # Neither the uniform draw nor the hardest: the easiest valid entry is still drawn.
  assert freq[np.argmin(np.where(valid_row, hardness, np.inf))] > 0


def test_mine_semi_hard_with_pool_of_ten_k_is_the_hardest_k():
  # The default pools hold 10 x K candidates: the top 10% is exactly the K hardest.
  rng = np.random.default_rng(2)
  sim = jnp.asarray(rng.uniform(-1, 1, size=(5, 200)).astype(np.float32))
  valid = jnp.ones((5, 200), bool)
  for harder in ("low", "high"):
    semi = sampling.mine_mask(sim, valid, jax.random.key(0), num=20, mode="semi_hard",
                              harder=harder, fraction=0.1)
    hardest = sampling.mine_mask(sim, valid, jax.random.key(1), num=20, mode="hardest",
                                 harder=harder)
    np.testing.assert_array_equal(np.asarray(semi), np.asarray(hardest))


def test_weighted_top_mask_estimates_the_population_top_k():
  # A pool of 200 drawn from a population of 2000 (weight 10 each): the population's top 50 are
  # estimated by the pool's top 5, and the selected weights add up to exactly 50.
  score = jax.random.normal(jax.random.key(0), (3, 200))
  valid = jnp.ones((3, 200), bool).at[2, 100:].set(False)
  mask, w = sampling.weighted_top_mask(score, valid, jnp.float32(10.0), 50)
  np.testing.assert_array_equal(np.asarray(mask.sum(-1)), [5, 5, 5])
  np.testing.assert_allclose(np.asarray(w.sum(-1)), [50, 50, 50], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(mask), np.asarray(sampling.top_k_mask(score, valid, 5)))
  # Unit weights: exactly the top-k set; a total weight below k selects every valid entry.
  mask1, w1 = sampling.weighted_top_mask(score, valid, jnp.float32(1.0), 50)
  np.testing.assert_array_equal(np.asarray(mask1), np.asarray(sampling.top_k_mask(score, valid, 50)))
  mask2, w2 = sampling.weighted_top_mask(score, valid, jnp.float32(0.2), 50)
  np.testing.assert_array_equal(np.asarray(mask2), np.asarray(valid))
  np.testing.assert_allclose(np.asarray(w2.sum(-1)), [40, 40, 20], rtol=1e-5)


def test_hardest_and_semi_hard_differ_at_the_default_pool_ratio():
  # Default pools hold 10 x K candidates drawn from a far larger memory. Semi-hard takes the
  # pool's top 10% (= its K hardest); hardest estimates the memory's K hardest, which are the
  # pool's top K x pool / memory entries: a strictly smaller, harder set.
  sim = jax.random.normal(jax.random.key(2), (4, 640))
  valid = jnp.ones_like(sim, bool)
  semi = sampling.mine_mask(sim, valid, jax.random.key(3), num=64, mode="semi_hard",
                            harder="high", fraction=0.1)
  hard, _ = sampling.weighted_top_mask(sim, valid, jnp.float32(60000 / 640), 64)
  assert int(semi.sum()) == 4 * 64 and 0 < int(hard.sum()) < int(semi.sum()) // 8
  assert bool(jnp.all(~hard | semi))  # the hardest few are among semi-hard's, not the same set
