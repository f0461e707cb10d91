"""FCN / OCR heads and the projection head, against small numpy references."""
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixcon_jax.models import build_model
from pixcon_jax.models import conv
from pixcon_jax.models import heads
from pixcon_jax.models import layers
from pixcon_jax.models import projection


def _flat(tree):
  return flax.traverse_util.flatten_dict(tree, sep=".")


def test_fcn_head_names_shapes_and_channel_dropout():
  head = heads.FCNHead(num_classes=3, dropout=0.5)
  x = jax.random.normal(jax.random.key(0), (2, 5, 7, 6))
  variables = head.init(jax.random.key(1), x)
  params = _flat(variables["params"])
  # Official HRNet cls_head: 0 conv (bias), 1.0 BN, 2 Dropout2d, 3 conv without bias.
  assert set(params) == {"0.kernel", "0.bias", "1.0.scale", "1.0.bias", "3.kernel"}
  assert head.apply(variables, x).shape == (2, 5, 7, 3)
  # Dropout2d drops whole channels: the BNReLU output is zero on all pixels or scaled by 2.
  probe = heads.dropout2d(0.5, train=True)
  y = probe.apply({}, jnp.ones((2, 5, 7, 64)), rngs={"dropout": jax.random.key(2)})
  per_channel = y.reshape(2, 35, 64)
  assert jnp.all(per_channel == per_channel[:, :1])
  assert set(np.unique(np.asarray(y))) == {0.0, 2.0}


def test_channel_dropout_masks_follow_the_image_position_not_the_device():
  # 4 images on one device, and 2 + 2 on two (vmap with an axis name stands in for the devices
  # of shard_map): the same 'dropout' key gives every image the same mask.
  from pixcon_jax.models import layers  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (4, 3, 3, 32)) + 5.0  # no zeros of its own
  key = {"dropout": jax.random.key(3)}
  whole = layers.Dropout2d(0.5).apply({}, x, rngs=key)
  split = jax.vmap(lambda xs: layers.Dropout2d(0.5, axis_name="data").apply({}, xs, rngs=key),
                   axis_name="data")(x.reshape(2, 2, 3, 3, 32)).reshape(x.shape)
  np.testing.assert_array_equal(np.asarray(split), np.asarray(whole))
  kept = np.asarray(whole != 0)[:, 0, 0]  # [4, 32]
  assert 0 < kept.mean() < 1 and len({tuple(r) for r in kept}) == 4  # images differ
  np.testing.assert_allclose(np.asarray(whole)[kept[:, None, None, :].repeat(3, 1).repeat(3, 2)],
                             2 * np.asarray(x)[kept[:, None, None, :].repeat(3, 1).repeat(3, 2)],
                             rtol=1e-6)
  np.testing.assert_array_equal(layers.Dropout2d(0.5, deterministic=True).apply({}, x), x)


def test_aux_head_without_dropout_names_last_conv_2():
  head = heads.FCNHead(num_classes=3, dropout=None, final_bias=True)
  params = _flat(head.init(jax.random.key(0), jnp.zeros((1, 4, 4, 6)))["params"])
  assert "2.kernel" in params and "2.bias" in params


def test_spatial_gather_is_spatial_softmax_pooling():
  rng = np.random.default_rng(0)
  feats = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
  logits = rng.standard_normal((2, 3, 4, 6)).astype(np.float32)
  out = heads.spatial_gather(jnp.asarray(feats), jnp.asarray(logits))
  p = logits.reshape(2, 12, 6)
  w = np.exp(p - p.max(1, keepdims=True))
  w /= w.sum(1, keepdims=True)
  want = np.einsum("bpc,bpd->bcd", w, feats.reshape(2, 12, 5))
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def _bnrelu(params, stats, prefix, x):
  s = params[prefix + ".scale"] / np.sqrt(stats[prefix + ".var"] + 1e-5)
  return np.maximum(x * s + params[prefix + ".bias"] - stats[prefix + ".mean"] * s, 0.0)


def _stack(params, stats, prefix, x, n):
  for k in range(n):
    x = x @ params[f"{prefix}.{2 * k}.kernel"][0, 0] + params[f"{prefix}.{2 * k}.bias"]
    x = _bnrelu(params, stats, f"{prefix}.{2 * k + 1}.0", x)
  return x


def test_spatial_ocr_matches_numpy_reference():
  block = heads.SpatialOCR(key_channels=4, out_channels=5)
  rng = np.random.default_rng(1)
  feats = rng.standard_normal((2, 3, 4, 6)).astype(np.float32)
  proxy = rng.standard_normal((2, 7, 6)).astype(np.float32)
  variables = block.init(jax.random.key(0), feats, proxy)
  # Non-trivial BN statistics so the eval-mode BN is really exercised.
  stats = jax.tree.map(lambda v: v + 0.1, variables["batch_stats"])
  variables = {"params": variables["params"], "batch_stats": stats}
  out = block.apply(variables, feats, proxy)
  assert out.shape == (2, 3, 4, 5)

  p = {k: np.asarray(v) for k, v in _flat(variables["params"]).items()}
  s = {k: np.asarray(v) for k, v in _flat(variables["batch_stats"]).items()}
  ocb = "object_context_block"
  q = _stack(p, s, f"{ocb}.f_pixel", feats.reshape(2, 12, 6), 2)  # [B, hw, K]
  k = _stack(p, s, f"{ocb}.f_object", proxy, 2)  # [B, C, K]
  v = _stack(p, s, f"{ocb}.f_down", proxy, 1)
  sim = np.einsum("bpk,bck->bpc", q, k) * 4 ** -0.5
  sim = np.exp(sim - sim.max(-1, keepdims=True))
  sim /= sim.sum(-1, keepdims=True)
  ctx = _stack(p, s, f"{ocb}.f_up", np.einsum("bpc,bck->bpk", sim, v), 1)
  cat = np.concatenate([ctx, feats.reshape(2, 12, 6)], -1)  # context first
  want = _stack(p, s, "conv_bn_dropout", cat, 1).reshape(2, 3, 4, 5)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)


def test_ocr_head_parameter_names_match_official_spec():
  model = build_model("hrnet_w48_ocr_contrast", num_classes=19, widths=(4, 8, 16, 32),
                      stage_modules=(1, 1, 1), num_blocks=1)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                          jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  params = {k: v.shape for k, v in _flat(shapes["params"]).items()}
  assert params["conv3x3.0.kernel"] == (3, 3, 60, 512)
  assert params["ocr_distri_head.object_context_block.f_pixel.2.kernel"] == (1, 1, 256, 256)
  assert params["ocr_distri_head.object_context_block.f_up.1.0.scale"] == (512,)
  assert params["ocr_distri_head.conv_bn_dropout.0.kernel"] == (1, 1, 1024, 512)
  assert params["cls_head.kernel"] == (1, 1, 512, 19) and "cls_head.bias" in params
  assert params["aux_head.2.kernel"] == (1, 1, 60, 19)
  assert params["proj_head.proj.2.kernel"] == (1, 1, 60, 256)


def test_ocr_on_resnet_reads_layer3_for_aux_and_layer4_for_ocr():
  model = build_model("ocr_r101_contrast", num_classes=3, stage_depths=(1, 1, 1, 1), width=4,
                      stem_width=4, ocr_channels=8, ocr_key_channels=4, proj_dim=8)
  image = jax.ShapeDtypeStruct((2, 33, 47, 3), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), image)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), shapes, image)
  params = {k: v.shape for k, v in _flat(shapes["params"]).items()}
  assert params["dsn_head.0.kernel"] == (3, 3, 64, 8)  # layer3: 16 * width
  assert params["conv_3x3.0.kernel"] == (3, 3, 128, 8)  # layer4: 32 * width
  assert "spatial_ocr_head.object_context_block.f_pixel.0.kernel" in params
  assert params["head.kernel"] == (1, 1, 8, 3)
  assert out["logits"].shape == out["aux_logits"].shape == (2, 5, 7, 3)
  assert out["embedding"].shape == (2, 5, 7, 8)


@pytest.mark.parametrize("proj_type,names", [
    ("convmlp", {"proj.0.kernel", "proj.0.bias", "proj.1.0.scale", "proj.1.0.bias",
                 "proj.2.kernel", "proj.2.bias"}),
    ("linear", {"proj.kernel", "proj.bias"})])
def test_projection_head_is_unit_norm(proj_type, names):
  bf16 = dict(dtype=jnp.bfloat16)
  head = projection.ProjectionHead(proj_dim=8, proj_type=proj_type,
                                   conv=functools.partial(conv.Conv, **bf16),
                                   norm=functools.partial(layers.BatchNorm, **bf16))
  x = jax.random.normal(jax.random.key(0), (2, 3, 5, 6))
  variables = head.init(jax.random.key(1), x)
  assert set(_flat(variables["params"])) == names
  emb = head.apply(variables, x)
  assert emb.shape == (2, 3, 5, 8) and emb.dtype == jnp.float32
  np.testing.assert_allclose(jnp.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)


def test_l2_normalize_zero_vector_stays_zero():
  out = projection.l2_normalize(jnp.zeros((1, 2, 2, 4)))
  assert not jnp.any(jnp.isnan(out)) and jnp.all(out == 0)


def test_unknown_projection_type_raises():
  with pytest.raises(ValueError, match="proj_type"):
    projection.ProjectionHead(proj_type="mlp").init(jax.random.key(0), jnp.zeros((1, 2, 2, 3)))
