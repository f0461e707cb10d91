"""Residual blocks shared by HRNet and the dilated ResNet, named like the official `state_dict`s.

Both official backbones use the same blocks: torchvision's Bottleneck "v1.5" (stride on the 3x3
conv, expansion 4) and BasicBlock, with a projection shortcut `downsample` (1x1 conv "0", BN "1")
wherever the block changes the resolution or the width. Every module takes its conv and norm
injected (`conv`, `norm`: `ModuleDef`s made once by `models.build_model`) and hands the block
output to `residual_out` (the identity, or XLA:CPU's fusion barrier).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from pixcon_jax.models import layers
from pixcon_jax.models.layers import ModuleDef

EXPANSION = 4  # Bottleneck output channels per plane.


def avg_pool_ceil(x: jax.Array, window: int) -> jax.Array:
  """`AvgPool2d(window, window, ceil_mode=True, count_include_pad=False)` on [B, H, W, C].

  A partial last window averages only the pixels it covers, so odd sizes give
  ceil(H / window) outputs, the same grid as the strided 3x3 conv beside it.
  """
  h, w = x.shape[1:3]
  pads = ((0, 0), (0, -h % window), (0, -w % window), (0, 0))
  dims, strides = (1, window, window, 1), (1, window, window, 1)
  total = lax.reduce_window(x.astype(jnp.float32), 0.0, lax.add, dims, strides, pads)
  ones = jnp.ones((1, h, w, 1), jnp.float32)
  count = lax.reduce_window(ones, 0.0, lax.add, dims, strides, pads)
  return (total / count).astype(x.dtype)


class ConvBN(layers.ConvNormModule):
  """`nn.Sequential(Conv2d(bias=False), BN[, ReLU])`: conv under "0", BN under "1"."""
  features: int
  kernel_size: int = 3
  stride: int = 1
  relu: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x: [B, H, W, Cin] -> [B, ceil(H/stride), ceil(W/stride), features]."""
    x = self.conv(self.features, self.kernel_size, stride=self.stride, name="0")(x)
    x = self.norm(use_running_average=not train, name="1")(x)
    return nn.relu(x) if self.relu else x


class Downsample(layers.ConvNormModule):
  """The projection shortcut of a block, named like the official `nn.Sequential`.

  Plain (official): `0` = 1x1 conv with the block's stride, `1` = BN.
  ResNet-D (`avg_down`): `0` = 2x2 average pool (only when strided, no
  parameters), `1` = 1x1 conv with stride 1, `2` = BN. Averaging instead of
  sampling every other pixel keeps the information of the skipped pixels,
  which helps when training from scratch (Bag of Tricks, He et al. 2019).
  """
  features: int
  stride: int = 1
  avg_down: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x: [B, H, W, Cin] -> [B, ceil(H/stride), ceil(W/stride), features]."""
    if self.avg_down:
      if self.stride > 1:
        x = avg_pool_ceil(x, self.stride)
      x = self.conv(self.features, 1, name="1")(x)
      bn_name = "2"
    else:
      x = self.conv(self.features, 1, stride=self.stride, name="0")(x)
      bn_name = "1"
    return self.norm(use_running_average=not train, name=bn_name)(x)


class Bottleneck(layers.ResidualModule):
  """1x1 -> 3x3 (stride, dilation) -> 1x1 (x4 channels), plus the shortcut; ReLU of the sum.

  Attributes:
    planes: bottleneck width; the output has `4 * planes` channels.
    stride: stride of the 3x3 conv (and of the shortcut).
    dilation: dilation of the 3x3 conv; its padding equals the dilation.
    avg_down: ResNet-D projection shortcut (`Downsample`).
  The shortcut is a projection whenever the stride or the width changes, as in the official
  `_make_layer`s (only ever in a stage's first block).
  """
  planes: int
  stride: int = 1
  dilation: int = 1
  avg_down: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x: [B, H, W, Cin] -> [B, ceil(H/stride), ceil(W/stride), 4 * planes]."""
    def bn(name: str) -> nn.Module:
      return self.norm(use_running_average=not train, name=name)

    out_features = EXPANSION * self.planes
    y = nn.relu(bn("bn1")(self.conv(self.planes, 1, name="conv1")(x)))
    y = self.conv(self.planes, 3, stride=self.stride, dilation=self.dilation, name="conv2")(y)
    y = nn.relu(bn("bn2")(y))
    y = bn("bn3")(self.conv(out_features, 1, name="conv3")(y))
    if self.stride != 1 or x.shape[-1] != out_features:
      x = Downsample(out_features, self.stride, self.avg_down, **self.conv_norm(),
                     name="downsample")(x, train)
    return self.residual_out(nn.relu(y + x))


class BasicBlock(layers.ResidualModule):
  """Two 3x3 convs with BN, plus the shortcut (a 1x1 projection if the shape changes); ReLU of the sum.

  Attributes:
    planes: output channels.
    stride: stride of the first conv (and of the shortcut).
    dilation: dilation (= padding) of both 3x3 convs; HRNet's are undilated.
  """
  planes: int
  stride: int = 1
  dilation: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x: [B, H, W, Cin] -> [B, ceil(H/stride), ceil(W/stride), planes]."""
    def bn(name: str) -> nn.Module:
      return self.norm(use_running_average=not train, name=name)

    y = self.conv(self.planes, 3, stride=self.stride, dilation=self.dilation, name="conv1")(x)
    y = nn.relu(bn("bn1")(y))
    y = bn("bn2")(self.conv(self.planes, 3, dilation=self.dilation, name="conv2")(y))
    if self.stride != 1 or x.shape[-1] != self.planes:
      x = Downsample(self.planes, self.stride, **self.conv_norm(),
                     name="downsample")(x, train)
    return self.residual_out(nn.relu(y + x))


class ResidualStack(layers.ResidualModule):
  """A run of residual blocks named "0", "1", ... (ResNet `layerN`, HRNet `layer1`, `branches.i`).

  Attributes:
    block: `Bottleneck` or `BasicBlock` (or a `functools.partial` of one, e.g. `avg_down`).
    planes: the blocks' `planes`.
    dilations: one 3x3 dilation per block (so its length is the number of blocks).
    stride: stride of block 0; the others have stride 1.
  """
  block: ModuleDef
  planes: int
  dilations: Sequence[int]
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x: [B, H, W, Cin] -> [B, ceil(H/stride), ceil(W/stride), block output channels]."""
    for i, dilation in enumerate(self.dilations):
      x = self.block(self.planes, stride=self.stride if i == 0 else 1, dilation=dilation,
                     **self.conv_norm_residual(),
                     name=str(i))(x, train)
    return x
