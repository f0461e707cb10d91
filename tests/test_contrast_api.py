"""The public contrast API (`pixcon_jax.contrast`, contrast/api.py): settings from keywords or a
config, the memory's creation and update, the loss on labels and predictions of any size, and the
same loss and memory inside shard_map and pmap as on one device (2 fake CPU devices, own process).
"""
import importlib.util
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers

from pixcon_jax import contrast
from pixcon_jax import objective
from pixcon_jax.contrast import loss as loss_lib
from pixcon_jax.contrast import memory as memory_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
C, D, B = 4, 8, 3
SMALL = dict(anchors_per_class=4, num_positives=8, num_negatives=16, positive_pool=32,
             negative_pool=64, pixels_per_class=2, pixel_queue_size=6, mining="random")


def _demo_config():
  spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _batch(seed=0, grid=(6, 6), label_scale=2):
  rng = np.random.default_rng(seed)
  emb = rng.normal(size=(B,) + grid + (D,)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
  label = rng.integers(0, C, size=(B, grid[0] * label_scale, grid[1] * label_scale))
  label[0, :3] = 255
  logits = rng.normal(size=(B,) + grid + (C,)).astype(np.float32)
  return jnp.asarray(emb), jnp.asarray(label, jnp.int32), jnp.asarray(logits)


def test_make_settings_keeps_the_config_defaults_and_routes_overrides():
  s = contrast.make_settings(19, temperature=0.07, sources=["batch", "pixel_memory"],
                             pixels_per_class=5, region_mode="fifo", region_queue_size=7)
  # The config's defaults wherever nothing was given: the paper's values (Sec. 3.3, 4.1) but
  # random mining (docs/ABLATIONS.md "Departures").
  assert (s.loss.anchors_per_class, s.loss.num_positives, s.loss.num_negatives) == (50, 1024, 2048)
  assert (s.loss.anchor_sampling, s.loss.mining, s.loss.semi_hard_fraction) == (
      "seg_aware_hard", "random", 0.1)
  assert contrast.make_settings(19).loss.sources == ("pixel_memory", "region_memory")
  assert s.memory.pixel_queue_size is None  # T = 10 N
  assert (s.num_classes, s.loss.temperature, s.loss.sources) == (19, 0.07,
                                                                  ("batch", "pixel_memory"))
  assert (s.memory.pixels_per_class, s.memory.region_mode, s.memory.region_queue_size) == (
      5, "fifo", 7)
  assert hash(s) == hash(contrast.make_settings(19, temperature=0.07, sources=("batch",
      "pixel_memory"), pixels_per_class=5, region_mode="fifo", region_queue_size=7))
  with pytest.raises(TypeError, match="temprature"):
    contrast.make_settings(19, temprature=0.1)
  with pytest.raises(ValueError, match="mining"):
    contrast.make_settings(19, mining="hardest_first")


def test_settings_from_config_match_the_objectives():
  config = _demo_config()
  s = contrast.settings_from_config(config)
  assert s.num_classes == config.model.num_classes == 8
  assert s.loss == objective.contrast_settings(config, num_classes=8)
  assert (s.loss.anchors_per_class, s.loss.mining) == (config.contrast.anchors_per_class,
                                                      config.contrast.mining)
  assert (s.memory.pixels_per_class, s.memory.pixel_queue_size, s.memory.region_mode) == (
      config.memory.pixels_per_class, config.memory.pixel_queue_size, config.memory.region_mode)
  # A run's config.json, read back as plain dicts, gives the same settings.
  assert contrast.settings_from_config(config.to_dict()) == s
  config.contrast.recipe = "official"
  with pytest.raises(ValueError, match="recipe"):
    contrast.settings_from_config(config)


def test_create_memory_sizes_and_batch_only_settings():
  s = contrast.make_settings(C, pixel_queue_size=None)
  bank = contrast.create_memory(settings=s, dim=D, num_images=5)
  assert bank.pixel_keys.shape == (C, 50, D)  # T = 10 N
  assert bank.region_keys.shape == (C, 5, D) and not bool(bank.pixel_valid.any())
  assert contrast.create_memory(settings=contrast.make_settings(C, sources=("batch",)),
                                dim=D) is None
  with pytest.raises(ValueError, match="num_images"):
    contrast.create_memory(settings=s, dim=D)


def test_labels_and_predictions_of_any_size_are_aligned_to_the_grid():
  label = np.random.default_rng(0).integers(0, C, size=(2, 12, 18))
  # Legacy nearest from an exact multiple of the grid picks every other / third pixel.
  np.testing.assert_array_equal(contrast.align_labels(label, (6, 6)), label[:, ::2, ::3])
  logits = np.random.default_rng(1).normal(size=(2, 12, 18, C)).astype(np.float32)
  np.testing.assert_array_equal(contrast.align_predictions(logits, (6, 9)),
                                logits.argmax(-1)[:, ::2, ::2])
  with pytest.raises(ValueError, match="predict"):
    contrast.align_predictions(logits[..., 0], (6, 9))


def test_contrast_loss_is_the_papers_loss_on_the_aligned_inputs(quick_jit):
  emb, label, logits = _batch()
  s = contrast.make_settings(C, **SMALL)
  bank = contrast.create_memory(settings=s, dim=D, num_images=B)
  key = jax.random.key(0)
  bank = contrast.update_memory(bank, emb[::-1], label, key, settings=s, image_id=jnp.arange(B))
  grid_label = jnp.asarray(np.asarray(label)[:, ::2, ::2])  # legacy nearest at scale 2

  def both(emb, label, bank, key, logits):
    api = lambda e: contrast.contrast_loss(e, label, bank, key, settings=s, predict=logits,
                                           image_id=jnp.arange(B))
    (loss, metrics), grad = jax.value_and_grad(api, has_aux=True)(emb)
    expected = loss_lib.pixel_contrast_loss(emb, grid_label, jnp.argmax(logits, -1),
                                            jnp.arange(B), bank, key, settings=s.loss)
    return loss, metrics, grad, expected

  loss, metrics, grad, (expected, expected_metrics) = quick_jit(both, emb, label, bank, key,
                                                                logits)
  assert float(loss) > 0 and float(metrics["num_valid_anchors"]) > 0
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
  assert set(metrics) == set(expected_metrics)
  assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad).max()) > 0


def test_contrast_loss_says_what_is_missing(quick_jit):
  emb, label, logits = _batch()
  s = contrast.make_settings(C, **SMALL)
  bank = contrast.create_memory(settings=s, dim=D, num_images=B)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="seg_aware_hard.*predict"):
    contrast.contrast_loss(emb, label, bank, key, settings=s)
  with pytest.raises(ValueError, match="memory bank"):
    contrast.contrast_loss(emb, label, None, key, settings=s, predict=logits)
  pending = bank.replace(pending=contrast.memory_keys(emb, label, key, settings=s,
                                                      image_id=jnp.arange(B)))
  with pytest.raises(ValueError, match="flush_memory"):
    contrast.contrast_loss(emb, label, pending, key, settings=s, predict=logits)
  with pytest.raises(ValueError, match="image_id"):
    contrast.update_memory(bank, emb, label, key, settings=s)
  # In-batch only with random anchors: no bank, no predictions needed.
  batch_only = contrast.make_settings(C, sources=("batch",), anchor_sampling="random", **{
      k: v for k, v in SMALL.items() if k != "pixel_queue_size"})
  loss, _ = quick_jit(lambda e, l, k: contrast.contrast_loss(e, l, None, k, settings=batch_only),
                      emb, label, key)
  assert float(loss) > 0


def test_update_memory_enqueues_the_steps_keys():
  emb, label, _ = _batch()
  s = contrast.make_settings(C, **SMALL)
  bank = contrast.create_memory(settings=s, dim=D, num_images=5)
  image_id = jnp.asarray([4, 0, 2])
  key = jax.random.key(3)
  new = jax.jit(lambda m, e, l, k, i: contrast.update_memory(m, e, l, k, settings=s,
                                                             image_id=i))(bank, emb, label, key,
                                                                          image_id)
  grid_label = np.asarray(label)[:, ::2, ::2]
  ref = memory_lib.enqueue(bank, emb, jnp.asarray(grid_label), image_id, key, pixels_per_class=2)
  for name in ("pixel_keys", "pixel_valid", "pixel_ptr", "region_keys", "region_valid"):
    np.testing.assert_allclose(np.asarray(getattr(new, name)), np.asarray(getattr(ref, name)),
                               atol=1e-6)
  # Region memory (Sec. 3.2): the normalised mean embedding of class c in image i, at [c, id].
  e = np.asarray(emb)
  for b, i in enumerate(np.asarray(image_id)):
    for c in range(C):
      mask = grid_label[b] == c
      assert bool(new.region_valid[c, i]) == bool(mask.any())
      if mask.any():
        mean = e[b][mask].mean(0)
        np.testing.assert_allclose(np.asarray(new.region_keys[c, i]),
                                   mean / np.linalg.norm(mean), atol=1e-5)
  # Deferred form: the same bank once the pending keys are flushed.
  deferred = bank.replace(pending=contrast.memory_keys(emb, label, key, settings=s,
                                                       image_id=image_id))
  np.testing.assert_allclose(np.asarray(contrast.flush_memory(deferred).pixel_keys),
                             np.asarray(new.pixel_keys), atol=1e-6)


_DISTRIBUTED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from pixcon_jax import contrast
    assert jax.device_count() == 2, jax.devices()
    C, D, B = 4, 8, 4
    rng = np.random.default_rng(0)
    feat = rng.normal(size=(B, 6, 6, 5)).astype(np.float32)
    label = rng.integers(0, C, size=(B, 12, 12)).astype(np.int32)
    logits = rng.normal(size=(B, 6, 6, C)).astype(np.float32)
    ids = np.array([3, 0, 7, 5], np.int32)
    W = rng.normal(size=(5, D)).astype(np.float32)
    s = contrast.make_settings(C, anchors_per_class=4, num_positives=8, num_negatives=16,
                               positive_pool=32, negative_pool=64, pixels_per_class=2,
                               pixel_queue_size=6, mining="random")
    key = jax.random.key(1)

    def embed(W, f):
      e = f @ W
      return e / jnp.linalg.norm(e, axis=-1, keepdims=True)

    def step(W, bank, f, label, logits, ids, key, axis_name=None):
      loss_fn = lambda W: contrast.contrast_loss(embed(W, f), label, bank, key, settings=s,
                                                 predict=logits, image_id=ids,
                                                 axis_name=axis_name)[0]
      loss, grad = jax.value_and_grad(loss_fn)(W)
      bank = contrast.update_memory(bank, embed(W, f), label, key, settings=s, image_id=ids,
                                    axis_name=axis_name)
      return loss, grad, bank

    bank = contrast.create_memory(settings=s, dim=D, num_images=8)
    bank = contrast.update_memory(bank, embed(W, feat[::-1]), label, key, settings=s,
                                  image_id=ids[::-1])
    one = jax.jit(step)(W, bank, feat, label, logits, ids, key)

    mesh = jax.make_mesh((2,), ("data",))
    put = lambda x, spec: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
    specs = (P(), P(), P("data"), P("data"), P("data"), P("data"), P())
    sharded = jax.jit(jax.shard_map(lambda *a: step(*a, axis_name="data"), mesh=mesh,
                                    in_specs=specs, out_specs=(P(), P(), P())))(
        put(W, P()), put(bank, P()), *(put(x, P("data")) for x in (feat, label, logits, ids)),
        put(key, P()))
    split = lambda x: x.reshape((2, B // 2) + x.shape[1:])
    pmapped = jax.pmap(lambda *a: step(*a, axis_name="data"), axis_name="data",
                       in_axes=(None, None, 0, 0, 0, 0, None))(
        W, bank, *(split(x) for x in (feat, label, logits, ids)), key)
    pmapped = jax.tree.map(lambda x: x[1], pmapped)  # device 1's copy

    for name, (loss, grad, new) in (("shard_map", sharded), ("pmap", pmapped)):
      assert float(one[0]) > 0
      np.testing.assert_allclose(float(loss), float(one[0]), rtol=1e-5, err_msg=name)
      if name == "shard_map":  # replicated params: JAX sums the devices' shares of the gradient
        np.testing.assert_allclose(np.asarray(grad), np.asarray(one[1]), atol=1e-5)
      for f in ("pixel_keys", "pixel_valid", "pixel_ptr", "region_keys", "region_valid"):
        np.testing.assert_allclose(np.asarray(getattr(new, f)), np.asarray(getattr(one[2], f)),
                                   atol=1e-6, err_msg=f"{name} {f}")
    print("OK")
""")


def test_shard_map_and_pmap_give_the_single_device_loss_gradient_and_memory():
  env = helpers.subprocess_env(devices=2, PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, "-c", _DISTRIBUTED], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
