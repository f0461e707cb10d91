"""`:official_mem` (contrast/official_mem.py) against the released memory code's own outputs.

The fixtures in tests/official_mem/ were produced by running tfzhou/ContrastiveSeg's
`loss_contrast_mem.py` and `Trainer._dequeue_and_enqueue` (see the README there).
"""
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixcon_jax import losses
from pixcon_jax.contrast import official_mem

HERE = pathlib.Path(__file__).parent / "official_mem"
LOSS_META = json.loads((HERE / "loss.json").read_text())
ENQUEUE_META = json.loads((HERE / "enqueue.json").read_text())


def _ignore_255(label):
  return np.where(label < 0, 255, label).astype(np.int32)


def _loss_inputs(i):
  ref = np.load(HERE / "loss.npz")
  get = lambda k: ref[f"case{i}/{k}"]
  queues = official_mem.OfficialQueues(
      segment_queue=jnp.asarray(get("segment_queue")), segment_ptr=jnp.zeros(19, jnp.int32),
      pixel_queue=jnp.asarray(get("pixel_queue")), pixel_ptr=jnp.zeros(19, jnp.int32))
  emb = jnp.asarray(get("feats").transpose(0, 2, 3, 1))
  return get, queues, emb


@pytest.mark.parametrize("i", range(len(LOSS_META["cases"])))
def test_loss_and_gradient_equal_the_released_code(i):
  get, queues, emb = _loss_inputs(i)
  settings = LOSS_META["cases"][i]["settings"]
  fn = functools.partial(
      official_mem.official_mem_contrast_loss, label=jnp.asarray(_ignore_255(get("labels"))),
      predict=jnp.asarray(get("predict")), queues=queues, rng=jax.random.PRNGKey(i),
      temperature=settings["temperature"], base_temperature=settings["base_temperature"],
      max_samples=settings["max_samples"], max_views=settings["max_views"])
  (loss, metrics), grad = jax.jit(jax.value_and_grad(fn, has_aux=True))(emb)
  ref = float(get("loss"))
  assert abs(float(loss) - ref) <= 1e-5 * max(1.0, abs(ref)), (float(loss), ref)
  ref_grad = get("grad_feats").transpose(0, 2, 3, 1)
  scale = np.abs(ref_grad).max()
  assert scale > 0
  np.testing.assert_allclose(np.asarray(grad), ref_grad, atol=1e-5 * scale)
  assert int(metrics["n_view"]) == settings["max_views"] == 1


def test_ce_plus_contrast_equals_released_contrast_ce_loss(i=1):
  get, queues, emb = _loss_inputs(i)
  settings = LOSS_META["cases"][i]["settings"]
  logits = jnp.asarray(get("seg").transpose(0, 2, 3, 1))
  label = jnp.asarray(_ignore_255(get("labels")))

  @jax.jit
  def total_loss(logits, emb, label, queues):
    ce, _ = losses.cross_entropy(logits, label, class_weights=losses.CITYSCAPES_CLASS_WEIGHTS,
                                 ignore_label=255)
    contrast, _ = official_mem.official_mem_contrast_loss(
        emb, label, jnp.argmax(logits, -1), queues, jax.random.PRNGKey(0),
        temperature=settings["temperature"], base_temperature=settings["base_temperature"],
        max_samples=settings["max_samples"], max_views=settings["max_views"])
    return ce + settings["loss_weight"] * contrast

  total = float(total_loss(logits, emb, label, queues))
  ref = float(get("contrast_ce_loss"))
  assert abs(total - ref) <= 1e-5 * max(1.0, abs(ref)), (total, ref)


def test_the_zero_rows_and_self_mask_quirks_matter():
  """Without either released quirk the loss moves off the fixture (the test can fail)."""
  get, queues, emb = _loss_inputs(0)
  label = jnp.asarray(_ignore_255(get("labels")))
  predict = jnp.asarray(get("predict"))
  ref = float(get("loss"))
  plain, _ = jax.jit(functools.partial(official_mem.official_mem_contrast_loss,
                                       skip_class0=False))(emb, label, predict, queues,
                                                           jax.random.PRNGKey(0))
  assert abs(float(plain) - ref) > 1e-3


@pytest.mark.parametrize("case", sorted(ENQUEUE_META["cases"]))
def test_enqueue_equals_the_released_dequeue_and_enqueue(case):
  ref = np.load(HERE / "enqueue.npz")
  get = lambda k: ref[f"{case}/{k}"]
  settings = ENQUEUE_META["settings"]
  stride = ENQUEUE_META["cases"][case]["stride"]
  queues = official_mem.OfficialQueues(
      segment_queue=jnp.asarray(get("segment_queue_init")), segment_ptr=jnp.zeros(19, jnp.int32),
      pixel_queue=jnp.asarray(get("pixel_queue_init")), pixel_ptr=jnp.zeros(19, jnp.int32))

  @jax.jit
  def step(queues, keys, label, picks):
    update = official_mem.sample_update(keys, label, None, num_classes=19, label_stride=stride,
                                        pixel_update_freq=settings["update_freq"], picks=picks)
    return official_mem.apply_update(queues, update, ptr_step="one")

  for s in range(settings["steps"]):
    queues = step(queues, jnp.asarray(get(f"keys_{s}").transpose(0, 2, 3, 1)),
                  jnp.asarray(_ignore_255(get(f"labels_{s}"))), jnp.asarray(get(f"picks_{s}")))
    np.testing.assert_array_equal(np.asarray(queues.segment_ptr), get(f"segment_ptr_{s}"))
    np.testing.assert_array_equal(np.asarray(queues.pixel_ptr), get(f"pixel_ptr_{s}"))
    np.testing.assert_allclose(np.asarray(queues.segment_queue), get(f"segment_queue_{s}"),
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(queues.pixel_queue), get(f"pixel_queue_{s}"), atol=1e-6)


@pytest.mark.slow
def test_train_step_runs_the_released_memory_recipe():
  """`:official_mem` through the sharded train step: warm-up, queue update, class 0 skipped."""
  from configs import cityscapes_hrnet  # pylint: disable=g-import-not-at-top
  from pixcon_jax import setup, sharding  # pylint: disable=g-import-not-at-top
  from pixcon_jax import train_step as ts  # pylint: disable=g-import-not-at-top
  config = cityscapes_hrnet.get_config("runlocal,official_mem")
  config.data.batch_size, config.data.crop_size = 2, (32, 32)
  config.memory.official_queue_size = 16
  config.contrast.warmup_steps = 1
  exp = setup.for_training(config)
  state = ts.create_train_state(
      config, exp.train_model, exp.tx, exp.mesh, image_shape=(32, 32, 3), num_classes=19,
      num_train_images=4, rng=jax.random.PRNGKey(0))
  queues = jax.device_get(state.memory)
  np.testing.assert_allclose(np.linalg.norm(queues.pixel_queue, axis=-1), 1.0, rtol=1e-5)
  step = ts.make_train_step(config, exp.train_model, exp.tx, exp.mesh, donate=False)
  rng = np.random.default_rng(0)
  label = np.repeat(np.repeat(rng.integers(0, 4, (2, 4, 4)), 8, 1), 8, 2).astype(np.int32)
  batch = {"image": rng.normal(size=(2, 32, 32, 3)).astype(np.float32) + label[..., None],
           "label": label, "image_id": np.arange(2, dtype=np.int32)}
  metrics = []
  for _ in range(2):
    state, m = step(state, sharding.host_local_to_global(batch, exp.mesh))
    metrics.append(jax.device_get(m))
  assert float(metrics[0]["contrast_weight"]) == 0.0 and float(metrics[1]["contrast_weight"]) == 1.0
  assert np.isfinite(float(metrics[1]["contrast_loss"])) and float(metrics[1]["contrast_loss"]) > 0
  queues = jax.device_get(state.memory)
  # Two steps x two images: each class of the stride-8 label grid moved its segment pointer by
  # one per image; class 0 never moves (released quirk 2).
  present = np.stack([np.isin(np.arange(19), np.unique(label[b, ::8, ::8])) for b in range(2)])
  expected = 2 * present.sum(0)
  expected[0] = 0
  np.testing.assert_array_equal(queues.segment_ptr, expected)


def test_objective_and_enqueue_under_shard_map():
  """The objective's `official_mem` branch and the replicated queue update, on a 1-device mesh."""
  from configs import cityscapes_hrnet  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from pixcon_jax import objective, sharding  # pylint: disable=g-import-not-at-top
  config = cityscapes_hrnet.get_config("runlocal,official_mem")
  config.memory.official_queue_size = 16
  config.contrast.warmup_steps = 3
  config.log.embedding_health = False  # Not under test; a smaller program to compile.
  mesh = sharding.make_mesh(jax.devices()[:1])
  obj = objective.make_objective(config, num_classes=19)
  settings = objective.official_queue_settings(config, num_classes=19)
  assert settings["enqueue_images"] == 2 and settings["label_stride"] == 8

  rng = np.random.default_rng(0)
  label = np.repeat(np.repeat(rng.integers(0, 4, (2, 4, 4)), 8, 1), 8, 2).astype(np.int32)
  emb = rng.normal(size=(2, 8, 8, 16)).astype(np.float32)
  outputs = {"logits": jnp.asarray(rng.normal(size=(2, 8, 8, 19)).astype(np.float32)),
             "embedding": jnp.asarray(emb / np.linalg.norm(emb, axis=-1, keepdims=True))}
  batch = {"label": jnp.asarray(label), "image_id": jnp.arange(2, dtype=jnp.int32)}
  queues = official_mem.init_queues(jax.random.PRNGKey(0), num_classes=19, dim=16, queue_size=16)

  def run(outputs, batch, queues, step):
    share, (metrics, keys) = obj(outputs, batch, queues, jax.random.PRNGKey(1), step)
    new = official_mem.enqueue(queues, *keys, jax.random.PRNGKey(2), axis_name="data", **settings)
    return metrics, new

  fn = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(P("data"), P("data"), P(), P()),
                             out_specs=(P(), P())))
  metrics, new = fn(outputs, batch, queues, jnp.int32(3))
  ref, _ = official_mem.official_mem_contrast_loss(
      outputs["embedding"], batch["label"], jnp.argmax(outputs["logits"], -1), queues,
      jax.random.fold_in(jax.random.PRNGKey(1), 0), max_views=1)
  assert float(metrics["contrast_weight"]) == 1.0
  np.testing.assert_allclose(float(metrics["contrast_loss"]), float(ref), rtol=1e-5)
  present = np.stack([np.isin(np.arange(19), np.unique(label[b, ::8, ::8])) for b in range(2)])
  expected = present.sum(0)
  expected[0] = 0  # Class 0 is never enqueued (released quirk 2).
  np.testing.assert_array_equal(np.asarray(new.segment_ptr), expected)
  metrics, _ = fn(outputs, batch, queues, jnp.int32(2))
  assert float(metrics["contrast_weight"]) == 0.0  # The released 5000-step warm-up, here 3.


_DEVICES_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
from pixcon_jax import sharding
from pixcon_jax.contrast import official_mem
assert jax.device_count() == 4
rng = np.random.default_rng(0)
label = np.repeat(np.repeat(rng.integers(0, 5, (8, 4, 4)), 8, 1), 8, 2).astype(np.int32)
label[:, :8] = 255
keys = rng.normal(size=(8, 8, 8, 16)).astype(np.float32)
queues = official_mem.init_queues(jax.random.PRNGKey(0), num_classes=19, dim=16, queue_size=12)
settings = dict(num_classes=19, label_stride=8, pixel_update_freq=10, enqueue_images=5)
key = jax.random.PRNGKey(3)
one = official_mem.enqueue(queues, jnp.asarray(keys), jnp.asarray(label), key, **settings)
mesh = sharding.make_mesh(jax.devices())
fn = jax.jit(jax.shard_map(
    lambda q, k, l: official_mem.enqueue(q, k, l, key, axis_name="data", **settings),
    mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P()))
four = fn(queues, jnp.asarray(keys), jnp.asarray(label))
for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(four)):
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
assert int(np.asarray(four.segment_ptr).sum()) > 0
print("OK")
"""


def test_enqueue_on_4_devices_equals_1_device():
  """The all-gathered update of 4 devices writes the same queues as one device's global batch."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  repo = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(repo),
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  out = subprocess.run([sys.executable, "-c", _DEVICES_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=600, check=False)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
