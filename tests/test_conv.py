"""cpu/conv.py and models/conv.py: every convolution algorithm computes PyTorch's conv, "auto"
picks as documented, and build_model gives a model the algorithm of the platform it is built for."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixcon_jax import models
from pixcon_jax.cpu import conv
from pixcon_jax.cpu import fusion
from pixcon_jax.models import conv as conv_layer
from pixcon_jax.models import layers

# (H, W, kernel, stride, dilation, padding): the convs of HRNet, the deep-stem ResNet (strided,
# dilated), ASPP (padding = dilation > size), 1x1 shortcuts with stride, and odd sizes.
CASES = [
    (8, 12, 3, 1, 1, 1), (7, 9, 3, 1, 1, 1), (5, 6, 3, 1, 1, 3), (7, 9, 3, 2, 1, 1),
    (7, 9, 3, 1, 2, 2), (6, 7, 3, 2, 2, 2), (8, 12, 1, 1, 1, 0), (7, 9, 1, 2, 1, 0),
]


def _inputs(h, w, k, cin=5, cout=6, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((2, h, w, cin)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((k, k, cin, cout)), jnp.float32)
  return x, kernel


@pytest.mark.parametrize("case", CASES, ids=lambda c: "h%d_w%d_k%d_s%d_d%d_p%d" % c)
def test_algorithms_agree_with_native_conv_in_value_and_gradient(case):
  h, w, k, s, d, p = case
  x, kernel = _inputs(h, w, k)

  def f(x, kernel, impl):
    y = conv.conv2d(x, kernel, stride=s, padding=p, dilation=d, impl=impl)
    return jnp.sum(jnp.sin(y)), y

  (_, ref), ref_grads = jax.value_and_grad(f, (0, 1), has_aux=True)(x, kernel, "xla")
  assert ref.shape == (2, conv.output_size(h, k, s, p, d), conv.output_size(w, k, s, p, d), 6)
  impls = ["matmul"] + (["winograd"] if conv.winograd_applies(kernel.shape, s, d) else [])
  for impl in impls:
    (_, y), grads = jax.value_and_grad(f, (0, 1), has_aux=True)(x, kernel, impl)
    # Products of N(0, 1) values summed over up to 45 terms: float32 rounding is ~1e-6 of that.
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-4, err_msg=impl)
    for g, g_ref in zip(grads, ref_grads):
      np.testing.assert_allclose(g, g_ref, rtol=0, atol=1e-4 * max(1.0, float(jnp.abs(g_ref).max())),
                                 err_msg=impl)


def test_winograd_matches_a_float64_conv_as_closely_as_the_native_op():
  # F(2x2, 3x3) rounds differently from the direct sum; it must not round worse than float32 does.
  x, kernel = _inputs(16, 20, 3, cin=64, cout=32, seed=1)
  with jax.enable_x64(True):
    exact = np.asarray(conv.conv2d(x.astype(jnp.float64), kernel.astype(jnp.float64), padding=1,
                                   impl="xla"))
  scale = np.abs(exact).max()
  for impl in ("xla", "matmul", "winograd"):
    err = np.abs(np.asarray(conv.conv2d(x, kernel, padding=1, impl=impl), np.float64) - exact).max()
    assert err / scale < 2e-6, (impl, err / scale)


def test_winograd_refuses_convs_it_cannot_compute():
  x, kernel = _inputs(8, 8, 3)
  with pytest.raises(ValueError, match="winograd.*stride 2"):
    conv.conv2d(x, kernel, stride=2, padding=1, impl="winograd")
  with pytest.raises(ValueError, match="expected one of"):
    conv.conv2d(x, kernel, padding=1, impl="fft")


def test_choose_impl_follows_backend_dtype_and_shape():
  choose = conv.choose_impl
  big, small = (2, 64, 128, 48), (2, 16, 32, 192)
  k3 = (3, 3, 48, 48)
  kw = dict(stride=1, padding=1, dilation=1, dtype=jnp.float32)
  for backend in ("gpu", "tpu"):
    assert choose(big, k3, backend=backend, **kw) == "xla"
  assert choose(big, k3, backend="cpu", **kw) == "winograd"
  # Too few 2x2 tiles for 16 separate matmuls: 2 * 8 * 16 = 256 < 512.
  assert choose(small, (3, 3, 192, 192), backend="cpu", **kw) == "matmul"
  assert choose(big, (1, 1, 48, 96), backend="cpu", stride=1, padding=0, dilation=1,
                dtype=jnp.float32) == "matmul"
  assert choose(big, k3, backend="cpu", stride=2, padding=1, dilation=1,
                dtype=jnp.float32) == "matmul"
  assert choose(big, k3, backend="cpu", stride=1, padding=2, dilation=2,
                dtype=jnp.float32) == "matmul"
  assert choose(big, k3, backend="cpu", stride=1, padding=1, dilation=1,
                dtype=jnp.bfloat16) == "matmul"
  # Exactly at the tile threshold: 2 * 16 * 16 = 512 tiles.
  k3 = (3, 3, 96, 96)  # 2 * 1024 * 9 * 96 * 96 = 170 MFLOP per image: above MATMUL_MIN_FLOPS.
  assert choose((2, 32, 32, 96), k3, backend="cpu", **kw) == "winograd"
  assert choose((2, 31, 32, 96), k3, backend="cpu", **kw) == "winograd"
  assert choose((1, 32, 32, 96), k3, backend="cpu", **kw) == "matmul"
  # Small convs stay native on CPU too, either side of the FLOP threshold.
  flops = lambda shape, k: 2 * np.prod(shape[:3]) * np.prod(k)
  tiny = (2, 16, 16, 16)
  assert flops(tiny, (3, 3, 16, 16)) < conv.MATMUL_MIN_FLOPS
  assert choose(tiny, (3, 3, 16, 16), backend="cpu", **kw) == "xla"
  assert flops(small, (1, 1, 192, 384)) >= conv.MATMUL_MIN_FLOPS
  assert choose(small, (1, 1, 192, 384), backend="cpu", stride=1, padding=0, dilation=1,
                dtype=jnp.float32) == "matmul"
  assert flops(small, (1, 1, 192, 48)) < conv.MATMUL_MIN_FLOPS
  assert choose(small, (1, 1, 192, 48), backend="cpu", stride=1, padding=0, dilation=1,
                dtype=jnp.float32) == "xla"


def test_conv_layer_has_nn_conv_parameters_and_outputs():
  # Checkpoints and the PyTorch converter address `kernel` (HWIO) and `bias` as nn.Conv names them.
  x, _ = _inputs(9, 10, 3, cin=4)
  ours = conv_layer.Conv(6, 3, stride=2, padding=1, use_bias=True,
                         conv_fn=conv.ConvAlgorithm("matmul"))
  variables = ours.init(jax.random.PRNGKey(0), x)
  assert jax.tree.map(jnp.shape, variables) == {"params": {"kernel": (3, 3, 4, 6), "bias": (6,)}}
  variables = jax.tree.map(lambda v: v + 0.1, variables)  # a non-zero bias
  ref = nn.Conv(6, (3, 3), strides=(2, 2), padding=[(1, 1), (1, 1)]).apply(variables, x)
  np.testing.assert_allclose(ours.apply(variables, x), ref, rtol=0, atol=1e-5)


def test_model_wide_winograd_falls_back_where_it_does_not_apply():
  x, _ = _inputs(8, 8, 3, cin=4)
  layer = conv_layer.Conv(6, 3, stride=2, padding=1, conv_fn=conv.ConvAlgorithm("winograd"))
  variables = layer.init(jax.random.PRNGKey(0), x)
  ref = conv_layer.Conv(6, 3, stride=2, padding=1).apply(variables, x)
  np.testing.assert_allclose(layer.apply(variables, x), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["hrnet_w18_contrast", "deeplab_v3_contrast"])
def test_conv_impl_reaches_every_conv_of_a_model(name, quick_jit):
  # A tiny network gives the same outputs whichever algorithm its convs use (DeepLab here).
  tiny = {"hrnet_w18_contrast": dict(widths=(4, 8, 16, 32), stage_modules=(1, 1, 1),
                                     num_blocks=1, stem_width=8, layer1_planes=4,
                                     layer1_blocks=1, proj_dim=8),
          "deeplab_v3_contrast": dict(stage_depths=(1, 1, 1, 1), width=4, stem_width=4,
                                      aspp_features=8, aux_features=8, proj_dim=8)}[name]
  image = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 48, 3)), jnp.float32)
  build = lambda impl: models.build_model(name, num_classes=3, conv_impl=impl, **tiny)
  variables = jax.eval_shape(lambda: build("xla").init(jax.random.PRNGKey(0), image, train=False))
  if name == "deeplab_v3_contrast":
    # HRNet's outputs under im2col are checked against the official ones (test_parity_models;
    # Winograd there with -m slow); compiling its Winograd graph here would cost a minute.
    variables = quick_jit(lambda: build("xla").init(jax.random.PRNGKey(0), image, train=False))
    # Model-wide "winograd" runs Winograd where it applies and im2col elsewhere (1x1, strided).
    outs = {impl: quick_jit(lambda v, x, m=build(impl): m.apply(v, x, train=False), variables,
                            image) for impl in ("xla", "winograd")}
    for key in ("logits", "embedding"):
      np.testing.assert_allclose(outs["winograd"][key], outs["xla"][key], rtol=0, atol=1e-4,
                                 err_msg=key)
  # And the algorithm reaches every conv: only "xla" traces to conv_general_dilated.
  for impl, native in (("xla", True), ("matmul", False), ("winograd", False)):
    jaxpr = str(jax.make_jaxpr(lambda v, x, m=build(impl): m.apply(v, x, train=False))(
        variables, image))
    assert ("conv_general_dilated" in jaxpr) == native, impl


def test_unknown_conv_impl_is_refused_by_name():
  with pytest.raises(ValueError, match="conv_impl='direct'"):
    models.build_model("hrnet_w18", num_classes=3, conv_impl="direct")


def test_auto_follows_the_platform_the_model_is_built_for_not_the_default_backend():
  # A step lowered for TPU from a CPU host must hold the TPU graph: native convs, no barriers.
  tiny = dict(widths=(4, 8, 16, 32), stage_modules=(1, 1, 1), num_blocks=1, stem_width=8,
              layer1_planes=4, layer1_blocks=1, proj_dim=8)
  image = jnp.zeros((1, 16, 16, 3), jnp.float32)
  build = lambda **kw: models.build_model("hrnet_w18_contrast", num_classes=3, **tiny, **kw)

  def algorithm(model):  # The conv algorithm every conv of the backbone and the heads runs.
    fns = {m.conv.keywords.get("conv_fn", conv_layer.native_conv2d) for m in (model,
                                                                           model.backbone)}
    assert len(fns) == 1, fns
    fn = fns.pop()
    return "xla" if fn is conv_layer.native_conv2d else fn.impl

  assert algorithm(build(platform="tpu")) == "xla"
  assert algorithm(build(platform="gpu")) == "xla"
  assert algorithm(build(platform="cpu")) == "auto"
  assert algorithm(build(platform="tpu", conv_impl="matmul")) == "matmul"  # Explicit wins.
  assert build(platform="tpu").backbone.residual_out is layers.identity
  assert build(platform="cpu").backbone.residual_out is fusion.fusion_barrier
  variables = jax.eval_shape(lambda: build(platform="tpu").init(jax.random.PRNGKey(0), image,
                                                                train=False))
  jaxprs = {p: str(jax.make_jaxpr(lambda v, x, m=build(platform=p): m.apply(v, x, train=False))(
      variables, image)) for p in ("cpu", "tpu")}
  assert "cond[" in jaxprs["cpu"]  # cpu.fusion.fusion_barrier, on CPU only.
  assert "cond[" not in jaxprs["tpu"]
