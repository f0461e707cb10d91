"""Cityscapes, HRNetV2-W48 + pixel contrast: the paper's full method (Tables 1-3, 81.0 val mIoU).

Args (comma-separated): runlocal (CPU-sized), official (the released recipe: in-batch,
lambda 0.1 after 5000 steps, tau/base_tau, 40K steps), bf16 (bfloat16 compute).
  python -m pixcon_jax.main --config=configs/cityscapes_hrnet.py:official --workdir=...
"""
from configs import common


def get_config(arg=None):
  c = common.base_config(model="hrnet_w48_contrast", dataset="cityscapes", num_classes=19,
                         crop_size=(512, 1024), batch_size=8, lr=0.01, total_steps=100_000)
  c.loss.class_weights = "cityscapes"  # Official ce_weight (HRNet convention).
  if {"official", "official_mem"} & common.parse_arg(arg):
    c.schedule.total_steps = 40_000  # Official H_48_D_4 contrast config.
  return common.finalize(c, arg)
