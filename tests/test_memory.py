"""Memory bank (paper Sec. 3.2 / 3.3): FIFO pixel queue, region memory, enqueue semantics."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixcon_jax.contrast import memory as memory_lib

C, D = 3, 4


def _ids(keys):
  keys = np.asarray(keys)
  return np.round(keys[..., 0] / np.where(keys[..., 1] == 0, 1, keys[..., 1]), 3)

enqueue = jax.jit(memory_lib.enqueue, static_argnames=("pixels_per_class",))


def _update(ids_per_class, num_images=2, v=4, image_id=None):
  """A MemoryUpdate whose pixel keys encode an id as channel 0 / channel 1 (kept by push's
  L2 normalisation)."""
  pk = np.zeros((num_images, C, v, D), np.float32)
  pv = np.zeros((num_images, C, v), bool)
  for c, per_image in enumerate(ids_per_class):
    for b, ids in enumerate(per_image):
      for j, i in enumerate(ids):
        pk[b, c, j, 0], pk[b, c, j, 1], pv[b, c, j] = i, 1.0, True
  return memory_lib.MemoryUpdate(
      pixel_keys=jnp.asarray(pk), pixel_valid=jnp.asarray(pv),
      region_keys=jnp.zeros((num_images, C, D)), region_valid=jnp.zeros((num_images, C), bool),
      image_id=jnp.asarray(image_id if image_id is not None else np.arange(num_images), jnp.int32))


def test_memory_enqueue_wraps_fifo():
  t = 5
  memory = memory_lib.init_memory(num_classes=C, dim=D, pixel_queue_size=t, region_mode="indexed",
                                  num_images=4)
  queues = [collections.deque(maxlen=t) for _ in range(C)]
  slots = [[None] * t for _ in range(C)]
  ptr = [0] * C
  push = jax.jit(memory_lib.push)
  rng = np.random.default_rng(0)
  next_id = 1
  # Varying numbers of new entries per class and step, including more than T in one step.
  for step in range(7):
    per_class = []
    for c in range(C):
      per_image = []
      for b in range(2):
        n = int(rng.integers(0, 5)) if step != 3 else 4
        per_image.append(list(range(next_id, next_id + n)))
        next_id += n
      per_class.append(per_image)
    memory = push(memory, _update(per_class))
    for c in range(C):
      for i in per_class[c][0] + per_class[c][1]:
        queues[c].append(i)
        slots[c][ptr[c]] = i
        ptr[c] = (ptr[c] + 1) % t
    keys = _ids(memory.pixel_keys)
    valid = np.asarray(memory.pixel_valid)
    for c in range(C):
      expect_valid = [s is not None for s in slots[c]]
      np.testing.assert_array_equal(valid[c], expect_valid)
      np.testing.assert_array_equal(keys[c][valid[c]], [s for s in slots[c] if s is not None])
      assert int(memory.pixel_ptr[c]) == ptr[c]
      # Reading from the head gives the FIFO (oldest first) order.
      order = [slots[c][(ptr[c] + j) % t] for j in range(t)]
      assert [o for o in order if o is not None] == list(queues[c])


def test_memory_keys_are_unit_norm_and_detached():
  b, h, w = 2, 6, 8
  emb = jax.random.normal(jax.random.key(0), (b, h, w, D)) * 3.0
  label = jax.random.randint(jax.random.key(1), (b, h, w), 0, C)
  memory = memory_lib.init_memory(num_classes=C, dim=D, pixel_queue_size=16, region_mode="fifo",
                                  region_queue_size=6)

  def total(emb):
    m = enqueue(memory, emb, label, jnp.arange(b), jax.random.key(2),
                           pixels_per_class=3)
    return jnp.sum(m.pixel_keys) + jnp.sum(m.region_keys)

  np.testing.assert_array_equal(jax.jit(jax.grad(total))(emb), 0.0)
  m = enqueue(memory, emb, label, jnp.arange(b), jax.random.key(2), pixels_per_class=3)
  for keys, valid in ((m.pixel_keys, m.pixel_valid), (m.region_keys, m.region_valid)):
    norms = np.linalg.norm(np.asarray(keys), axis=-1)
    np.testing.assert_allclose(norms[np.asarray(valid)], 1.0, rtol=1e-5)


def test_memory_pixel_keys_come_from_their_class_and_image():
  b, h, w, v = 2, 6, 8, 3
  emb = jax.random.normal(jax.random.key(0), (b, h, w, D))
  emb = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
  label = np.array(jax.random.randint(jax.random.key(1), (b, h, w), 0, C))
  label[0, :, :] = np.where(label[0] == 2, 255, label[0])  # class 2 absent from image 0
  label[1, 0, 0] = 2 if (label[1] == 2).sum() == 0 else label[1, 0, 0]
  update = jax.jit(memory_lib.sample_keys, static_argnames=("num_classes", "pixels_per_class"))(
      emb, jnp.asarray(label), jnp.arange(b), jax.random.key(3), num_classes=C,
      pixels_per_class=v)
  e, keys, valid = np.asarray(emb), np.asarray(update.pixel_keys), np.asarray(update.pixel_valid)
  for i in range(b):
    for c in range(C):
      pix = e[i][label[i] == c]
      assert valid[i, c].sum() == min(v, len(pix))
      chosen = keys[i, c][valid[i, c]]
      if not len(pix):
        continue
      chosen = chosen / np.linalg.norm(chosen, axis=-1, keepdims=True)
      dist = np.abs(chosen[:, None, :] - pix[None, :, :]).max(-1)
      assert (dist.min(1) < 1e-5).all()  # every key is a pixel of class c in image i
      assert len({tuple(np.round(k, 5)) for k in chosen}) == len(chosen)  # without replacement


def test_memory_region_holds_per_image_class_means():
  b, h, w, n = 3, 4, 4, 10
  emb = np.asarray(jax.random.normal(jax.random.key(0), (b, h, w, D)))
  label = np.array(jax.random.randint(jax.random.key(1), (b, h, w), 0, C))
  label[1][label[1] == 1] = 255  # class 1 absent from image 1
  image_id = np.array([7, 2, 5])
  memory = memory_lib.init_memory(num_classes=C, dim=D, pixel_queue_size=8, region_mode="indexed",
                                  num_images=n)
  # An old entry for (class 1, image 2) must survive: the class is absent from the new crop.
  old = np.zeros(D, np.float32)
  old[0] = 1.0
  memory = memory.replace(region_keys=memory.region_keys.at[1, 2].set(old),
                          region_valid=memory.region_valid.at[1, 2].set(True))
  m = enqueue(memory, jnp.asarray(emb), jnp.asarray(label), jnp.asarray(image_id),
                         jax.random.key(0), pixels_per_class=2)
  keys, valid = np.asarray(m.region_keys), np.asarray(m.region_valid)
  expect_valid = np.zeros((C, n), bool)
  expect_valid[1, 2] = True
  for i, img in enumerate(image_id):
    for c in range(C):
      sel = label[i] == c
      if sel.any():
        mean = emb[i][sel].mean(0)
        np.testing.assert_allclose(keys[c, img], mean / np.linalg.norm(mean), atol=1e-5)
        expect_valid[c, img] = True
  np.testing.assert_array_equal(valid, expect_valid)
  np.testing.assert_array_equal(keys[1, 2], old)


def test_memory_region_indexed_duplicate_image_keeps_last():
  memory = memory_lib.init_memory(num_classes=C, dim=D, pixel_queue_size=4, region_mode="indexed",
                                  num_images=5)
  rk = np.zeros((3, C, D), np.float32)
  rk[:, :, 0] = np.arange(1, 4)[:, None]
  rk[:, :, 1] = 1.0
  update = _update([[[], [], []]] * C, num_images=3, image_id=[4, 1, 4])
  update = update.replace(region_keys=jnp.asarray(rk), region_valid=jnp.ones((3, C), bool))
  m = jax.jit(memory_lib.push)(memory, update)
  np.testing.assert_array_equal(_ids(m.region_keys[:, 4]), 3.0)
  np.testing.assert_array_equal(_ids(m.region_keys[:, 1]), 2.0)
  assert int(m.region_valid.sum()) == 2 * C


def test_memory_region_fifo_wraps():
  memory = memory_lib.init_memory(num_classes=C, dim=D, pixel_queue_size=4, region_mode="fifo",
                                  region_queue_size=3)
  push = jax.jit(memory_lib.push)
  seen = [[] for _ in range(C)]
  for step in range(3):
    rk = np.zeros((2, C, D), np.float32)
    rv = np.zeros((2, C), bool)
    for i in range(2):
      for c in range(C):
        rk[i, c, 0], rk[i, c, 1] = 10 * step + i + 1, 1.0
        rv[i, c] = (c + i + step) % 3 != 0
        if rv[i, c]:
          seen[c].append(rk[i, c, 0])
    update = _update([[[], []]] * C).replace(region_keys=jnp.asarray(rk),
                                              region_valid=jnp.asarray(rv))
    memory = push(memory, update)
  for c in range(C):
    ptr = len(seen[c]) % 3
    slots = [None] * 3
    for j, val in enumerate(seen[c]):
      slots[j % 3] = val
    got = _ids(memory.region_keys[c])
    for s in range(3):
      if slots[s] is None:
        assert not bool(memory.region_valid[c, s])
      else:
        assert got[s] == slots[s]
    assert int(memory.region_ptr[c]) == ptr


def test_memory_takes_labels_on_the_embedding_grid_only():
  # Labels are brought to the grid once per step (the objective); a full-size label here is a
  # caller's mistake and is named, not silently resized a second time.
  emb = jax.random.normal(jax.random.key(0), (1, 4, 4, D))
  label = jnp.repeat(jnp.repeat(jnp.arange(16).reshape(1, 4, 4) % C, 4, 1), 4, 2)  # 16x16
  bank = memory_lib.init_memory(num_classes=C, dim=D, pixel_queue_size=8, region_mode="indexed",
                                num_images=2)
  with pytest.raises(ValueError, match=r"label \(1, 16, 16\) must be on the embedding grid"):
    enqueue(bank, emb, label, jnp.array([0]), jax.random.key(0), pixels_per_class=2)
  m = enqueue(bank, emb, label[:, ::4, ::4], jnp.array([0]), jax.random.key(0),
              pixels_per_class=2)
  assert int(m.pixel_valid.sum()) == 2 * C


def test_memory_init_rejects_bad_config():
  with pytest.raises(ValueError, match="num_images"):
    memory_lib.init_memory(num_classes=C, dim=D, pixel_queue_size=4, region_mode="indexed")
  with pytest.raises(ValueError, match="region_mode"):
    memory_lib.init_memory(num_classes=C, dim=D, pixel_queue_size=4, region_mode="x",
                           num_images=3)


def test_memory_pending_update_is_written_first():
  """A bank's pending update (the train step's deferred write) lands before anything else.

  flush(bank with pending u) == push(bank, u); push(bank with pending u1, u2) == push(push(bank,
  u1), u2) in FIFO order; an empty update writes nothing.
  """
  memory = memory_lib.init_memory(num_classes=C, dim=D, pixel_queue_size=5, region_mode="indexed",
                                  num_images=4)
  u1 = _update([[[1, 2], [3]], [[4], []], [[5, 6, 7], [8]]])
  u2 = _update([[[9, 10, 11], [12]], [[13], [14]], [[], [15]]])
  direct = memory_lib.push(memory_lib.push(memory, u1), u2)
  flushed = jax.jit(memory_lib.flush)(memory.replace(pending=u1))
  assert flushed.pending is None
  for got, want in zip(jax.tree.leaves(flushed), jax.tree.leaves(memory_lib.push(memory, u1))):
    np.testing.assert_array_equal(got, want)
  deferred = jax.jit(memory_lib.push)(memory.replace(pending=u1), u2)
  assert deferred.pending is None
  np.testing.assert_array_equal(_ids(deferred.pixel_keys), _ids(direct.pixel_keys))
  for got, want in zip(jax.tree.leaves(deferred), jax.tree.leaves(direct)):
    np.testing.assert_array_equal(got, want)
  # The slots u1 wrote hold u1's ids after u2 (class 1: 4, 13, 14 in slots 0..2).
  np.testing.assert_array_equal(_ids(deferred.pixel_keys)[1, :3], [4, 13, 14])
  empty = memory_lib.empty_update(batch_size=2, num_classes=C, pixels_per_class=4, dim=D)
  assert empty.pixel_keys.shape == u1.pixel_keys.shape
  after = memory_lib.flush(direct.replace(pending=empty))
  for got, want in zip(jax.tree.leaves(after), jax.tree.leaves(direct)):
    np.testing.assert_array_equal(got, want)
  assert memory_lib.flush(direct) is direct  # No pending update: unchanged.
