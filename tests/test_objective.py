"""pixcon_jax/objective.py: the value of the total objective (paper Eq. 4) against numpy.

loss = CE + aux_weight x aux CE + lambda x contrast, with lambda = 0 before
`contrast.warmup_steps`. CE and aux CE are computed here in numpy (class-weighted, 255 ignored);
the contrast term is `pixel_contrast_loss` called directly on the same embedding, aligned labels
and predictions, memory bank and key the objective receives.
"""

import numpy as np
import pytest

C, B, H, W, D = 5, 2, 16, 16, 8
CLASS_WEIGHTS = (0.8, 1.0, 1.3, 0.9, 1.1)
WARMUP, WEIGHT = 3, 0.7


def _config():
  """configs/demo.py (paper recipe: batch + pixel + region memory) at this test's size."""
  from configs import demo  # pylint: disable=g-import-not-at-top
  config = demo.get_config()
  config.model.num_classes = C
  config.model.proj_dim = D
  config.data.batch_size = B
  config.loss.class_weights = CLASS_WEIGHTS
  config.loss.aux_weight = 0.4
  config.contrast.weight = WEIGHT
  config.contrast.warmup_steps = WARMUP
  config.contrast.anchors_per_class = 4
  config.contrast.num_positives = 8
  config.contrast.num_negatives = 16
  config.contrast.positive_pool = 32
  config.contrast.negative_pool = 64
  config.contrast.sources = ("batch", "pixel_memory", "region_memory")  # every source
  config.memory.pixel_queue_size = 16
  return config


def _numpy_ce(logits: np.ndarray, label: np.ndarray) -> float:
  """sum_i w[y_i] (-log softmax(logits_i)[y_i]) / sum_i w[y_i] over pixels with y_i != 255."""
  logits = logits.astype(np.float64)
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  keep = label != 255
  y = label[keep]
  nll = -logp[keep][np.arange(y.size), y]
  w = np.asarray(CLASS_WEIGHTS)[y]
  return float(np.sum(w * nll) / np.sum(w))


def _case(seed: int = 0):
  rng = np.random.default_rng(seed)
  label = rng.integers(0, C, (B, H, W)).astype(np.int32)
  label[rng.random((B, H, W)) < 0.15] = 255
  label[1, :, : W // 2] = 2  # uneven class counts
  logits = rng.normal(size=(B, H, W, C)).astype(np.float32) * 2
  aux_logits = rng.normal(size=(B, H, W, C)).astype(np.float32)
  emb = rng.normal(size=(B, H // 2, W // 2, D)).astype(np.float32)  # the embedding grid is 1/2
  emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
  return ({"logits": logits, "aux_logits": aux_logits, "embedding": emb},
          {"label": label, "image_id": np.arange(B, dtype=np.int32)})


@pytest.mark.parametrize("step", [WARMUP - 1, WARMUP])
def test_objective_is_ce_plus_aux_plus_lambda_contrast(step):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from pixcon_jax import objective, sharding  # pylint: disable=g-import-not-at-top
  from pixcon_jax import train_step as ts  # pylint: disable=g-import-not-at-top
  from pixcon_jax.contrast import loss as contrast_loss  # pylint: disable=g-import-not-at-top
  from pixcon_jax.contrast import labels as contrast_labels  # pylint: disable=g-import-not-at-top
  from pixcon_jax.contrast import memory as memory_lib  # pylint: disable=g-import-not-at-top
  config = _config()
  # With global_batch the objective hands its key to the contrast loss unchanged (per-device
  # sampling would fold in the device index).
  assert config.contrast.global_batch
  outputs, batch = _case()
  # A bank holding one earlier batch's keys, so the memory sources take part.
  bank = memory_lib.flush(ts.init_memory(config, num_classes=C, num_train_images=4))
  rng = jax.random.PRNGKey(7)
  prev, _ = _case(seed=1)
  bank = memory_lib.enqueue(bank, jnp.asarray(prev["embedding"]),
                            contrast_labels.downsample_labels(jnp.asarray(batch["label"]),
                                                              prev["embedding"].shape[1:3]),
                            jnp.asarray([2, 3], jnp.int32), jax.random.PRNGKey(1),
                            pixels_per_class=config.memory.pixels_per_class)
  assert int(np.sum(np.asarray(bank.pixel_valid))) > 0

  mesh = sharding.make_mesh(jax.devices()[:1])
  fn = objective.make_objective(config, num_classes=C, axis_name=sharding.DATA_AXIS)

  def share_and_metrics(o, b, m, r, s):
    share, (metrics, _) = fn(o, b, m, r, s)
    return share[None], metrics  # the share varies per device, the metrics are global

  run = jax.jit(jax.shard_map(
      share_and_metrics, mesh=mesh, in_specs=(P(sharding.DATA_AXIS), P(sharding.DATA_AXIS), P(), P(), P()),
      out_specs=(P(sharding.DATA_AXIS), P())))
  share, metrics = run(outputs, batch, bank, rng, jnp.int32(step))

  # The contrast term, called directly: labels and argmax predictions on the embedding grid by
  # PyTorch's legacy nearest rule (row/col 2i of the 16 x 16 maps), the same bank and key.
  grid_label = batch["label"][:, ::2, ::2]
  grid_pred = np.argmax(outputs["logits"], -1)[:, ::2, ::2].astype(np.int32)
  settings = objective.contrast_settings(config, num_classes=C)
  contrast, _ = jax.jit(lambda e, l, p, i, m, r: contrast_loss.pixel_contrast_loss(
      e, l, p, i, m, r, settings=settings))(outputs["embedding"], grid_label, grid_pred,
                                              batch["image_id"], bank, rng)
  contrast = float(contrast)
  assert contrast > 0.1, contrast  # a real term, not an empty loss

  ce = _numpy_ce(outputs["logits"], batch["label"])
  aux = _numpy_ce(outputs["aux_logits"], batch["label"])
  lam = WEIGHT if step >= WARMUP else 0.0
  expected = ce + 0.4 * aux + lam * contrast
  np.testing.assert_allclose(float(metrics["ce_loss"]), ce, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["aux_ce_loss"]), aux, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["contrast_loss"]), contrast, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["contrast_weight"]), lam)
  np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
  np.testing.assert_allclose(float(share[0]), expected, rtol=1e-5)  # one device: share = total
  # Embedding health of the same grid labels is in the metrics (written by every train step).
  from pixcon_jax.contrast import health  # pylint: disable=g-import-not-at-top
  want = health.embedding_health(jnp.asarray(outputs["embedding"]), jnp.asarray(grid_label),
                                 num_classes=C)
  for k, v in want.items():
    np.testing.assert_allclose(float(metrics[f"embedding/{k}"]), float(v), rtol=1e-5, atol=1e-6)


def test_contrast_settings_defaults_equal_the_config_defaults():
  # One default per knob: every ContrastSettings field that is a config key defaults to the
  # value of configs/common.py; the others are not knobs (set by the code or by benchmarks).
  import dataclasses  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  from pixcon_jax.contrast import loss as loss_lib  # pylint: disable=g-import-not-at-top
  config = common.base_config(model="hrnet_w48_contrast", dataset="cityscapes", num_classes=19,
                              crop_size=(512, 1024), batch_size=8, lr=0.01, total_steps=10)
  keys = {**config.memory.to_dict(), **config.contrast.to_dict()}
  not_knobs = {"num_classes", "ignore_label", "unroll"}
  checked = []
  for field in dataclasses.fields(loss_lib.ContrastSettings):
    if field.name in not_knobs:
      assert field.name not in keys, field.name
      continue
    assert field.name in keys, f"ContrastSettings.{field.name} is not a config key"
    want = keys[field.name]
    want = tuple(want) if isinstance(want, list) else want
    assert field.default == want, (field.name, field.default, want)
    checked.append(field.name)
  assert {"mining", "semi_hard_at_least_k", "sources"} <= set(checked)
