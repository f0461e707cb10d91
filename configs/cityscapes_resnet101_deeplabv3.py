"""Cityscapes, ResNet-101 (dilated, output stride 8) + DeepLabV3 + pixel contrast (Table 4)."""
from configs import common


def get_config(arg=None):
  c = common.base_config(model="deeplab_v3_contrast", dataset="cityscapes", num_classes=19,
                         crop_size=(512, 1024), batch_size=8, lr=0.01, total_steps=100_000)
  c.loss.class_weights = "cityscapes"  # Official ce_weight.
  if {"official", "official_mem"} & common.parse_arg(arg):
    c.schedule.total_steps = 40_000
  return common.finalize(c, arg)
