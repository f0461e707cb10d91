"""Cityscapes, ResNet-101 (dilated, output stride 8) + DeepLabV3 + pixel contrast (Table 4).

100K steps, batch 8, 512x1024 crops, LR 0.01, Cityscapes class weights, aux CE 0.4.
Default recipe: the paper's loss (Eq. 3) over the mini-batch, the pixel queue (T = 10 N per
class) and the region memory ([C, N]), seg.-aware hard anchors, and *random* positive/negative
sampling: not the paper's semi-hard mining, which collapses the embedding here (docs/ABLATIONS.md,
"Departures"; `--config.contrast.mining=semi_hard` selects it).
Init: random weights unless `--config.init_from` names converted ImageNet ResNet-101 weights
(the paper's start; README "Cityscapes end to end"); without it the run warns at start.

Args (comma-separated): runlocal (CPU-sized), official (the released in-batch recipe: lambda
0.1 after 5000 steps, tau / base tau, 40K steps), official_mem (the released memory recipe
H_48_D_4_MEM: random-initialised queues of 5000 per class, one view per class, lambda 1 after
5000 steps, tau 0.07, 40K steps, its quirks reproduced), bf16 (bfloat16 compute).
"""
from configs import common


def get_config(arg=None):
  c = common.base_config(model="deeplab_v3_contrast", dataset="cityscapes", num_classes=19,
                         crop_size=(512, 1024), batch_size=8, lr=0.01, total_steps=100_000)
  c.loss.class_weights = "cityscapes"  # Official ce_weight.
  if {"official", "official_mem"} & common.parse_arg(arg):
    c.schedule.total_steps = 40_000
  return common.finalize(c, arg)
