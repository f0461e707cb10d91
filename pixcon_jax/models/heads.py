"""Segmentation heads: the HRNet/FCN head and the OCR head (Yuan et al., ECCV 2020).

Every module here is named like its official PyTorch counterpart's
`nn.Sequential` (children "0", "1", ...), so the parameter paths equal the
`state_dict` paths. The OCR pieces are separate modules because the two
official OCR networks place them under different names (HRNet-OCR:
`conv3x3` / `ocr_distri_head` / `cls_head` / `aux_head`; ResNet-OCR
`SpatialOCRNet`: `conv_3x3` / `spatial_ocr_head` / `head` / `dsn_head`); the
segmenter names them.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from pixcon_jax.models import layers
from pixcon_jax.models.layers import ModuleDef


def dropout2d(rate: float, *, train: bool, norm: ModuleDef | None = None) -> nn.Module:
  """`nn.Dropout2d` on NHWC (`layers.Dropout2d`: masks drawn per image from its position in the
  global batch, whose mesh axis is `norm`'s BN axis); needs rng 'dropout' when training."""
  return layers.Dropout2d(rate, axis_name=None if norm is None else layers.batch_axis(norm),
                          deterministic=not train)


class ConvBNReLU(layers.ConvNormModule):
  """`nn.Sequential(Conv2d, BNReLU)`: conv under "0", BN under "1.0".

  The official `conv3x3` of HRNet-OCR and `conv_3x3` of ResNet-OCR (3x3 with bias), and the
  ASPP branches of DeepLabV3 (dilated, no bias).

  Attributes:
    features: output channels.
    kernel_size: k; the padding keeps the size (`dilation * (k - 1) // 2`).
    dilation: conv dilation.
    use_bias: conv bias.
  """
  features: int
  kernel_size: int = 3
  use_bias: bool = True
  dilation: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x: [B, h, w, Cin] -> [B, h, w, features]."""
    x = self.conv(self.features, self.kernel_size, dilation=self.dilation,
                  use_bias=self.use_bias, name="0")(x)
    return layers.BNReLU(self.norm, name="1")(x, train)


class FCNHead(layers.ConvNormModule):
  """Conv-BNReLU-[Dropout2d]-conv1x1 classifier.

  With the defaults this is the HRNet `cls_head` (3x3 conv with bias, BNReLU,
  Dropout2d(0.1), 1x1 conv *without* bias, as the official `state_dict` has no
  `cls_head.3.bias`). The index of the last conv follows torch's Sequential:
  "3" after a dropout, "2" without one (HRNet-OCR `aux_head`).

  Attributes:
    num_classes: output channels C.
    hidden: channels of the first conv (None: same as the input).
    dropout: Dropout2d rate, or None for no dropout layer at all.
    final_bias: whether the 1x1 classifier has a bias.
    kernel_size: of the first conv (1 makes it the projection head's `convmlp`).
  """
  num_classes: int
  hidden: int | None = None
  dropout: float | None = 0.1
  final_bias: bool = False
  kernel_size: int = 3

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x: [B, h, w, Cin] -> logits [B, h, w, C] in the compute dtype."""
    hidden = self.hidden or x.shape[-1]
    x = self.conv(hidden, self.kernel_size, use_bias=True, name="0")(x)
    x = layers.BNReLU(self.norm, name="1")(x, train)
    last = "2"
    if self.dropout is not None:
      x = dropout2d(self.dropout, train=train, norm=self.norm)(x)
      last = "3"
    return self.conv(self.num_classes, 1, use_bias=self.final_bias, name=last)(x)


def spatial_gather(feats: jax.Array, probs: jax.Array, scale: float = 1.0) -> jax.Array:
  """OCR soft object regions: class contexts pooled with a spatial softmax of the logits.

  Args:
    feats: [B, h, w, D] pixel representations.
    probs: [B, h, w, C] coarse (aux) logits; softmaxed over the h*w positions.
  Returns:
    [B, C, D] object region representations, in feats' dtype.
  """
  b, h, w, d = feats.shape
  c = probs.shape[-1]
  # The spatial softmax runs in float32: h*w terms are too many for bfloat16 sums.
  weights = jax.nn.softmax(scale * probs.reshape(b, h * w, c).astype(jnp.float32), axis=1)
  ctx = jnp.einsum("bpc,bpd->bcd", weights, feats.reshape(b, h * w, d).astype(jnp.float32))
  return ctx.astype(feats.dtype)


class ConvBNReLUStack(layers.ConvNormModule):
  """1x1 (conv + BNReLU) x n, named "0", "1.0", "2", "3.0", ... (`f_pixel`, `f_down`, ...)."""
  features: tuple[int, ...]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for k, f in enumerate(self.features):
      x = self.conv(f, 1, use_bias=True, name=str(2 * k))(x)
      x = layers.BNReLU(self.norm, name=str(2 * k + 1))(x, train)
    return x


class ObjectAttentionBlock(layers.ConvNormModule):
  """`object_context_block`: pixel-to-object attention (OCR Eq. 3-4), scale 1.

  Attributes:
    key_channels: channels of queries, keys and values (256 in the official heads).
  """
  key_channels: int = 256

  @nn.compact
  def __call__(self, x: jax.Array, proxy: jax.Array, train: bool = False) -> jax.Array:
    """Attends from every pixel to the class contexts.

    Args:
      x: [B, h, w, Cin] pixel representations.
      proxy: [B, C, Cin] object region representations (`spatial_gather`).
    Returns:
      [B, h, w, Cin] object contextual representations.
    """
    k, injected = self.key_channels, self.conv_norm()
    cin = x.shape[-1]
    # The proxy is a [B, C, 1, Cin] "image" in NHWC, as torch's [B, Cin, C, 1].
    proxy = proxy[:, :, None, :]
    query = ConvBNReLUStack((k, k), name="f_pixel", **injected)(x, train)
    key = ConvBNReLUStack((k, k), name="f_object", **injected)(proxy, train)
    value = ConvBNReLUStack((k,), name="f_down", **injected)(proxy, train)
    b, h, w, _ = query.shape
    x_dtype = query.dtype
    query = query.reshape(b, h * w, k).astype(jnp.float32)
    key = key[:, :, 0, :].astype(jnp.float32)
    value = value[:, :, 0, :].astype(jnp.float32)
    sim = jax.nn.softmax(k ** -0.5 * jnp.einsum("bpk,bck->bpc", query, key), axis=-1)
    # The query's dtype is the compute dtype (a BN output).
    context = jnp.einsum("bpc,bck->bpk", sim, value).reshape(b, h, w, k).astype(x_dtype)
    return ConvBNReLUStack((cin,), name="f_up", **injected)(context, train)


class SpatialOCR(layers.ConvNormModule):
  """`SpatialOCR_Module`: object context, then 1x1 conv-BNReLU-Dropout2d on [context, feats].

  Attributes:
    key_channels: attention width (256).
    out_channels: output channels (512).
    dropout: Dropout2d rate (0.05 in the official OCR heads).
  """
  key_channels: int = 256
  out_channels: int = 512
  dropout: float = 0.05

  @nn.compact
  def __call__(self, feats: jax.Array, proxy: jax.Array, train: bool = False) -> jax.Array:
    """feats [B, h, w, Cin], proxy [B, C, Cin] -> [B, h, w, out_channels]."""
    context = ObjectAttentionBlock(self.key_channels, **self.conv_norm(),
                                   name="object_context_block")(feats, proxy, train)
    # `context` first, as in the official torch.cat([context, feats], 1).
    x = jnp.concatenate([context, feats.astype(context.dtype)], axis=-1)
    x = ConvBNReLU(self.out_channels, 1, **self.conv_norm(),
                   name="conv_bn_dropout")(x, train)
    return dropout2d(self.dropout, train=train, norm=self.norm)(x)


def ocr_head(feats: jax.Array, aux_logits: jax.Array, num_classes: int, *, train: bool,
             conv: ModuleDef, norm: ModuleDef, channels: int, key_channels: int,
             names: tuple[str, str, str]) -> jax.Array:
  """The OCR head after the aux logits (call it from a compact method: its modules are its).

  Args:
    feats: [B, h, w, Cin] backbone features.
    aux_logits: [B, h, w, C], the soft object regions.
    num_classes: C.
    train: batch-statistics BN and active dropout.
    conv, norm: the model's `ModuleDef`s.
    channels, key_channels: OCR widths (official 512, 256).
    names: of the 3x3 ConvBNReLU, the `SpatialOCR` and the 1x1 classifier, which the two
      official OCR networks name differently.
  Returns:
    logits [B, h, w, C] in the compute dtype.
  """
  x = ConvBNReLU(channels, 3, conv=conv, norm=norm, name=names[0])(feats, train)
  proxy = spatial_gather(x, aux_logits)
  x = SpatialOCR(key_channels, channels, 0.05, conv=conv, norm=norm, name=names[1])(x, proxy,
                                                                                    train)
  return conv(num_classes, 1, use_bias=True, name=names[2])(x)

