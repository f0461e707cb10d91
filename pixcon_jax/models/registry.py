"""Named models and backbones, and `build_model`: the one place a model's conv and norm are made.

Each architecture module registers what it defines when it is imported (`models/__init__.py`
imports them all):

    @registry.register_backbone("deepbase_resnet101_dilated8", fields=("depth", ...))
    class ResNet(layers.ResidualModule): ...  # cls(conv=, norm=, residual_out=, **fields)

    @registry.register("ocr_r101_contrast", backbone="deepbase_resnet101_dilated8", contrast=True)
    class OCRNet(segmenter.Segmenter): ...  # cls(backbone, num_classes, conv=, norm=, **head)

(or the same calls in a loop, for a family of names).

`build_model` builds the backbone, then the segmenter around it, and splits the overrides
between the two: the backbone's registered `fields`, and the segmenter's own dataclass fields.
It also decides, from the platform the model is built for, whether the XLA:CPU machinery
(`pixcon_jax.cpu`: im2col / Winograd convs, fusion barriers) is in the graph; models only see
the `conv`, `norm` and `residual_out` they are given.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from pixcon_jax.cpu import conv as cpu_conv
from pixcon_jax.cpu import fusion as cpu_fusion
from pixcon_jax.models import conv as conv_lib
from pixcon_jax.models import layers

Dtype = Any
ModuleT = TypeVar("ModuleT")

# Parameter / batch_stats subtree of the backbone in every registered model: the segmenters take
# the backbone module as their `backbone` attribute, which linen names after the attribute.
BACKBONE_PREFIX = "backbone"

# Compute dtypes of `build_model` (parameters and BN statistics stay float32).
DTYPES = ("float32", "bfloat16")

# Segmenter fields that build_model sets itself, never overrides.
_INJECTED = ("backbone", "num_classes", "conv", "norm", "parent", "name")


@dataclasses.dataclass(frozen=True)
class _BackboneEntry:
  build: Callable[..., nn.Module]
  fields: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _ModelEntry:
  segmenter: type[nn.Module]
  backbone: str
  contrast: bool
  fixed: dict[str, Any]


_BACKBONES: dict[str, _BackboneEntry] = {}
_MODELS: dict[str, _ModelEntry] = {}


def register_backbone(name: str, *, fields: Sequence[str]) -> Callable[[ModuleT], ModuleT]:
  """Decorator: `builder(*, conv, norm, residual_out, **{f: value for f in fields})` is `name`.

  `fields` are the architecture overrides the backbone takes (e.g. HRNet `widths`).
  """
  def add(builder: ModuleT) -> ModuleT:
    if name in _BACKBONES:
      raise ValueError(f"backbone {name!r} is already registered")
    _BACKBONES[name] = _BackboneEntry(builder, tuple(fields))
    return builder
  return add


def register(name: str, *, backbone: str, contrast: bool,
             **fixed: Any) -> Callable[[ModuleT], ModuleT]:
  """Decorator: the segmenter class on registered `backbone` is the model `name`.

  The class is called as `cls(backbone_module, num_classes, conv=, norm=, **fixed, **head)`,
  where `head` are the overrides naming its other fields; without `contrast` its `proj_dim`
  is None (no projection head).
  """
  def add(segmenter: ModuleT) -> ModuleT:
    if name in _MODELS:
      raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = _ModelEntry(segmenter, backbone, contrast, dict(fixed))
    return segmenter
  return add


def model_names() -> list[str]:
  return sorted(_MODELS)


def backbone_names() -> list[str]:
  return sorted(_BACKBONES)


def has_projection_head(name: str) -> bool:
  """Whether the registered model `name` outputs an `embedding` (a `*_contrast` model)."""
  return _MODELS[name].contrast


def override_names(name: str) -> list[str]:
  """The `**overrides` that `build_model(name, ...)` accepts: backbone fields and head fields."""
  entry = _MODELS[name]
  head = [f.name for f in dataclasses.fields(entry.segmenter)
          if f.name not in _INJECTED and f.name not in entry.fixed]
  return sorted(set(_BACKBONES[entry.backbone].fields) | set(head))


def layer_defs(*, dtype: Dtype = jnp.float32, bn_axis_name: str | None = None,
               conv_impl: str = "auto", platform: str | None = None) -> dict[str, Any]:
  """The `conv`, `norm` and `residual_out` every module of a model is built with.

  Args:
    dtype: compute dtype (parameters and BN statistics stay float32).
    bn_axis_name: mesh axis of cross-replica BN in training, or None.
    conv_impl: "auto" | "xla" | "matmul" | "winograd" (`models.conv.IMPLS`).
    platform: what the model runs on ("cpu", "gpu", "tpu"; the mesh's); None:
      `jax.default_backend()`, now.
  Returns:
    {"conv": partial of `conv.Conv`, "norm": partial of `layers.BatchNorm`, "residual_out": fn}.
    "auto" off the CPU, and "xla" anywhere, give the native conv and the identity; otherwise
    the convs run `cpu.conv` and residual outputs pass `cpu.fusion.fusion_barrier`.
  """
  conv_lib.check_impl(conv_impl)
  dtype = jnp.dtype(dtype)
  on_cpu = (platform or jax.default_backend()) == "cpu"
  norm = functools.partial(layers.BatchNorm, axis_name=bn_axis_name, dtype=dtype)
  if conv_impl == "xla" or (conv_impl == "auto" and not on_cpu):
    return dict(conv=functools.partial(conv_lib.Conv, dtype=dtype), norm=norm,
                residual_out=layers.identity)
  conv = functools.partial(conv_lib.Conv, dtype=dtype, conv_fn=cpu_conv.ConvAlgorithm(conv_impl))
  return dict(conv=conv, norm=norm, residual_out=cpu_fusion.fusion_barrier)


def _take(overrides: dict[str, Any], fields: Sequence[str]) -> dict[str, Any]:
  return {k: overrides.pop(k) for k in list(overrides) if k in fields}


def _check_empty(name: str, overrides: dict[str, Any]) -> None:
  if overrides:
    raise ValueError(f"model {name!r} does not take the overrides {sorted(overrides)}")


def _backbone(name: str, defs: dict[str, Any], overrides: dict[str, Any]) -> nn.Module:
  """Backbone `name`, taking its fields out of `overrides`."""
  entry = _BACKBONES[name]
  return entry.build(**defs, **_take(overrides, entry.fields))


def build_model(name: str, *, num_classes: int, dtype: Dtype = jnp.float32,
                bn_axis_name: str | None = None, conv_impl: str = "auto",
                platform: str | None = None, **overrides: Any) -> nn.Module:
  """Builds a registered model.

  Args:
    name: e.g. "hrnet_w48_contrast" (see `model_names()`).
    num_classes: C.
    dtype: compute dtype (float32 or bfloat16); parameters and BN statistics stay float32.
    bn_axis_name: mesh axis for cross-replica BN in training (inside shard_map), or None.
    conv_impl: convolution algorithm, "auto" | "xla" | "matmul" | "winograd" (`layer_defs`,
      `cpu.conv`); it changes speed and float32 rounding only.
    platform: the platform the model will run on ("cpu", "gpu", "tpu"; the mesh's
      `devices.flat[0].platform`), which fixes "auto" and the CPU-only graph tricks
      (`layer_defs`); None: `jax.default_backend()`, now.
    **overrides: architecture overrides, e.g. HRNet `widths=(8, 16, 32, 64)`,
      `stage_modules=(1, 1, 1)`, `num_blocks=1`, `stem_width`, `layer1_planes`, `layer1_blocks`;
      ResNet `stage_depths`, `width`, `stem_width`, `output_stride`; heads `proj_dim`,
      `proj_type`, `ocr_channels`, `ocr_key_channels`.
  Returns:
    An unbound linen module (see `models.segmenter` for its outputs).
  """
  if name not in _MODELS:
    raise ValueError(f"unknown model {name!r}; expected one of {model_names()}")
  entry = _MODELS[name]
  defs = layer_defs(dtype=dtype, bn_axis_name=bn_axis_name, conv_impl=conv_impl,
                    platform=platform)
  overrides = dict(overrides)
  backbone = _backbone(entry.backbone, defs, overrides)
  head_fields = [f.name for f in dataclasses.fields(entry.segmenter)
                 if f.name not in _INJECTED and f.name not in entry.fixed]
  head = _take(overrides, head_fields)
  _check_empty(name, overrides)
  if not entry.contrast:
    head["proj_dim"] = None
  return entry.segmenter(backbone, num_classes, conv=defs["conv"], norm=defs["norm"],
                         **entry.fixed, **head)


def build_backbone(name: str, *, dtype: Dtype = jnp.float32, bn_axis_name: str | None = None,
                   conv_impl: str = "auto", platform: str | None = None,
                   **overrides: Any) -> nn.Module:
  """A backbone alone by its official name ("hrnet48", "deepbase_resnet101_dilated8", ...).

  Its `__call__(image, train)` returns the list of feature maps; its variables have no
  "backbone" level (they are what sits under `BACKBONE_PREFIX` in a full model). The other
  arguments as in `build_model`.
  """
  if name not in _BACKBONES:
    raise ValueError(f"unknown backbone {name!r}; expected one of {backbone_names()}")
  defs = layer_defs(dtype=dtype, bn_axis_name=bn_axis_name, conv_impl=conv_impl,
                    platform=platform)
  overrides = dict(overrides)
  module = _backbone(name, defs, overrides)
  _check_empty(name, overrides)
  return module
