"""Segmentation networks (backbone + head [+ projection head]) and the registry of named models.

Every model is a linen module called as

    out = model.apply(variables, image, train=train,
                      mutable=["batch_stats"] if train else False, rngs={"dropout": key})

with `image [B, H, W, 3]`, and returns a dict of float32 arrays:
  logits      [B, h, w, C]  at the head's stride (1/4 HRNet, 1/8 dilated ResNet), not upsampled;
  aux_logits  [B, h, w, C]  models with an auxiliary head (OCR, DeepLab);
  embedding   [B, h, w, D]  L2-normalised, models with a projection head (`*_contrast`);
  features    list of the backbone outputs (parity intermediates `backbone.i`).

The backbone always sits under the parameter subtree `BACKBONE_PREFIX`, so an
ImageNet backbone checkpoint can initialise it (see `pixcon_jax.convert`).

Adding a model: write a builder `fn(*, num_classes, dtype, bn_axis_name, **overrides) -> nn.Module`
(anywhere) and add one line to `_MODELS` below, either with the function itself
or with a "module:function" string when importing it here would be circular.
"""
from __future__ import annotations

import functools
import importlib
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pixcon_jax.models import conv as conv_lib
from pixcon_jax.models import heads
from pixcon_jax.models import hrnet
from pixcon_jax.models import layers
from pixcon_jax.models import projection

Dtype = Any

# Parameter / batch_stats subtree of the backbone in every registered model: the models take
# the backbone module as their `backbone` attribute, which linen names after the attribute.
BACKBONE_PREFIX = "backbone"


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
  """
  backbone: nn.Module
  num_classes: int
  head: str = "fcn"
  proj_dim: int | None = 256
  proj_type: str = "convmlp"
  ocr_channels: int = 512
  ocr_key_channels: int = 256
  bn_axis_name: str | None = None
  dtype: Dtype = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, image: jax.Array, train: bool = False) -> dict[str, Any]:
    """image [B, H, W, 3] -> output dict (see the module docstring), h, w = ceil(H/4), ceil(W/4)."""
    ax, dt = self.bn_axis_name, self.dtype
    features = self.backbone(image, train)
    feats = hrnet.concat_branches(features)
    aux = None
    if self.head == "fcn":
      logits = heads.FCNHead(self.num_classes, dropout=0.1, final_bias=False, bn_axis_name=ax,
                             dtype=dt, conv_impl=self.conv_impl, name="cls_head")(feats, train)
    elif self.head == "ocr":
      aux = heads.FCNHead(self.num_classes, dropout=None, final_bias=True, bn_axis_name=ax,
                          dtype=dt, conv_impl=self.conv_impl, name="aux_head")(feats, train)
      x = heads.ConvBNReLU(self.ocr_channels, 3, bn_axis_name=ax, dtype=dt,
                           conv_impl=self.conv_impl, name="conv3x3")(feats, train)
      proxy = heads.spatial_gather(x, aux)
      x = heads.SpatialOCR(self.ocr_key_channels, self.ocr_channels, 0.05, ax, dt,
                           conv_impl=self.conv_impl, name="ocr_distri_head")(x, proxy, train)
      logits = layers.conv(self.num_classes, 1, use_bias=True, dtype=dt, impl=self.conv_impl,
                           name="cls_head")(x)
    else:
      raise ValueError(f"HRNet head must be 'fcn' or 'ocr', got {self.head!r}")
    emb = None
    if self.proj_dim is not None:
      emb = projection.ProjectionHead(self.proj_dim, self.proj_type, ax, dt,
                                      conv_impl=self.conv_impl, name="proj_head")(feats, train)
    return model_outputs(logits, features, aux_logits=aux, embedding=emb)


class OCRNet(nn.Module):
  """OCR head on a dilated ResNet, named like the official `SpatialOCRNet`.

  `dsn_head` (3x3 conv 512 + BNReLU + Dropout2d(0.05) + 1x1) gives the aux
  logits from the second-to-last backbone output (layer3, 1024 ch); `conv_3x3`,
  the soft object regions and `spatial_ocr_head` run on the last (layer4, 2048
  ch), and `head` is the 1x1 classifier. The projection head (`proj_head`, not
  in the official OCRNet) reads layer4, as `DeepLabV3Contrast` does.
  """
  backbone: nn.Module
  num_classes: int
  proj_dim: int | None = 256
  proj_type: str = "convmlp"
  ocr_channels: int = 512
  ocr_key_channels: int = 256
  bn_axis_name: str | None = None
  dtype: Dtype = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, image: jax.Array, train: bool = False) -> dict[str, Any]:
    """image [B, H, W, 3] -> output dict at the backbone's output stride."""
    ax, dt = self.bn_axis_name, self.dtype
    features = self.backbone(image, train)
    aux = heads.FCNHead(self.num_classes, hidden=self.ocr_channels, dropout=0.05, final_bias=True,
                        bn_axis_name=ax, dtype=dt, conv_impl=self.conv_impl,
                        name="dsn_head")(features[-2], train)
    x = heads.ConvBNReLU(self.ocr_channels, 3, bn_axis_name=ax, dtype=dt,
                         conv_impl=self.conv_impl, name="conv_3x3")(features[-1], train)
    proxy = heads.spatial_gather(x, aux)
    x = heads.SpatialOCR(self.ocr_key_channels, self.ocr_channels, 0.05, ax, dt,
                         conv_impl=self.conv_impl, name="spatial_ocr_head")(x, proxy, train)
    logits = layers.conv(self.num_classes, 1, use_bias=True, dtype=dt, impl=self.conv_impl,
                         name="head")(x)
    emb = None
    if self.proj_dim is not None:
      emb = projection.ProjectionHead(self.proj_dim, self.proj_type, ax, dt,
                                      conv_impl=self.conv_impl, name="proj_head")(features[-1],
                                                                                  train)
    return model_outputs(logits, features, aux_logits=aux, embedding=emb)


# ---------------------------------------------------------------------------------------------
# Backbones

_HRNET_FIELDS = ("widths", "stage_modules", "num_blocks", "stem_width", "layer1_planes",
                 "layer1_blocks")
_RESNET_FIELDS = ("depth", "stage_depths", "width", "stem_width", "output_stride", "multi_grid",
                  "avg_down")


def _split(overrides: dict[str, Any], fields: Sequence[str]) -> dict[str, Any]:
  return {k: overrides.pop(k) for k in list(overrides) if k in fields}


def _hrnet_backbone(width: int, *, dtype: Dtype, bn_axis_name: str | None, conv_impl: str,
                    overrides: dict[str, Any]) -> hrnet.HRNet:
  cfg = hrnet.hrnet_config(width, **_split(overrides, _HRNET_FIELDS))
  return hrnet.HRNet(cfg, bn_axis_name=bn_axis_name, dtype=dtype, conv_impl=conv_impl)


def _resnet_backbone(*, dtype: Dtype, bn_axis_name: str | None, conv_impl: str,
                     overrides: dict[str, Any]) -> nn.Module:
  from pixcon_jax.models import resnet  # pylint: disable=g-import-not-at-top
  # resnet.ResNet defaults to the official ResNet-101 at output stride 8, multi-grid all 1.
  return resnet.ResNet(**_split(overrides, _RESNET_FIELDS), bn_axis_name=bn_axis_name, dtype=dtype,
                       conv_impl=conv_impl)


def _check_empty(name: str, overrides: dict[str, Any]) -> None:
  if overrides:
    raise ValueError(f"model {name!r} does not take the overrides {sorted(overrides)}")


def _build_hrnet(*, width: int, head: str, contrast: bool, num_classes: int, dtype: Dtype,
                 bn_axis_name: str | None, conv_impl: str, **overrides: Any) -> nn.Module:
  backbone = _hrnet_backbone(width, dtype=dtype, bn_axis_name=bn_axis_name, conv_impl=conv_impl,
                             overrides=overrides)
  kw = _split(overrides, ("proj_dim", "proj_type", "ocr_channels", "ocr_key_channels"))
  if not contrast:
    kw["proj_dim"] = None
  _check_empty(f"hrnet_w{width}", overrides)
  return HRNetSegmenter(backbone, num_classes, head=head, bn_axis_name=bn_axis_name, dtype=dtype,
                        conv_impl=conv_impl, **kw)


def _build_ocr_resnet(*, contrast: bool, num_classes: int, dtype: Dtype,
                      bn_axis_name: str | None, conv_impl: str, **overrides: Any) -> nn.Module:
  backbone = _resnet_backbone(dtype=dtype, bn_axis_name=bn_axis_name, conv_impl=conv_impl,
                              overrides=overrides)
  kw = _split(overrides, ("proj_dim", "proj_type", "ocr_channels", "ocr_key_channels"))
  if not contrast:
    kw["proj_dim"] = None
  _check_empty("ocr_r101", overrides)
  return OCRNet(backbone, num_classes, bn_axis_name=bn_axis_name, dtype=dtype, conv_impl=conv_impl,
                **kw)


# ---------------------------------------------------------------------------------------------
# Registry: name -> (builder or "module:function", fixed keyword arguments).

_MODELS: dict[str, tuple[Callable[..., nn.Module] | str, dict[str, Any]]] = {}
for _w in (18, 32, 48):
  _MODELS[f"hrnet_w{_w}"] = (_build_hrnet, dict(width=_w, head="fcn", contrast=False))
  _MODELS[f"hrnet_w{_w}_contrast"] = (_build_hrnet, dict(width=_w, head="fcn", contrast=True))
  _MODELS[f"hrnet_w{_w}_ocr"] = (_build_hrnet, dict(width=_w, head="ocr", contrast=False))
  _MODELS[f"hrnet_w{_w}_ocr_contrast"] = (_build_hrnet, dict(width=_w, head="ocr", contrast=True))
_MODELS["ocr_r101"] = (_build_ocr_resnet, dict(contrast=False))
_MODELS["ocr_r101_contrast"] = (_build_ocr_resnet, dict(contrast=True))
# ResNet-101 DeepLabV3 models (models/deeplab.py) are registered here as "module:function".
# --- begin deeplab entries (owner: models/deeplab.py) ---
_MODELS["deeplab_v3"] = ("pixcon_jax.models.deeplab:build_deeplab_v3", dict(contrast=False))
_MODELS["deeplab_v3_contrast"] = ("pixcon_jax.models.deeplab:build_deeplab_v3",
                                  dict(contrast=True))
# --- end deeplab entries ---


def register_model(name: str, builder: Callable[..., nn.Module] | str, **fixed: Any) -> None:
  """Adds a named model; `builder(*, num_classes, dtype, bn_axis_name, conv_impl, **fixed,
  **overrides)`."""
  if name in _MODELS:
    raise ValueError(f"model {name!r} is already registered")
  _MODELS[name] = (builder, fixed)


def model_names() -> list[str]:
  return sorted(_MODELS)


def build_model(name: str, *, num_classes: int, dtype: Dtype = jnp.float32,
                bn_axis_name: str | None = None, conv_impl: str = "auto",
                platform: str | None = None, **overrides: Any) -> nn.Module:
  """Builds a registered model.

  Args:
    name: e.g. "hrnet_w48_contrast" (see `model_names()`).
    num_classes: C.
    dtype: compute dtype (float32 or bfloat16); parameters and BN statistics stay float32.
    bn_axis_name: mesh axis for cross-replica BN in training (inside shard_map), or None.
    conv_impl: convolution algorithm, "auto" | "xla" | "matmul" | "winograd" (`models.conv`);
      it changes speed and float32 rounding only.
    platform: the platform the model will run on ("cpu", "gpu", "tpu"; the mesh's
      `devices.flat[0].platform`), which fixes "auto" and the CPU-only graph tricks
      (`conv.resolve_impl`); None: `jax.default_backend()`, now.
    **overrides: architecture overrides, e.g. HRNet `widths=(8, 16, 32, 64)`,
      `stage_modules=(1, 1, 1)`, `num_blocks=1`, `stem_width`, `layer1_planes`, `layer1_blocks`;
      ResNet `stage_depths`, `width`, `stem_width`, `output_stride`; heads `proj_dim`,
      `proj_type`, `ocr_channels`, `ocr_key_channels`.
  Returns:
    An unbound linen module (see the module docstring for its outputs).
  """
  if name not in _MODELS:
    raise ValueError(f"unknown model {name!r}; expected one of {model_names()}")
  builder, fixed = _MODELS[name]
  if isinstance(builder, str):
    module, fn = builder.split(":")
    builder = getattr(importlib.import_module(module), fn)
  conv_impl = conv_lib.resolve_impl(conv_impl, platform or jax.default_backend())
  return builder(num_classes=num_classes, dtype=jnp.dtype(dtype), bn_axis_name=bn_axis_name,
                 conv_impl=conv_impl, **fixed, **overrides)


def backbone_param_prefix(name: str) -> str:
  """The variables subtree holding the backbone of model `name` (for ImageNet initialisation)."""
  if name not in _MODELS:
    raise ValueError(f"unknown model {name!r}; expected one of {model_names()}")
  return BACKBONE_PREFIX


# Official backbone names (the `network.backbone` config key) -> our backbone, for checks that
# run a backbone alone (the `backbone_train` golden fixture).
_BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "hrnet18": functools.partial(_hrnet_backbone, 18),
    "hrnet32": functools.partial(_hrnet_backbone, 32),
    "hrnet48": functools.partial(_hrnet_backbone, 48),
    "deepbase_resnet101_dilated8": _resnet_backbone,
}


def build_backbone(name: str, *, dtype: Dtype = jnp.float32, bn_axis_name: str | None = None,
                   conv_impl: str = "auto", platform: str | None = None,
                   **overrides: Any) -> nn.Module:
  """A backbone alone by its official name ("hrnet48", "deepbase_resnet101_dilated8", ...).

  Its `__call__(image, train)` returns the list of feature maps; its variables have no
  "backbone" level (they are what sits under `BACKBONE_PREFIX` in a full model). `conv_impl`
  and `platform` as in `build_model`.
  """
  if name not in _BACKBONES:
    raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(_BACKBONES)}")
  overrides = dict(overrides)
  conv_impl = conv_lib.resolve_impl(conv_impl, platform or jax.default_backend())
  module = _BACKBONES[name](dtype=jnp.dtype(dtype), bn_axis_name=bn_axis_name,
                            conv_impl=conv_impl, overrides=overrides)
  _check_empty(name, overrides)
  return module
