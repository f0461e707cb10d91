"""HRNetV2 backbone (Wang et al., "Deep High-Resolution Representation Learning", TPAMI 2020).

The structure follows the official `HighResolutionNet` of openseg / ContrastiveSeg:
a stem of two 3x3 stride-2 convs, `layer1` (Bottleneck x4, 64 planes), then
stages 2-4 of HighResolutionModules on 2, 3 and 4 parallel branches with widths
`W * [1, 2, 4, 8]`. Every module ends with a multi-resolution fusion whose
upsampling is bilinear with `align_corners=True` (an openseg change from the
original nearest upsampling).

Module names mirror the official `state_dict` so a PyTorch key's dotted module
path is the Flax parameter path: `stage2.0.branches.1.3.conv1`,
`stage4.0.fuse_layers.3.0.2.0`, `transition1.1.0.0`. Plain `nn.Sequential` /
`nn.ModuleList` containers become small container modules whose children are
named "0", "1", ... The residual blocks are `models.blocks`'; every module takes its conv and
norm injected, and the block and fusion outputs go through `residual_out` (`blocks`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pixcon_jax.models import blocks
from pixcon_jax.models import layers
from pixcon_jax.models import registry
from pixcon_jax.models.layers import ModuleDef, ResidualOut


@dataclasses.dataclass(frozen=True)
class HRNetConfig:
  """Static shape of an HRNetV2.

  Attributes:
    widths: channels of the four branches (official `W * (1, 2, 4, 8)`).
    stage_modules: HighResolutionModules in stages 2, 3, 4 (official (1, 4, 3)).
    num_blocks: BasicBlocks per branch in every module (official 4).
    stem_width: channels of the two stem convs (official 64).
    layer1_planes: Bottleneck planes of `layer1`; it outputs 4x that (official 64 -> 256).
    layer1_blocks: Bottlenecks in `layer1` (official 4).
  """
  widths: tuple[int, int, int, int] = (48, 96, 192, 384)
  stage_modules: tuple[int, int, int] = (1, 4, 3)
  num_blocks: int = 4
  stem_width: int = 64
  layer1_planes: int = 64
  layer1_blocks: int = 4

  @property
  def out_channels(self) -> int:
    """Channels of the 1/4-scale concatenation (720 for W48)."""
    return sum(self.widths)


def hrnet_config(width: int, **overrides: Any) -> HRNetConfig:
  """The official HRNetV2-W{width} config (18, 32, 48, 64), with optional overrides."""
  base = HRNetConfig(widths=(width, 2 * width, 4 * width, 8 * width))
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
  return dataclasses.replace(base, **overrides)


class DownChain(layers.ConvNormModule):
  """Successive stride-2 3x3 ConvBN steps named "0", "1", ...; ReLU after all but `last_relu`.

  Used by the transitions (every step has ReLU) and by the fusion of a higher-
  resolution branch into a lower one (no ReLU after the last step).
  """
  features: Sequence[int]
  last_relu: bool

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    n = len(self.features)
    for k, f in enumerate(self.features):
      relu = self.last_relu or k < n - 1
      x = blocks.ConvBN(f, 3, 2, relu, **self.conv_norm(), name=str(k))(x, train)
    return x


class Transition(layers.ConvNormModule):
  """`transition{1,2,3}`: adapts the previous stage's branches to the next stage's.

  Branch i < len(prev) gets a 3x3 ConvBNReLU only if its width changes (torch
  `None` otherwise, so no parameters); each new branch is made from the lowest-
  resolution previous output by stride-2 ConvBNReLU steps.
  """
  prev_channels: Sequence[int]
  widths: Sequence[int]

  @nn.compact
  def __call__(self, xs: Sequence[jax.Array], train: bool = False) -> list[jax.Array]:
    out = []
    num_prev = len(self.prev_channels)
    for i, width in enumerate(self.widths):
      if i >= num_prev:
        steps = [self.prev_channels[-1]] * (i - num_prev) + [width]
        out.append(DownChain(steps, True, **self.conv_norm(), name=str(i))(xs[-1], train))
      elif width != self.prev_channels[i]:
        out.append(blocks.ConvBN(width, 3, 1, True, **self.conv_norm(), name=str(i))(xs[i],
                                                                                      train))
      else:
        out.append(xs[i])
    return out


class FuseRow(layers.ResidualModule):
  """`fuse_layers.i`: brings every branch j to branch i's resolution and width, then sums.

  j > i: 1x1 ConvBN, then bilinear `align_corners=True` upsampling to branch i's
  exact size (so odd sizes work); j < i: i - j stride-2 3x3 ConvBN steps.
  """
  index: int
  widths: Sequence[int]

  @nn.compact
  def __call__(self, xs: Sequence[jax.Array], train: bool = False) -> jax.Array:
    i = self.index
    size = xs[i].shape[1:3]
    y = None
    # Summation order j = 0, 1, ... as in the official forward.
    for j, x in enumerate(xs):
      if j == i:
        z = x
      elif j > i:
        z = blocks.ConvBN(self.widths[i], 1, 1, False, **self.conv_norm(), name=str(j))(x, train)
        z = layers.resize_bilinear(z, size)
      else:
        steps = [self.widths[j]] * (i - j - 1) + [self.widths[i]]
        z = DownChain(steps, False, **self.conv_norm(), name=str(j))(x, train)
      y = z if y is None else y + z
    return self.residual_out(nn.relu(y))


class Branches(layers.ResidualModule):
  """`branches`: one run of BasicBlocks per resolution, "i" for branch i."""
  widths: Sequence[int]
  num_blocks: int

  @nn.compact
  def __call__(self, xs: Sequence[jax.Array], train: bool = False) -> list[jax.Array]:
    return [blocks.ResidualStack(blocks.BasicBlock, w, (1,) * self.num_blocks,
                                 **self.conv_norm_residual(), name=str(i))(x, train)
            for i, (w, x) in enumerate(zip(self.widths, xs))]


class FuseLayers(layers.ResidualModule):
  """`fuse_layers`: one FuseRow per output branch."""
  widths: Sequence[int]

  @nn.compact
  def __call__(self, xs: Sequence[jax.Array], train: bool = False) -> list[jax.Array]:
    return [FuseRow(i, self.widths, **self.conv_norm_residual(), name=str(i))(xs,
                                                                                        train)
            for i in range(len(self.widths))]


class HighResolutionModule(layers.ResidualModule):
  """Parallel BasicBlock `branches` followed by the all-to-all `fuse_layers` (none for 1 branch)."""
  widths: Sequence[int]
  num_blocks: int

  @nn.compact
  def __call__(self, xs: Sequence[jax.Array], train: bool = False) -> list[jax.Array]:
    injected = self.conv_norm_residual()
    xs = Branches(self.widths, self.num_blocks, name="branches", **injected)(xs, train)
    if len(self.widths) == 1:
      return xs
    return FuseLayers(self.widths, name="fuse_layers", **injected)(xs, train)


class Stage(layers.ResidualModule):
  """`stage{2,3,4}`: HighResolutionModules named "0", "1", ..."""
  widths: Sequence[int]
  num_modules: int
  num_blocks: int

  @nn.compact
  def __call__(self, xs: Sequence[jax.Array], train: bool = False) -> list[jax.Array]:
    for m in range(self.num_modules):
      xs = HighResolutionModule(self.widths, self.num_blocks, **self.conv_norm_residual(),
                                name=str(m))(xs, train)
    return xs


class HRNet(layers.ResidualModule):
  """HRNetV2 backbone returning its four branch outputs.

  Attributes:
    config: widths and depths (`hrnet_config(48)` is HRNetV2-W48).
    conv, norm: the conv and BN `ModuleDef`s (dtype, algorithm, cross-replica axis).
    residual_out: applied to every block and fusion output (`blocks`).
  """
  config: HRNetConfig = HRNetConfig()

  @property
  def out_channels(self) -> tuple[int, ...]:
    return tuple(self.config.widths)

  @nn.compact
  def __call__(self, image: jax.Array, train: bool = False) -> list[jax.Array]:
    """Runs the backbone.

    Args:
      image: [B, H, W, 3].
      train: BN uses batch statistics (and updates `batch_stats`) if True.
    Returns:
      Four maps in the compute dtype: [B, H/4, W/4, w0], [B, H/8, W/8, w1],
      [B, H/16, W/16, w2], [B, H/32, W/32, w3], each "/2" rounding up (3x3 stride-2 convs
      with padding 1).
    """
    cfg = self.config
    injected = self.conv_norm_residual()

    def bn(name: str) -> nn.Module:
      return self.norm(use_running_average=not train, name=name)

    x = nn.relu(bn("bn1")(self.conv(cfg.stem_width, 3, stride=2, name="conv1")(image)))
    x = nn.relu(bn("bn2")(self.conv(cfg.stem_width, 3, stride=2, name="conv2")(x)))
    x = blocks.ResidualStack(blocks.Bottleneck, cfg.layer1_planes, (1,) * cfg.layer1_blocks,
                             name="layer1", **injected)(x, train)
    xs = [x]
    prev = (blocks.EXPANSION * cfg.layer1_planes,)
    for s, num_modules in enumerate(cfg.stage_modules):
      widths = tuple(cfg.widths[:s + 2])
      xs = Transition(prev, widths, **self.conv_norm(), name=f"transition{s + 1}")(xs, train)
      xs = Stage(widths, num_modules, cfg.num_blocks, name=f"stage{s + 2}", **injected)(xs,
                                                                                      train)
      prev = widths
    return list(xs)


def concat_branches(xs: Sequence[jax.Array]) -> jax.Array:
  """Upsamples branches 1.. to branch 0's size (align_corners) and concatenates.

  Args:
    xs: the HRNet outputs, [B, h, w, w0], [B, h/2, w/2, w1], ...
  Returns:
    [B, h, w, sum(widths)] (720 channels for W48), in xs[0]'s dtype.
  """
  size = xs[0].shape[1:3]
  return jnp.concatenate([xs[0]] + [layers.resize_bilinear(x, size) for x in xs[1:]], axis=-1)


CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(HRNetConfig))


def build_hrnet(width: int, *, conv: ModuleDef, norm: ModuleDef, residual_out: ResidualOut,
                **config: Any) -> HRNet:
  """HRNetV2-W{width} (`hrnet_config(width, **config)`) with the given conv, norm and hook."""
  return HRNet(hrnet_config(width, **config), conv=conv, norm=norm, residual_out=residual_out)


# Official backbone names (the `network.backbone` config key).
for _width in (18, 32, 48):
  registry.register_backbone(f"hrnet{_width}", fields=CONFIG_FIELDS)(
      functools.partial(build_hrnet, _width))
