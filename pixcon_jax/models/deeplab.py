"""DeepLabV3 (`deeplab_v3[_contrast]`): the official `DeepLabV3Contrast` head on a dilated ResNet.

The official model (`lib/models/nets/deeplab.py`, `modules/decoder_block.py`)
is: a deep-base ResNet-101 dilated to output stride 8; `decoder.layer_dsn`, an
aux classifier on layer3; `decoder.layer_aspp`, ASPP on layer4 with rates
12/24/36 and an image-pool branch; `decoder.refine`, a 3x3 conv + BN (no ReLU)
then the 1x1 classifier; and `proj_head` on layer4 for the embedding.
Logits stay at the backbone stride; only the losses upsample.

Submodules are named like the official `nn.Sequential` children ("0", "1",
...); a `BNReLU` keeps its BN under "0". Indices of parameter-free children
(pooling, dropout) are skipped as in torch, so the converter is a rename.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pixcon_jax.models import heads
from pixcon_jax.models import layers
from pixcon_jax.models import registry
from pixcon_jax.models import segmenter


class ImagePooling(layers.ConvNormModule):
  """ASPP image-level branch `b4`: global average pool ("0"), 1x1 conv ("1"), BNReLU ("2").

  In training its BN sees one value per image and channel, so it needs a
  batch > 1 (or cross-replica BN over `bn_axis_name`), as in PyTorch.
  """
  features: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x: [B, H, W, Cin] -> [B, 1, 1, features]."""
    # Pool in float32: a bf16 sum over H*W pixels loses precision.
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
    y = self.conv(self.features, 1, name="1")(pooled)
    return layers.BNReLU(self.norm, name="2")(y, train)


class ASPP(layers.ConvNormModule):
  """Atrous spatial pyramid pooling, the official `ASPPModule` (DeepLabV3).

  Branches: `b0` 1x1, `b1..b3` 3x3 with dilation `rates`, `b4` image pool
  broadcast back with align_corners bilinear; all without conv bias. The
  five are concatenated in that order and fused by `project`, a *3x3* conv
  (official choice; the DeepLabV3 paper uses 1x1) + BNReLU.

  Attributes:
    features: channels of every branch and of the output (official 512).
    rates: dilations of b1..b3 (official 12, 24, 36 at output stride 8).
    dropout_rate: channel dropout after `project`. The official module has
      none, so the default is 0 (no parameters either way).
  """
  features: int = 512
  rates: Sequence[int] = (12, 24, 36)
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x: [B, h, w, Cin] -> [B, h, w, features]."""
    h, w = x.shape[1:3]
    kw = dict(use_bias=False, **self.conv_norm())
    branches = [heads.ConvBNReLU(self.features, 1, name="b0", **kw)(x, train)]
    for i, rate in enumerate(self.rates, start=1):
      branches.append(heads.ConvBNReLU(self.features, 3, dilation=rate, name=f"b{i}",
                                       **kw)(x, train))
    pooled = ImagePooling(self.features, **self.conv_norm(),
                          name=f"b{len(self.rates) + 1}")(x, train)
    branches.append(layers.resize_bilinear(pooled, (h, w)))
    y = jnp.concatenate(branches, axis=-1)
    y = heads.ConvBNReLU(self.features, 3, name="project", **kw)(y, train)
    return heads.dropout2d(self.dropout_rate, train=train, norm=self.norm)(y)


class Refine(layers.ConvNormModule):
  """`decoder.refine`: 3x3 conv ("0") + BN ("1") with *no* ReLU, then the 1x1 classifier ("2").

  The missing ReLU is the official code's (quirk 9), kept for checkpoint parity.
  """
  num_classes: int
  features: int = 512

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x: [B, h, w, Cin] -> logits [B, h, w, C] in float32."""
    x = self.conv(self.features, 3, name="0")(x)
    x = self.norm(use_running_average=not train, name="1")(x)
    x = self.conv(self.num_classes, 1, use_bias=True, name="2")(x)
    return x.astype(jnp.float32)


class DeepLabV3Head(layers.ConvNormModule):
  """The official `DeepLabHead` (named `decoder` in the model).

  Attributes:
    num_classes: C.
    aspp_features: ASPP / refine width (official 512).
    aux_features: hidden width of the aux head (official 256).
    rates: ASPP dilations (official 12/24/36 at output stride 8; halve them at 16).
    dropout_rate: Dropout2d of the ASPP output and before the aux classifier.
      The official head has none, so the default 0 keeps its structure.
  """
  num_classes: int
  aspp_features: int = 512
  aux_features: int = 256
  rates: Sequence[int] = (12, 24, 36)
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, layer3: jax.Array, layer4: jax.Array,
               train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Runs the head.

    Args:
      layer3: [B, h, w, C3] backbone stage 3 (aux input).
      layer4: [B, h, w, C4] backbone stage 4.
      train: batch-statistics BN and active dropout.
    Returns:
      (logits, aux_logits), both [B, h, w, C] float32.
    """
    kw = self.conv_norm()
    # Official `layer_dsn`: [3x3 conv (bias), BNReLU, 1x1 conv (bias)]; a dropout, if asked
    # for, sits before the classifier and moves it to "3" as torch's Sequential would.
    aux = heads.FCNHead(self.num_classes, self.aux_features, self.dropout_rate or None,
                        final_bias=True, name="layer_dsn", **kw)(layer3, train)
    feats = ASPP(self.aspp_features, self.rates, self.dropout_rate, name="layer_aspp",
                 **kw)(layer4, train)
    logits = Refine(self.num_classes, self.aspp_features, name="refine", **kw)(feats, train)
    return logits, aux


class DeepLabV3(segmenter.Segmenter):
  """`DeepLabV3Contrast` (with `proj_dim`) or `DeepLabV3` (without): backbone, decoder, proj_head.

  As in the official forward, the decoder reads the last two backbone outputs
  (layer3 for the aux logits, layer4 for ASPP) and the projection head reads
  layer4 (2048 channels, so its hidden conv is 2048 wide). Registered on the official
  deep-base ResNet-101 at output stride 8 (multi-grid 1, 1, 1).

  Attributes: `Segmenter`'s, and `aspp_features`, `aux_features`, `rates`, `dropout_rate`
  (see `DeepLabV3Head`).
  """
  aspp_features: int = 512
  aux_features: int = 256
  rates: Sequence[int] = (12, 24, 36)
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, image: jax.Array, train: bool = False) -> dict[str, Any]:
    """image [B, H, W, 3] -> the segmenter output dict at the backbone stride.

    `logits`, `aux_logits` [B, h, w, C], `embedding` [B, h, w, D] (if
    `proj_dim`), `features` (the six backbone outputs), all float32.
    """
    features = self.backbone(image, train)
    logits, aux = DeepLabV3Head(self.num_classes, self.aspp_features, self.aux_features,
                                self.rates, self.dropout_rate, **self.conv_norm(),
                                name="decoder")(features[-2], features[-1], train)
    return self.outputs(logits, features, features[-1], train=train, aux_logits=aux)


for _name, _contrast in (("deeplab_v3", False), ("deeplab_v3_contrast", True)):
  registry.register(_name, backbone="deepbase_resnet101_dilated8", contrast=_contrast)(DeepLabV3)
