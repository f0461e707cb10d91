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

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pixcon_jax.models import layers

Dtype = Any


def dropout2d(rate: float, *, train: bool) -> nn.Dropout:
  """`nn.Dropout2d` on NHWC: one keep/drop decision per (image, channel), needs rng 'dropout'."""
  return nn.Dropout(rate, broadcast_dims=(1, 2), deterministic=not train)


class ConvBNReLU(nn.Module):
  """`nn.Sequential(Conv2d(bias=True), BNReLU)`: conv under "0", BN under "1.0".

  The official `conv3x3` of HRNet-OCR and `conv_3x3` of ResNet-OCR.
  """
  features: int
  kernel_size: int = 3
  use_bias: bool = True
  bn_axis_name: str | None = None
  dtype: Dtype = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x: [B, h, w, Cin] -> [B, h, w, features]."""
    x = layers.conv(self.features, self.kernel_size, use_bias=self.use_bias, dtype=self.dtype,
                    impl=self.conv_impl, name="0")(x)
    return layers.BNReLU(train, self.bn_axis_name, dtype=self.dtype, name="1")(x)


class FCNHead(nn.Module):
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
  """
  num_classes: int
  hidden: int | None = None
  dropout: float | None = 0.1
  final_bias: bool = False
  bn_axis_name: str | None = None
  dtype: Dtype = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x: [B, h, w, Cin] -> logits [B, h, w, C] in `dtype`."""
    hidden = self.hidden or x.shape[-1]
    x = layers.conv(hidden, 3, use_bias=True, dtype=self.dtype, impl=self.conv_impl, name="0")(x)
    x = layers.BNReLU(train, self.bn_axis_name, dtype=self.dtype, name="1")(x)
    last = "2"
    if self.dropout is not None:
      x = dropout2d(self.dropout, train=train)(x)
      last = "3"
    return layers.conv(self.num_classes, 1, use_bias=self.final_bias, dtype=self.dtype,
                       impl=self.conv_impl, name=last)(x)


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


class ConvBNReLUStack(nn.Module):
  """1x1 (conv + BNReLU) x n, named "0", "1.0", "2", "3.0", ... (`f_pixel`, `f_down`, ...)."""
  features: tuple[int, ...]
  bn_axis_name: str | None = None
  dtype: Dtype = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for k, f in enumerate(self.features):
      x = layers.conv(f, 1, use_bias=True, dtype=self.dtype, impl=self.conv_impl,
                      name=str(2 * k))(x)
      x = layers.BNReLU(train, self.bn_axis_name, dtype=self.dtype, name=str(2 * k + 1))(x)
    return x


class ObjectAttentionBlock(nn.Module):
  """`object_context_block`: pixel-to-object attention (OCR Eq. 3-4), scale 1.

  Attributes:
    key_channels: channels of queries, keys and values (256 in the official heads).
  """
  key_channels: int = 256
  bn_axis_name: str | None = None
  dtype: Dtype = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, proxy: jax.Array, train: bool = False) -> jax.Array:
    """Attends from every pixel to the class contexts.

    Args:
      x: [B, h, w, Cin] pixel representations.
      proxy: [B, C, Cin] object region representations (`spatial_gather`).
    Returns:
      [B, h, w, Cin] object contextual representations.
    """
    k, ax, dt = self.key_channels, self.bn_axis_name, self.dtype
    cin = x.shape[-1]
    # The proxy is a [B, C, 1, Cin] "image" in NHWC, as torch's [B, Cin, C, 1].
    proxy = proxy[:, :, None, :]
    query = ConvBNReLUStack((k, k), ax, dt, conv_impl=self.conv_impl, name="f_pixel")(x, train)
    key = ConvBNReLUStack((k, k), ax, dt, conv_impl=self.conv_impl, name="f_object")(proxy, train)
    value = ConvBNReLUStack((k,), ax, dt, conv_impl=self.conv_impl, name="f_down")(proxy, train)
    b, h, w, _ = query.shape
    query = query.reshape(b, h * w, k).astype(jnp.float32)
    key = key[:, :, 0, :].astype(jnp.float32)
    value = value[:, :, 0, :].astype(jnp.float32)
    sim = jax.nn.softmax(k ** -0.5 * jnp.einsum("bpk,bck->bpc", query, key), axis=-1)
    context = jnp.einsum("bpc,bck->bpk", sim, value).reshape(b, h, w, k).astype(dt)
    return ConvBNReLUStack((cin,), ax, dt, conv_impl=self.conv_impl, name="f_up")(context, train)


class SpatialOCR(nn.Module):
  """`SpatialOCR_Module`: object context, then 1x1 conv-BNReLU-Dropout2d on [context, feats].

  Attributes:
    key_channels: attention width (256).
    out_channels: output channels (512).
    dropout: Dropout2d rate (0.05 in the official OCR heads).
  """
  key_channels: int = 256
  out_channels: int = 512
  dropout: float = 0.05
  bn_axis_name: str | None = None
  dtype: Dtype = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, feats: jax.Array, proxy: jax.Array, train: bool = False) -> jax.Array:
    """feats [B, h, w, Cin], proxy [B, C, Cin] -> [B, h, w, out_channels]."""
    context = ObjectAttentionBlock(self.key_channels, self.bn_axis_name, self.dtype,
                                   conv_impl=self.conv_impl,
                                   name="object_context_block")(feats, proxy, train)
    # `context` first, as in the official torch.cat([context, feats], 1).
    x = jnp.concatenate([context, feats.astype(context.dtype)], axis=-1)
    x = ConvBNReLU(self.out_channels, 1, bn_axis_name=self.bn_axis_name, dtype=self.dtype,
                   conv_impl=self.conv_impl, name="conv_bn_dropout")(x, train)
    return dropout2d(self.dropout, train=train)(x)

