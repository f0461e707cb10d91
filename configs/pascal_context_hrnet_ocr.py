"""PASCAL-Context (59 classes), HRNetV2-W48 + OCR + pixel contrast (paper Table 5).

60K steps, batch 16, 520x520 crops, LR 0.001, aux CE 0.4.
Default recipe: the paper's loss (Eq. 3) over the mini-batch, the pixel queue (T = 10 N per
class) and the region memory ([C, N]), seg.-aware hard anchors, and *random* positive/negative
sampling: not the paper's semi-hard mining, which collapses the embedding here (docs/ABLATIONS.md,
"Departures"; `--config.contrast.mining=semi_hard` selects it).
Init: random weights unless `--config.init_from` names converted ImageNet HRNetV2-W48 weights
(the paper's start; README "Cityscapes end to end"); without it the run warns at start.

Args (comma-separated): runlocal (CPU-sized), official (the released in-batch recipe: lambda
0.1 after 5000 steps, tau / base tau), official_mem (the released memory recipe
H_48_D_4_MEM: random-initialised queues of 5000 per class, one view per class, lambda 1 after
5000 steps, tau 0.07, its quirks reproduced), bf16 (bfloat16 compute).
"""
from configs import common


def get_config(arg=None):
  c = common.base_config(model="hrnet_w48_ocr_contrast", dataset="pascal_context",
                         num_classes=59, crop_size=(520, 520), batch_size=16, lr=0.001,
                         total_steps=60_000)
  c.eval.every_steps = 6000  # 10 evaluations over the run.
  return common.finalize(c, arg)
