"""Segmentation networks (backbone + head [+ projection head]) and the registry of named models.

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

from pixcon_jax.models import conv as conv_lib
from pixcon_jax.models import heads
from pixcon_jax.models import hrnet
from pixcon_jax.models import layers
from pixcon_jax.models import projection
from pixcon_jax.models import registry
from pixcon_jax.models.layers import ModuleDef


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


def projection_head(features: jax.Array, proj_dim: int | None, proj_type: str, *, train: bool,
                    conv: ModuleDef, norm: ModuleDef) -> jax.Array | None:
  """The `proj_head` embedding [B, h, w, D] of a segmenter, None without one (`proj_dim` None).

  Call it from the segmenter's compact method: the head is its child `proj_head`.
  """
  if proj_dim is None:
    return None
  return projection.ProjectionHead(proj_dim, proj_type, conv, norm, name="proj_head")(features,
                                                                                     train)


class HRNetSegmenter(nn.Module):
  """HRNetV2 + FCN head (`HRNet_W48[_CONTRAST]`) or OCR head (`HRNet_W48_OCR[_CONTRAST]`).

  Both heads and the projection head read the 1/4-scale concatenation of the four
  branches (720 channels for W48). Parameter names follow the official nets:
  FCN: `cls_head`; OCR: `conv3x3`, `ocr_distri_head`, `cls_head`, `aux_head`;
  contrast: `proj_head`.

  Attributes:
    backbone: the HRNet (parameters under "backbone").
    num_classes: C.
    head: "fcn" or "ocr".
    proj_dim: embedding size D, or None for no projection head.
    proj_type: "convmlp" or "linear".
    ocr_channels: OCR mid channels (512).
    ocr_key_channels: OCR attention width (256).
    conv, norm: the `ModuleDef`s of the heads' convs and BNs.
  """
  backbone: nn.Module
  num_classes: int
  head: str = "fcn"
  proj_dim: int | None = 256
  proj_type: str = "convmlp"
  ocr_channels: int = 512
  ocr_key_channels: int = 256
  conv: ModuleDef = conv_lib.Conv
  norm: ModuleDef = layers.BatchNorm

  @nn.compact
  def __call__(self, image: jax.Array, train: bool = False) -> dict[str, Any]:
    """image [B, H, W, 3] -> output dict (see the module docstring), h, w = ceil(H/4), ceil(W/4)."""
    injected = dict(conv=self.conv, norm=self.norm)
    features = self.backbone(image, train)
    feats = hrnet.concat_branches(features)
    aux = None
    if self.head == "fcn":
      logits = heads.FCNHead(self.num_classes, dropout=0.1, final_bias=False, name="cls_head",
                             **injected)(feats, train)
    elif self.head == "ocr":
      aux = heads.FCNHead(self.num_classes, dropout=None, final_bias=True, name="aux_head",
                          **injected)(feats, train)
      logits = heads.ocr_head(feats, aux, self.num_classes, train=train, channels=self.ocr_channels,
                              key_channels=self.ocr_key_channels,
                              names=("conv3x3", "ocr_distri_head", "cls_head"), **injected)
    else:
      raise ValueError(f"HRNet head must be 'fcn' or 'ocr', got {self.head!r}")
    emb = projection_head(feats, self.proj_dim, self.proj_type, train=train, **injected)
    return model_outputs(logits, features, aux_logits=aux, embedding=emb)


class OCRNet(nn.Module):
  """OCR head on a dilated ResNet, named like the official `SpatialOCRNet`.

  `dsn_head` (3x3 conv 512 + BNReLU + Dropout2d(0.05) + 1x1) gives the aux
  logits from the second-to-last backbone output (layer3, 1024 ch); `conv_3x3`,
  the soft object regions and `spatial_ocr_head` run on the last (layer4, 2048
  ch), and `head` is the 1x1 classifier. The projection head (`proj_head`, not
  in the official OCRNet) reads layer4, as `DeepLabV3Contrast` does. Attributes as
  `HRNetSegmenter`'s.
  """
  backbone: nn.Module
  num_classes: int
  proj_dim: int | None = 256
  proj_type: str = "convmlp"
  ocr_channels: int = 512
  ocr_key_channels: int = 256
  conv: ModuleDef = conv_lib.Conv
  norm: ModuleDef = layers.BatchNorm

  @nn.compact
  def __call__(self, image: jax.Array, train: bool = False) -> dict[str, Any]:
    """image [B, H, W, 3] -> output dict at the backbone's output stride."""
    injected = dict(conv=self.conv, norm=self.norm)
    features = self.backbone(image, train)
    aux = heads.FCNHead(self.num_classes, hidden=self.ocr_channels, dropout=0.05, final_bias=True,
                        name="dsn_head", **injected)(features[-2], train)
    logits = heads.ocr_head(features[-1], aux, self.num_classes, train=train,
                            channels=self.ocr_channels, key_channels=self.ocr_key_channels,
                            names=("conv_3x3", "spatial_ocr_head", "head"), **injected)
    emb = projection_head(features[-1], self.proj_dim, self.proj_type, train=train, **injected)
    return model_outputs(logits, features, aux_logits=aux, embedding=emb)


for _width in (18, 32, 48):
  for _head, _suffix in (("fcn", ""), ("ocr", "_ocr")):
    for _contrast in (False, True):
      registry.register(f"hrnet_w{_width}{_suffix}{'_contrast' if _contrast else ''}",
                        backbone=f"hrnet{_width}", contrast=_contrast, head=_head)(HRNetSegmenter)
registry.register("ocr_r101", backbone="deepbase_resnet101_dilated8", contrast=False)(OCRNet)
registry.register("ocr_r101_contrast", backbone="deepbase_resnet101_dilated8",
                  contrast=True)(OCRNet)
