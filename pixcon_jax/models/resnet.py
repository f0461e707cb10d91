"""Dilated ResNet-50/101 with the "deep base" stem of the official code.

This mirrors `deepbase_resnet101_dilated8` of the official ContrastiveSeg /
openseg code (the backbone of the paper's DeepLabV3 and OCR ResNet models):

- stem `resinit`: three 3x3 convs (3->64 stride 2, 64->64, 64->128), each with
  BN and ReLU, then `MaxPool2d(3, 2, padding=1, ceil_mode=True)`;
- Bottleneck blocks with the stride on the 3x3 conv (torchvision "v1.5"), and a
  `downsample` shortcut of a strided 1x1 conv + BN;
- dilation instead of stride in layer3/layer4, derived exactly as the official
  `_nostride_dilate` does (see `dilation_plan`).

Parameter names mirror the official `state_dict` (`resinit.conv1`,
`layer3.5.bn2`, `layer1.0.downsample.0`, ...), so a converted checkpoint is a
plain rename. The backbone returns every stage, like the official
`DilatedResnetBackbone.forward`: heads take layer3 (aux) and layer4. The blocks are
`models.blocks`'; conv and norm are injected.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax.linen as nn
import jax

from pixcon_jax.models import blocks
from pixcon_jax.models import layers
from pixcon_jax.models import registry

# Blocks per stage of the Bottleneck ResNets.
STAGE_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
EXPANSION = blocks.EXPANSION


@dataclasses.dataclass(frozen=True)
class StagePlan:
  """Stride of a stage (applied by its block 0) and the 3x3 dilation of each block."""
  stride: int
  dilations: tuple[int, ...]


def dilation_plan(stage_depths: Sequence[int], output_stride: int = 8,
                  multi_grid: Sequence[float] | None = None) -> tuple[StagePlan, ...]:
  """Strides and dilations of the four stages, as the official `_nostride_dilate` sets them.

  The official code builds a stride-32 ResNet, then walks layer3/layer4 and
  rewrites every conv: a conv with stride 2 gets stride 1 and, if it is 3x3,
  dilation `d // 2`; every other 3x3 conv gets dilation `d`. Hence block 0 of
  a dilated stage has *half* the dilation of the rest (quirk 4 of the golden
  README). With a multi-grid, layer4 block i is walked with `d * r_i`, so block
  0 still gets `d * r_0 // 2`.

  Args:
    stage_depths: blocks per stage, e.g. (3, 4, 23, 3).
    output_stride: 8, 16 or 32 (32 = the undilated ResNet).
    multi_grid: per-block rates of layer4, one per block, or None (all 1).
  Returns:
    Four `StagePlan`s (layer1..layer4).
  """
  if len(stage_depths) != 4:
    raise ValueError(f"stage_depths must have 4 entries, got {tuple(stage_depths)}")
  if output_stride not in (8, 16, 32):
    raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
  if multi_grid is not None and len(multi_grid) != stage_depths[3]:
    raise ValueError(f"multi_grid needs one rate per layer4 block ({stage_depths[3]}), "
                     f"got {tuple(multi_grid)}")

  def undilated(depth: int, stride: int) -> StagePlan:
    return StagePlan(stride, (1,) * depth)

  def dilated(depth: int, d: int, grid: Sequence[float]) -> StagePlan:
    # int(d * r) as the official code computes it, then the stride-2 conv gets half.
    rates = [int(d * r) for r in grid]
    return StagePlan(1, tuple([rates[0] // 2] + rates[1:depth]))

  d1, d2, d3, d4 = stage_depths
  grid = tuple(multi_grid) if multi_grid is not None else (1,) * d4
  plan = [undilated(d1, 1), undilated(d2, 2)]
  if output_stride == 8:
    plan += [dilated(d3, 2, (1,) * d3), dilated(d4, 4, grid)]
  elif output_stride == 16:
    plan += [undilated(d3, 2), dilated(d4, 2, grid)]
  else:
    plan += [undilated(d3, 2), undilated(d4, 2)]
  return tuple(plan)


class Stem(layers.ConvNormModule):
  """The deep-base stem `resinit`: conv-BN-ReLU x3, the first with stride 2.

  Attributes:
    width: channels of conv1/conv2; conv3 has 2 * width (official 64 -> 128).
  """
  width: int = 64

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x: [B, H, W, 3] -> [B, ceil(H/2), ceil(W/2), 2 * width]."""
    widths = (self.width, self.width, 2 * self.width)
    for i, (features, stride) in enumerate(zip(widths, (2, 1, 1)), start=1):
      x = self.conv(features, 3, stride=stride, name=f"conv{i}")(x)
      x = nn.relu(self.norm(use_running_average=not train, name=f"bn{i}")(x))
    return x


class ResNet(layers.ResidualModule):
  """Deep-base dilated ResNet backbone.

  Attributes:
    depth: 50, 101 or 152 (ignored when `stage_depths` is given).
    stage_depths: blocks per stage, overriding `depth` (tiny test models).
    width: planes of layer1; layerN has `width * 2**(N-1)` planes and
      `4 * width * 2**(N-1)` output channels (official 64 -> layer4 2048).
    stem_width: channels of the first two stem convs; the stem outputs twice
      that (official 64 -> 128).
    output_stride: 8 (official), 16 or 32.
    multi_grid: per-block rates of layer4 (official config `[1, 1, 1]`).
    avg_down: ResNet-D shortcuts (changes the shortcut parameter names).
    conv, norm: the conv and BN `ModuleDef`s (dtype, algorithm, cross-replica axis).
    residual_out: applied to every block output (`blocks`).
  """
  depth: int = 101
  stage_depths: Sequence[int] | None = None
  width: int = 64
  stem_width: int = 64
  output_stride: int = 8
  multi_grid: Sequence[float] | None = None
  avg_down: bool = False

  def _stage_depths(self) -> tuple[int, ...]:
    if self.stage_depths is not None:
      return tuple(self.stage_depths)
    if self.depth not in STAGE_DEPTHS:
      raise ValueError(f"ResNet depth must be one of {sorted(STAGE_DEPTHS)}, got {self.depth}")
    return STAGE_DEPTHS[self.depth]

  @property
  def out_channels(self) -> tuple[int, ...]:
    """Channels of the six outputs (stem, pool, layer1..layer4)."""
    stages = tuple(EXPANSION * self.width * 2**i for i in range(4))
    return (2 * self.stem_width, 2 * self.stem_width) + stages

  @nn.compact
  def __call__(self, image: jax.Array, train: bool = False) -> list[jax.Array]:
    """image [B, H, W, 3] -> six feature maps (BN on batch statistics if `train`).

    The maps are in the compute dtype, like the official backbone tuple:
      stem [B, H/2, W/2, 2*stem_width], max-pool [B, H/4, W/4, .],
      layer1 [B, H/4, W/4, 4*width], layer2 [B, H/8, W/8, 8*width],
      layer3 and layer4 at stride 8, 16 or 32 by `output_stride`
      ([B, H/8, W/8, 16*width] and [B, H/8, W/8, 32*width] at OS 8).
      Every "/k" rounds up (ceil-mode pool, symmetric padding).
    """
    plan = dilation_plan(self._stage_depths(), self.output_stride, self.multi_grid)
    x = Stem(self.stem_width, **self.conv_norm(), name="resinit")(image, train)
    outputs = [x]
    x = layers.max_pool_ceil(x, 3, 2, 1)
    outputs.append(x)
    block = functools.partial(blocks.Bottleneck, avg_down=self.avg_down)
    for i, stage in enumerate(plan):
      x = blocks.ResidualStack(block, self.width * 2**i, stage.dilations, stage.stride,
                               **self.conv_norm_residual(),
                               name=f"layer{i + 1}")(x, train)
      outputs.append(x)
    return outputs


# The official backbone of the paper's DeepLabV3 and OCR ResNet models: the defaults of ResNet.
registry.register_backbone("deepbase_resnet101_dilated8", fields=(
    "depth", "stage_depths", "width", "stem_width", "output_stride", "multi_grid", "avg_down"))(
        ResNet)
