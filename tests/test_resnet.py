"""Dilated deep-base ResNet, the DeepLabV3 head, and the ResNet segmenters (tiny widths).

Full-width parity with the official DeepLabV3Contrast is checked by the golden
model tests; here the structure is checked on models a few channels wide.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from pixcon_jax import models
from pixcon_jax.models import blocks, deeplab, layers, registry, resnet

# layer4 has 3 blocks so that a 3-rate multi-grid fits, as in ResNet-101.
TINY = dict(stage_depths=(1, 1, 2, 3), width=4, stem_width=4)


def _variables(model, image_shape, seed=0):
  """Variables of `model` drawn with numpy, without running its initialisers.

  Compiling the per-shape random initialisers costs far more than the model
  itself on CPU, so numeric tests fill the `eval_shape` tree directly: kernels
  ~ N(0, 1 / fan_in) keep activations O(1) through the residual stack.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct(image_shape, jnp.float32))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      value = rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    elif name in ("scale", "var"):
      value = 1.0 + 0.1 * rng.uniform(size=leaf.shape)
    else:  # bias, mean
      value = 0.1 * rng.uniform(-1, 1, size=leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _shapes(model, image_shape, **kw):
  """(variables, outputs) as ShapeDtypeStructs: shape checks without compiling anything."""
  image = jax.ShapeDtypeStruct(image_shape, jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), image)
  return variables, jax.eval_shape(lambda v, x: model.apply(v, x, **kw), variables, image)


def _spatial(arrays):
  return [tuple(a.shape[1:3]) for a in arrays]


def _conv_dilations(model, image):
  """rhs_dilation of every 3x3 conv, in execution order, read from the jaxpr."""
  variables = jax.eval_shape(model.init, jax.random.key(0), image)
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, image)
  dilations = []

  def visit(jpr):
    for eqn in jpr.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        if eqn.invars[1].aval.shape[:2] == (3, 3):  # HWIO kernel
          dilations.append(eqn.params["rhs_dilation"][0])
      for p in eqn.params.values():
        inner = getattr(p, "jaxpr", None)
        if inner is not None:
          visit(getattr(inner, "jaxpr", inner))

  visit(jaxpr.jaxpr)
  return dilations


def test_dilation_plan_matches_official_nostride_dilate():
  plan = resnet.dilation_plan(resnet.STAGE_DEPTHS[101], 8, (1, 1, 1))
  assert [p.stride for p in plan] == [1, 2, 1, 1]
  # Block 0 of a dilated stage gets half the dilation (the converted stride-2 conv).
  assert plan[2].dilations == (1,) + (2,) * 22
  assert plan[3].dilations == (2, 4, 4)
  assert resnet.dilation_plan(resnet.STAGE_DEPTHS[101], 8, None) == plan
  os16 = resnet.dilation_plan(resnet.STAGE_DEPTHS[50], 16)
  assert [p.stride for p in os16] == [1, 2, 2, 1]
  assert os16[2].dilations == (1,) * 6 and os16[3].dilations == (1, 2, 2)


def test_multi_grid_dilations():
  assert resnet.dilation_plan((1, 1, 1, 3), 8, (1, 2, 4))[3].dilations == (2, 8, 16)
  assert resnet.dilation_plan((1, 1, 1, 3), 16, (1, 2, 4))[3].dilations == (1, 4, 8)
  with pytest.raises(ValueError, match="multi_grid"):
    resnet.dilation_plan((1, 1, 1, 3), 8, (1, 2))
  # The plan is what the convs get: 3 stem convs, then one 3x3 conv per block. (Read off the
  # native conv ops, which a directly built ResNet's default conv emits.)
  model = resnet.ResNet(**TINY, output_stride=8, multi_grid=(1, 2, 4))
  got = _conv_dilations(model, jnp.zeros((1, 32, 32, 3)))
  assert got == [1, 1, 1] + [1] + [1] + [1, 2] + [2, 8, 16]


@pytest.mark.parametrize("output_stride,layer3,layer4", [(8, (5, 9), (5, 9)),
                                                         (16, (3, 5), (3, 5)),
                                                         (32, (3, 5), (2, 3))])
def test_output_strides(output_stride, layer3, layer4):
  model = resnet.ResNet(**TINY, output_stride=output_stride)
  _, outs = _shapes(model, (1, 33, 65, 3))
  assert len(outs) == 6
  assert _spatial(outs[:4]) == [(17, 33), (9, 17), (9, 17), (5, 9)]
  assert _spatial(outs[4:]) == [layer3, layer4]
  assert [o.shape[-1] for o in outs] == list(model.out_channels) == [8, 8, 16, 32, 64, 128]


@pytest.mark.parametrize("size,stem,pool", [((64, 128), (32, 64), (17, 33)),  # golden case
                                            ((66, 130), (33, 65), (17, 33)),
                                            ((33, 65), (17, 33), (9, 17))])
def test_stem_max_pool_is_ceil_mode(size, stem, pool):
  _, outs = _shapes(resnet.ResNet(**TINY), (1, *size, 3))
  assert _spatial(outs[:2]) == [stem, pool]


def test_max_pool_never_picks_padding():
  # All-negative input: a zero-padded pool would return 0 at the borders.
  x = -1.0 - jnp.arange(2 * 7 * 9, dtype=jnp.float32).reshape(1, 7, 9, 2) / 100
  y = layers.max_pool_ceil(x)
  assert y.shape == (1, 4, 5, 2) and float(y.max()) < 0


def test_avg_pool_ceil_counts_only_real_pixels():
  x = jnp.arange(15, dtype=jnp.float32).reshape(1, 3, 5, 1)
  y = np.asarray(blocks.avg_pool_ceil(x, 2))[0, ..., 0]
  # Last row/column windows are partial: averaged over covered pixels only.
  np.testing.assert_allclose(y, [[3, 5, 6.5], [10.5, 12.5, 14]])


def test_resnet_d_shortcut_builds_and_runs():
  plain_vars, plain = _shapes(resnet.ResNet(**TINY), (1, 33, 65, 3))
  d_model = resnet.ResNet(**TINY, avg_down=True)
  d_vars, d_outs = _shapes(d_model, (1, 33, 65, 3))
  assert _spatial(d_outs) == _spatial(plain)
  names = {"/".join(k) for k in traverse_util.flatten_dict(d_vars["params"])}
  assert "layer2/0/downsample/1/kernel" in names and "layer2/0/downsample/2/scale" in names
  assert not any("downsample/0" in n for n in names)
  plain_names = {"/".join(k) for k in traverse_util.flatten_dict(plain_vars["params"])}
  assert "layer2/0/downsample/0/kernel" in plain_names
  # One real training-mode run on a small image.
  image = jax.random.normal(jax.random.key(1), (2, 17, 17, 3))
  variables = _variables(d_model, image.shape)
  apply = jax.jit(lambda v, x: d_model.apply(v, x, train=True, mutable=["batch_stats"]))
  outs, _ = apply(variables, image)
  assert _spatial(outs[-2:]) == [(3, 3), (3, 3)]
  assert all(bool(jnp.isfinite(o).all()) for o in outs)


def test_official_parameter_names_and_shapes():
  model = resnet.ResNet(depth=101)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  flat = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(shapes["params"]).items()}
  assert flat["resinit/conv1/kernel"] == (3, 3, 3, 64)
  assert flat["resinit/conv3/kernel"] == (3, 3, 64, 128)
  assert flat["layer1/0/downsample/0/kernel"] == (1, 1, 128, 256)
  assert flat["layer3/22/conv2/kernel"] == (3, 3, 256, 256)
  assert flat["layer4/0/downsample/1/scale"] == (2048,)
  assert "layer3/23/conv1/kernel" not in flat
  # Deep stem (3 convs) + 33 bottlenecks x 3 convs; no classifier.
  kernels = [k for k in flat if k.endswith("kernel") and "downsample" not in k]
  assert len(kernels) == 3 + 3 * 33


def test_bf16_compute_keeps_float32_params():
  variables, outs = _shapes(resnet.ResNet(
      **TINY, **registry.layer_defs(dtype=jnp.bfloat16)), (1, 33, 65, 3))
  assert all(o.dtype == jnp.bfloat16 for o in outs)
  assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(variables))


def test_deeplab_head_official_structure():
  head = deeplab.DeepLabV3Head(num_classes=5, aspp_features=8, aux_features=6)
  layer3 = jax.ShapeDtypeStruct((1, 5, 9, 16), jnp.float32)
  layer4 = jax.ShapeDtypeStruct((1, 5, 9, 32), jnp.float32)
  variables = jax.eval_shape(head.init, jax.random.key(0), layer3, layer4)
  flat = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(variables["params"]).items()}
  expected = {
      "layer_dsn/0/kernel": (3, 3, 16, 6), "layer_dsn/0/bias": (6,),
      "layer_dsn/1/0/scale": (6,), "layer_dsn/2/kernel": (1, 1, 6, 5), "layer_dsn/2/bias": (5,),
      "layer_aspp/b0/0/kernel": (1, 1, 32, 8), "layer_aspp/b3/0/kernel": (3, 3, 32, 8),
      "layer_aspp/b4/1/kernel": (1, 1, 32, 8), "layer_aspp/b4/2/0/scale": (8,),
      "layer_aspp/project/0/kernel": (3, 3, 40, 8), "layer_aspp/project/1/0/bias": (8,),
      "refine/0/kernel": (3, 3, 8, 8), "refine/1/scale": (8,),
      "refine/2/kernel": (1, 1, 8, 5), "refine/2/bias": (5,),
  }
  for name, shape in expected.items():
    assert flat.get(name) == shape, name
  # Conv biases exactly where the official spec has them.
  convs = [k[:-len("/kernel")] for k in flat if k.endswith("/kernel")]
  assert sorted(c for c in convs if c + "/bias" in flat) == ["layer_dsn/0", "layer_dsn/2",
                                                             "refine/2"]
  logits, aux = jax.eval_shape(head.apply, variables, layer3, layer4)
  assert logits.shape == aux.shape == (1, 5, 9, 5)
  assert logits.dtype == aux.dtype == jnp.float32


# Tiny full models: a few channels, layer4 with 3 blocks for the default multi-grid (1, 1, 1).
TINY_HEADS = {
    "deeplab_v3": dict(aspp_features=8, aux_features=8),
    "ocr_r101": dict(ocr_channels=8, ocr_key_channels=4),
}


def _tiny_model(name, **kw):
  family = "deeplab_v3" if name.startswith("deeplab") else "ocr_r101"
  extra = dict(proj_dim=8) if name.endswith("_contrast") else {}
  return models.build_model(name, num_classes=5, **TINY, **TINY_HEADS[family], **extra, **kw)


@pytest.mark.parametrize("name,top", [
    ("deeplab_v3_contrast", {"backbone", "decoder", "proj_head"}),
    ("deeplab_v3", {"backbone", "decoder"}),
    ("ocr_r101_contrast", {"backbone", "dsn_head", "conv_3x3", "spatial_ocr_head", "head",
                           "proj_head"}),
    ("ocr_r101", {"backbone", "dsn_head", "conv_3x3", "spatial_ocr_head", "head"}),
])
def test_resnet_segmenters_outputs(name, top):
  variables, out = _shapes(_tiny_model(name), (1, 33, 65, 3))
  assert set(variables["params"]) == top
  expected = {"logits", "aux_logits", "features"} | ({"embedding"} if "proj_head" in top else set())
  assert set(out) == expected
  assert out["logits"].shape == out["aux_logits"].shape == (1, 5, 9, 5)
  assert _spatial(out["features"]) == [(17, 33), (9, 17), (9, 17), (5, 9), (5, 9), (5, 9)]
  if "embedding" in out:
    assert out["embedding"].shape == (1, 5, 9, 8)
    # The projection head reads layer4 (4 * 8 * width channels), as DeepLabV3Contrast does.
    assert variables["params"]["proj_head"]["proj"]["0"]["kernel"].shape == (1, 1, 128, 128)
  assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(out))


def test_deeplab_train_step_updates_stats_and_uses_dropout():
  model = _tiny_model("deeplab_v3_contrast", dropout_rate=0.5)
  image = jax.random.normal(jax.random.key(5), (2, 17, 17, 3))
  variables = _variables(model, image.shape)
  # Dropout before the aux classifier moves it to "3", as in torch's Sequential.
  assert "3" in variables["params"]["decoder"]["layer_dsn"]

  @jax.jit
  def apply(key):
    return model.apply(variables, image, train=True, mutable=["batch_stats"],
                       rngs={"dropout": key})

  (out_a, new_vars), (out_b, _) = apply(jax.random.key(1)), apply(jax.random.key(2))
  assert not np.allclose(out_a["logits"], out_b["logits"])
  old = jax.tree_util.tree_leaves(variables["batch_stats"])
  new = jax.tree_util.tree_leaves(new_vars["batch_stats"])
  assert len(old) == len(new) and not all(np.allclose(a, b) for a, b in zip(old, new))
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree_util.tree_leaves(out_a))
  np.testing.assert_allclose(jnp.linalg.norm(out_a["embedding"], axis=-1), 1.0, rtol=1e-5)


def test_deeplab_bf16_outputs_float32():
  model = _tiny_model("deeplab_v3_contrast", dtype=jnp.bfloat16)
  image = jax.random.normal(jax.random.key(6), (2, 17, 17, 3))
  variables = _variables(model, image.shape)
  out = jax.jit(model.apply)(variables, image)
  assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(out))
  ref = jax.jit(_tiny_model("deeplab_v3_contrast").apply)(variables, image)
  scale = float(jnp.abs(ref["logits"]).max())
  assert float(jnp.abs(out["logits"] - ref["logits"]).max()) < 0.1 * scale


def test_deeplab_rejects_unknown_override():
  with pytest.raises(ValueError, match="aspp_width"):
    models.build_model("deeplab_v3", num_classes=5, aspp_width=8)
