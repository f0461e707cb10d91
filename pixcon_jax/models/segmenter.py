"""Segmentation networks (backbone + head [+ projection head]): their base, HRNet and ResNet-OCR.

Every model is a linen module called as

    out = model.apply(variables, image, train=train,
                      mutable=["batch_stats"] if train else False, rngs={"dropout": key})

with `image [B, H, W, 3]`, and returns a dict of float32 arrays:
  logits      [B, h, w, C]  at the head's stride (1/4 HRNet, 1/8 dilated ResNet), not upsampled;
  aux_logits  [B, h, w, C]  models with an auxiliary head (OCR, DeepLab);
  embedding   [B, h, w, D]  L2-normalised, models with a projection head (`*_contrast`);
  features    list of the backbone outputs (parity intermediates `backbone.i`).

The backbone always sits under the parameter subtree `registry.BACKBONE_PREFIX`, so an
ImageNet backbone checkpoint can initialise it (see `pixcon_jax.convert`).

This module holds the HRNet (FCN / OCR head) and ResNet-OCR segmenters; DeepLabV3 is in
`deeplab.py`. Adding a model: a segmenter class taking `(backbone, num_classes, conv=, norm=,
...)`, registered with `registry.register(name, backbone=..., contrast=...)`.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pixcon_jax.models import heads
from pixcon_jax.models import hrnet
from pixcon_jax.models import layers
from pixcon_jax.models import projection
from pixcon_jax.models import registry


def model_outputs(logits: jax.Array, features: Sequence[jax.Array], *,
                  aux_logits: jax.Array | None = None,
                  embedding: jax.Array | None = None) -> dict[str, Any]:
  """The output dict of every model, cast to float32 whatever the compute dtype."""
  out = {"logits": logits.astype(jnp.float32),
         "features": [f.astype(jnp.float32) for f in features]}
  if aux_logits is not None:
    out["aux_logits"] = aux_logits.astype(jnp.float32)
  if embedding is not None:
    out["embedding"] = embedding.astype(jnp.float32)
  return out


class Segmenter(layers.ConvNormModule):
  """Base of the registered models: a backbone, a classifier of C classes, a projection head.

  `registry.build_model` builds it as `cls(backbone, num_classes, conv=, norm=, **head)`.

  Attributes:
    backbone: the backbone module (its parameters sit under "backbone").
    num_classes: C.
    proj_dim: embedding size D, or None for no projection head.
    proj_type: "convmlp" or "linear".
    conv, norm: the `ModuleDef`s of the heads' convs and BNs.
  """
  backbone: nn.Module
  num_classes: int
  proj_dim: int | None = 256
  proj_type: str = "convmlp"

  def outputs(self, logits: jax.Array, features: Sequence[jax.Array], proj_input: jax.Array, *,
              train: bool, aux_logits: jax.Array | None = None) -> dict[str, Any]:
    """`model_outputs`, with the embedding of `proj_input` by the child `proj_head` (if any).

    Call it from the compact `__call__`, which then owns the projection head.
    """
    emb = None
    if self.proj_dim is not None:
      emb = projection.ProjectionHead(self.proj_dim, self.proj_type, **self.conv_norm(),
                                      name="proj_head")(proj_input, train)
    return model_outputs(logits, features, aux_logits=aux_logits, embedding=emb)


class OCRSegmenter(Segmenter):
  """Base of the segmenters that can have an OCR head (Yuan et al., ECCV 2020).

  Attributes (and `Segmenter`'s):
    ocr_channels: OCR mid channels (512).
    ocr_key_channels: OCR attention width (256).
  """
  ocr_channels: int = 512
  ocr_key_channels: int = 256

  def ocr_logits(self, feats: jax.Array, aux_logits: jax.Array, *, train: bool,
                 names: tuple[str, str, str]) -> jax.Array:
    """`heads.ocr_head` with this model's widths, conv and norm (call it from `__call__`)."""
    return heads.ocr_head(feats, aux_logits, self.num_classes, train=train,
                          channels=self.ocr_channels, key_channels=self.ocr_key_channels,
                          names=names, **self.conv_norm())


class HRNetSegmenter(OCRSegmenter):
  """HRNetV2 + FCN head (`HRNet_W48[_CONTRAST]`) or OCR head (`HRNet_W48_OCR[_CONTRAST]`).

  Both heads and the projection head read the 1/4-scale concatenation of the four
  branches (720 channels for W48). Parameter names follow the official nets:
  FCN: `cls_head`; OCR: `conv3x3`, `ocr_distri_head`, `cls_head`, `aux_head`;
  contrast: `proj_head`.

  Attributes (and `OCRSegmenter`'s; the backbone is an HRNet):
    head: "fcn" or "ocr".
  """
  head: str = "fcn"

  @nn.compact
  def __call__(self, image: jax.Array, train: bool = False) -> dict[str, Any]:
    """image [B, H, W, 3] -> output dict (see the module docstring), h, w = ceil(H/4), ceil(W/4)."""
    injected = self.conv_norm()
    features = self.backbone(image, train)
    feats = hrnet.concat_branches(features)
    aux = None
    if self.head == "fcn":
      logits = heads.FCNHead(self.num_classes, dropout=0.1, final_bias=False, name="cls_head",
                             **injected)(feats, train)
    elif self.head == "ocr":
      aux = heads.FCNHead(self.num_classes, dropout=None, final_bias=True, name="aux_head",
                          **injected)(feats, train)
      logits = self.ocr_logits(feats, aux, train=train,
                               names=("conv3x3", "ocr_distri_head", "cls_head"))
    else:
      raise ValueError(f"HRNet head must be 'fcn' or 'ocr', got {self.head!r}")
    return self.outputs(logits, features, feats, train=train, aux_logits=aux)


class OCRNet(OCRSegmenter):
  """OCR head on a dilated ResNet, named like the official `SpatialOCRNet`.

  `dsn_head` (3x3 conv 512 + BNReLU + Dropout2d(0.05) + 1x1) gives the aux
  logits from the second-to-last backbone output (layer3, 1024 ch); `conv_3x3`,
  the soft object regions and `spatial_ocr_head` run on the last (layer4, 2048
  ch), and `head` is the 1x1 classifier. The projection head (`proj_head`, not
  in the official OCRNet) reads layer4, as `DeepLabV3Contrast` does. Attributes:
  `OCRSegmenter`'s (the backbone a dilated ResNet).
  """

  @nn.compact
  def __call__(self, image: jax.Array, train: bool = False) -> dict[str, Any]:
    """image [B, H, W, 3] -> output dict at the backbone's output stride."""
    features = self.backbone(image, train)
    aux = heads.FCNHead(self.num_classes, hidden=self.ocr_channels, dropout=0.05, final_bias=True,
                        name="dsn_head", **self.conv_norm())(features[-2], train)
    logits = self.ocr_logits(features[-1], aux, train=train,
                             names=("conv_3x3", "spatial_ocr_head", "head"))
    return self.outputs(logits, features, features[-1], train=train, aux_logits=aux)


for _width in (18, 32, 48):
  for _head, _suffix in (("fcn", ""), ("ocr", "_ocr")):
    for _contrast in (False, True):
      registry.register(f"hrnet_w{_width}{_suffix}{'_contrast' if _contrast else ''}",
                        backbone=f"hrnet{_width}", contrast=_contrast, head=_head)(HRNetSegmenter)
registry.register("ocr_r101", backbone="deepbase_resnet101_dilated8", contrast=False)(OCRNet)
registry.register("ocr_r101_contrast", backbone="deepbase_resnet101_dilated8",
                  contrast=True)(OCRNet)
