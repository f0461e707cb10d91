"""Networks: HRNetV2 and dilated ResNet backbones, FCN / OCR / DeepLabV3 heads, projection head."""
from pixcon_jax.models.segmenter import BACKBONE_PREFIX
from pixcon_jax.models.segmenter import backbone_param_prefix
from pixcon_jax.models.segmenter import build_backbone
from pixcon_jax.models.segmenter import build_model
from pixcon_jax.models.segmenter import model_names
from pixcon_jax.models.segmenter import register_model

__all__ = ["BACKBONE_PREFIX", "backbone_param_prefix", "build_backbone", "build_model",
           "model_names", "register_model"]
