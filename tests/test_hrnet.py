"""HRNetV2 backbone and the HRNet segmenters: shapes, names, dtypes (tiny widths)."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixcon_jax.models import build_model
from pixcon_jax.models import hrnet

# The official depth (stage modules 1/4/3, 4 blocks per branch) is only traced (eval_shape);
# forwards that execute use one module per stage and one block per branch.
TINY = dict(widths=(4, 8, 16, 32), stage_modules=(1, 1, 1), num_blocks=1, stem_width=8,
            layer1_planes=4, layer1_blocks=1, proj_dim=8)


def _init(run, model, image):
  return run(lambda x: model.init(jax.random.key(0), x, train=False), image)


def _apply(run, model, variables, image):
  return run(lambda v, x: model.apply(v, x, train=False), variables, image)


@pytest.mark.parametrize("width,depth", [(18, {"stage_modules": (1, 1, 1), "num_blocks": 1}),
                                         (32, {"stage_modules": (1, 2, 1), "num_blocks": 2}),
                                         (48, {})])
def test_official_structure_with_tiny_widths_gives_branch_shapes(width, depth):
  # The W18/W32/W48 structures differ only in widths: scale those down by 6. Only W48 keeps the
  # official depth, as tracing it takes seconds (nothing is computed: eval_shape).
  small = width // 6
  model = build_model(f"hrnet_w{width}_contrast", num_classes=5,
                      widths=(small, 2 * small, 4 * small, 8 * small), proj_dim=8, **depth)
  image = jax.ShapeDtypeStruct((2, 64, 96, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), image)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, image)
  assert [f.shape for f in out["features"]] == [
      (2, 16, 24, small), (2, 8, 12, 2 * small), (2, 4, 6, 4 * small), (2, 2, 3, 8 * small)]
  assert out["logits"].shape == (2, 16, 24, 5)
  assert out["embedding"].shape == (2, 16, 24, 8)
  params = flax.traverse_util.flatten_dict(variables["params"], sep=".")
  if depth:
    return
  # Module paths of the official state_dict (stage 3 has 4 modules, stage 4 has 3).
  for key in ["backbone.conv1.kernel", "backbone.layer1.3.conv3.kernel",
              "backbone.layer1.0.downsample.0.kernel", "backbone.transition1.0.0.kernel",
              "backbone.transition1.1.0.0.kernel", "backbone.transition3.3.0.0.kernel",
              "backbone.stage3.3.branches.2.3.conv2.kernel",
              "backbone.stage4.2.fuse_layers.3.0.2.0.kernel",
              "backbone.stage4.2.fuse_layers.0.3.1.scale", "cls_head.0.bias", "cls_head.3.kernel",
              "proj_head.proj.1.0.scale"]:
    assert key in params, key
  # Unchanged branch widths have no transition conv (torch `None`); the classifier has no bias.
  assert not any(k.startswith("backbone.transition2.0.") for k in params)
  assert "cls_head.3.bias" not in params


def test_odd_sizes_batch_two_run_and_match_per_image(quick_jit):
  model = build_model("hrnet_w18", num_classes=3, **{k: v for k, v in TINY.items()
                                                    if k != "proj_dim"})
  image = jax.random.normal(jax.random.key(2), (2, 37, 45, 3))
  variables = _init(quick_jit, model, image)
  out = _apply(quick_jit, model, variables, image)
  # 37 -> 19 -> 10 (stem), then 5, 3, 2: every stride-2 step rounds up.
  assert [f.shape[1:3] for f in out["features"]] == [(10, 12), (5, 6), (3, 3), (2, 2)]
  assert out["logits"].shape == (2, 10, 12, 3) and out["logits"].dtype == jnp.float32
  single = _apply(quick_jit, model, variables, image[1:])
  np.testing.assert_allclose(out["logits"][1:], single["logits"], rtol=1e-5, atol=1e-4)


def test_train_mode_cross_replica_bn_equals_one_big_batch(quick_jit):
  # Two replicas of one image each, BN synchronised over the mapped axis, must equal
  # plain training on the batch of two: the statistics are then global.
  image = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
  local = build_model("hrnet_w32_contrast", num_classes=3, **TINY)
  synced = build_model("hrnet_w32_contrast", num_classes=3, bn_axis_name="data", **TINY)
  variables = _init(quick_jit, local, image)

  def train(model, v, x):
    return model.apply(v, x, train=True, mutable=["batch_stats"],
                       rngs={"dropout": jax.random.key(4)})

  def both(v, x):
    per_replica = jax.vmap(lambda xi: train(synced, v, xi[None]), axis_name="data")(x)
    return train(local, v, x), per_replica

  (out, updated), (rep_out, rep_updated) = quick_jit(both, variables, image)
  assert out["embedding"].shape == (2, 8, 8, 8)
  old = variables["batch_stats"]["backbone"]["bn1"]["mean"]
  new = updated["batch_stats"]["backbone"]["bn1"]["mean"]
  assert not np.allclose(old, new)
  # The 1/32 branch is 1x1 per image: its BN normalises over 2 values, which amplifies the
  # float32 rounding of the two summation orders (measured 1.8e-4 on an AVX-512 CPU); a missing
  # synchronisation changes the statistics, and these features, by O(1).
  np.testing.assert_allclose(rep_out["features"][3][:, 0], out["features"][3], rtol=1e-3,
                             atol=1e-3)
  for path, value in flax.traverse_util.flatten_dict(updated["batch_stats"]).items():
    rep = flax.traverse_util.flatten_dict(rep_updated["batch_stats"])[path]
    # Running statistics downstream of that branch carry the same amplified rounding
    # (measured 1.2e-4 relative in a stage-4 fuse layer's variance).
    np.testing.assert_allclose(rep[0], value, rtol=1e-3, atol=1e-5, err_msg=str(path))


def test_bfloat16_compute_keeps_float32_params_and_outputs_close(quick_jit):
  image = jax.random.normal(jax.random.key(5), (1, 32, 48, 3))
  f32 = build_model("hrnet_w48_ocr_contrast", num_classes=4, ocr_channels=16, ocr_key_channels=8,
                    **TINY)
  bf16 = build_model("hrnet_w48_ocr_contrast", num_classes=4, dtype=jnp.bfloat16,
                     ocr_channels=16, ocr_key_channels=8, **TINY)
  variables = _init(quick_jit, bf16, image)
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  ref = _apply(quick_jit, f32, variables, image)
  out = _apply(quick_jit, bf16, variables, image)
  for key in ("logits", "aux_logits", "embedding"):
    assert out[key].dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(ref[key])))
    assert float(jnp.max(jnp.abs(out[key] - ref[key]))) < 0.05 * max(scale, 1.0), key


def test_concat_branches_upsamples_with_align_corners():
  xs = [jnp.zeros((1, 4, 6, 1)), jnp.arange(6.0).reshape(1, 2, 3, 1)]
  y = hrnet.concat_branches(xs)
  assert y.shape == (1, 4, 6, 2)
  # align_corners=True keeps the corner samples exactly.
  np.testing.assert_allclose(y[0, [0, 0, -1, -1], [0, -1, 0, -1], 1], [0.0, 2.0, 3.0, 5.0])


def test_hrnet_config_official_widths_and_overrides():
  cfg = hrnet.hrnet_config(48)
  assert cfg.widths == (48, 96, 192, 384) and cfg.out_channels == 720
  assert hrnet.hrnet_config(18, stage_modules=[1, 1, 1]).stage_modules == (1, 1, 1)
