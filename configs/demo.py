"""Demo: procedural street scenes (no download), a small HRNet-W18 + pixel contrast on CPU.

Trains on a 2-core CPU to >= 50% val mIoU within 15 minutes including evaluation and prints
`final mIoU: ...`; `demo.py:runlocal` is a few-minute variant that still trains, evaluates
and writes mIoU to TensorBoard. From random weights (no ImageNet start for synthetic scenes),
the paper recipe of configs/common.py (mini-batch + pixel queue of 1000 per class + region
memory, seg.-aware hard anchors, random positive/negative sampling), 2000 steps. Args: runlocal
(120 steps), official, official_mem (the released recipes, configs/common.py), bf16.
  python -m pixcon_jax.main --config=configs/demo.py --workdir=/tmp/demo
"""
import ml_collections

from configs import common


def get_config(arg=None):
  words = common.parse_arg(arg)
  c = common.base_config(model="hrnet_w18_contrast", dataset="synthetic", num_classes=8,
                         crop_size=(64, 128), batch_size=8, lr=0.02, total_steps=2000)
  # HRNet-W18 topology with reduced widths: fast enough for 2 CPU cores.
  c.model.overrides = ml_collections.ConfigDict(dict(
      widths=(12, 24, 48, 96), stage_modules=(1, 1, 1), num_blocks=1, stem_width=32,
      layer1_planes=16, layer1_blocks=1))
  c.model.proj_dim = 32  # Small embedding for a small model.
  c.data.synthetic_size = (96, 192)  # Rendered scene size (random scale then 64x128 crops).
  c.data.synthetic_num_train = 1000
  c.data.synthetic_num_val = 40
  c.data.eval_pad_size = (96, 192)
  c.data.eval_batch_size = 8
  c.data.worker_count = 1  # One rendering worker beside the trainer on 2 cores.
  c.augment.scale_range = (0.75, 1.5)
  c.contrast.anchors_per_class = 16
  c.contrast.num_positives = 64
  c.contrast.num_negatives = 128
  c.contrast.positive_pool = 640
  c.contrast.negative_pool = 1280
  c.memory.pixel_queue_size = 1000  # T per class (paper 10 N would be 10000).
  c.eval.every_steps = 400
  c.eval.num_summary_images = 3
  c.checkpoint.every_steps = 200
  c.log.every_steps = 50
  if "runlocal" in words:
    c.schedule.total_steps = 120
    c.eval.every_steps = 60
    c.checkpoint.every_steps = 30
    c.log.every_steps = 10
    c.data.synthetic_num_val = 16
    words.discard("runlocal")  # Keep the demo's model rather than the generic tiny one.
  return common.finalize(c, ",".join(sorted(words)))
