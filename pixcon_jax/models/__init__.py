"""Networks: HRNetV2 and dilated ResNet backbones, FCN / OCR / DeepLabV3 heads, projection head.

Importing the package registers every model (each architecture module registers its own).
"""
from pixcon_jax.models import deeplab  # noqa: F401  (registers deeplab_v3*)
from pixcon_jax.models import hrnet  # noqa: F401  (registers the hrnet backbones)
from pixcon_jax.models import resnet  # noqa: F401  (registers deepbase_resnet101_dilated8)
from pixcon_jax.models import segmenter  # noqa: F401  (registers hrnet_w*, ocr_r101*)
from pixcon_jax.models.registry import BACKBONE_PREFIX
from pixcon_jax.models.registry import build_backbone
from pixcon_jax.models.registry import build_model
from pixcon_jax.models.registry import model_names
from pixcon_jax.models.registry import register

__all__ = ["BACKBONE_PREFIX", "build_backbone", "build_model", "model_names", "register"]
