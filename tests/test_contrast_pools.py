"""The mini-batch candidate pools of the contrast: uniform over the pixels of the whole mini-batch.

A class spread unevenly over the images (many pixels in one, a few in others, none in most) must
get a pool of the stated size in which every one of its pixels is equally likely, whatever image
it lies in (a per-image draw favours the pixels of small segments).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pixcon_jax.contrast import sampling

IMAGES, PIXELS = 8, 16


def _uneven_labels():
  """[8, 16] labels: class 1 has 12 / 3 / 1 pixels in images 0 / 1 / 2 and none elsewhere;
  class 2 has 5 pixels (fewer than the pool); the rest is class 0 or ignore (255)."""
  label = np.zeros((IMAGES, PIXELS), np.int32)
  label[0, :12] = 1
  label[1, 4:7] = 1
  label[2, 9] = 1
  label[3, :5] = 2
  label[5:, ::2] = 255
  return label


@functools.partial(jax.jit, static_argnames=("k",))
def _draws(valid, keys, k):
  positions = jnp.arange(IMAGES)
  return jax.vmap(lambda key: sampling.batch_pool(valid, k, key, positions))(keys)


def test_batch_pool_is_uniform_over_the_whole_mini_batch_and_of_the_stated_size():
  label = _uneven_labels().reshape(-1)
  classes = np.arange(3)
  valid = label[None, :] == classes[:, None]  # [3, 128]
  k, draws = 8, 2000
  chosen = np.asarray(_draws(jnp.asarray(valid), jax.random.split(jax.random.key(0), draws), k))
  assert not (chosen & ~valid).any()
  # Pool sizes as stated: min(k, pixels of the class) in every draw.
  np.testing.assert_array_equal(chosen.sum(-1), np.broadcast_to(
      np.minimum(k, valid.sum(-1)), (draws, 3)))
  assert chosen[:, 2][:, valid[2]].all()  # fewer pixels than k: all of them
  # Inclusion frequency of each pixel of class 1 (16 pixels over 3 images) is k / 16 = 0.5,
  # within 5 binomial standard deviations (0.056 at 2000 draws).
  p = k / valid[1].sum()
  freq = chosen[:, 1][:, valid[1]].mean(0)
  bound = 5 * np.sqrt(p * (1 - p) / draws)
  assert np.abs(freq - p).max() < bound, (freq, p, bound)
  # The same for the class-0 pixels (many, over all images).
  p0 = k / valid[0].sum()
  freq0 = chosen[:, 0][:, valid[0]].mean(0)
  assert np.abs(freq0 - p0).max() < 5 * np.sqrt(p0 * (1 - p0) / draws), (freq0, p0)


def test_compact_packs_the_selected_entries_in_order():
  mask = jnp.array([[False, True, True, False, True], [False] * 5])
  index, ok = sampling.compact(mask, 4)
  np.testing.assert_array_equal(index, [[1, 2, 4, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(ok, [[True, True, True, False], [False] * 4])
