"""PASCAL-Context (59 classes), HRNetV2-W48 + OCR + pixel contrast (paper Table 5)."""
from configs import common


def get_config(arg=None):
  c = common.base_config(model="hrnet_w48_ocr_contrast", dataset="pascal_context",
                         num_classes=59, crop_size=(520, 520), batch_size=16, lr=0.001,
                         total_steps=60_000)
  c.eval.every_steps = 6000  # 10 evaluations over the run.
  return common.finalize(c, arg)
