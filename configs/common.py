"""Shared defaults of every experiment: the paper's settings (Sec. 4.1), one home per knob.

Experiment files call `base_config(...)` with what differs (model, dataset, schedule) and
apply `runlocal(config)` for a CPU-sized variant. Named recipes that differ from the paper
(the official released code) are functions here, never silent defaults.
"""
from __future__ import annotations

from typing import Sequence

import ml_collections
from ml_collections.config_dict import placeholder

from pixcon_jax.data import config_defaults as data_defaults

# Arguments accepted by every experiment's get_config(arg): comma-separated flags.
KNOWN_ARGS = ("runlocal", "official", "official_mem", "bf16")


def parse_arg(arg: str | None) -> set[str]:
  """'runlocal,official' -> {'runlocal', 'official'}, rejecting unknown words."""
  words = {w.strip() for w in (arg or "").split(",") if w.strip()}
  unknown = words - set(KNOWN_ARGS)
  if unknown:
    raise ValueError(f"unknown config arg(s) {sorted(unknown)}; known: {KNOWN_ARGS}")
  return words


def base_config(*, model: str, dataset: str, num_classes: int, crop_size: Sequence[int],
                batch_size: int, lr: float, total_steps: int) -> ml_collections.ConfigDict:
  """The paper's full method (pixel + region memory, semi-hard mining) for one experiment."""
  c = ml_collections.ConfigDict()
  c.mode = "train"  # train | eval | predict.
  c.seed = 0  # Model init, data order, contrast sampling.
  c.init_from = placeholder(str)  # Orbax checkpoint of converted weights ({params, batch_stats}); never overrides a resume.
  c.init_from_scope = "backbone"  # backbone (ImageNet weights) | full (an official checkpoint) | partial (whatever matches).
  c.init_from_max_mismatch = 0.05  # backbone/full: fail if more of the arrays in scope are missing or differ in shape.

  c.model = ml_collections.ConfigDict()
  c.model.name = model  # Registry name, see pixcon_jax.models.model_names().
  c.model.num_classes = num_classes  # C; checked against the dataset.
  c.model.dtype = "float32"  # Compute dtype: float32 | bfloat16 (params and BN stats stay float32).
  c.model.matmul_precision = placeholder(str)  # default | high | highest; None: highest for float32 compute (TPU matmuls as float32, not bf16 passes), default for bfloat16 (pixcon_jax/precision.py).
  c.model.proj_dim = 256  # D of the projection head (Sec. 3.3).
  c.model.proj_type = "convmlp"  # Projection head: convmlp (paper) | linear.
  c.model.conv_impl = "auto"  # Conv algorithm: auto | xla | matmul | winograd (speed only, cpu/conv.py).
  c.model.overrides = ml_collections.ConfigDict()  # Extra build_model overrides (tiny widths for tests).

  # Data and augmentation keys (and their comments) live with the data pipeline.
  c.data = data_defaults.default_data_config(dataset)
  c.data.batch_size = batch_size  # GLOBAL images per step (all devices); per host/device derived.
  c.data.crop_size = tuple(crop_size)  # (H, W) training crop.
  c.data.num_train_images = placeholder(int)  # N (region memory rows, T = 10 N); None = the split's size.
  c.data.eval_batch_size = 8  # GLOBAL images per eval batch (padded with valid=False).
  c.augment = data_defaults.default_augment_config()
  c.augment.color_jitter = True  # Paper Sec. 4.1 (the official code uses brightness only).

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = lr  # Initial LR (Cityscapes 0.01, PASCAL-Context / COCO-Stuff 0.001).
  c.optim.momentum = 0.9  # SGD momentum.
  c.optim.nesterov = False  # torch SGD default.
  c.optim.weight_decay = 5e-4  # Coupled (torch SGD) weight decay.
  c.optim.weight_decay_on = "all"  # all (torch: BN and biases too) | kernels.

  c.schedule = ml_collections.ConfigDict()
  c.schedule.total_steps = total_steps  # Training iterations.
  c.schedule.power = 0.9  # Poly decay (1 - step / total) ** power.
  c.schedule.end_lr = 0.0  # LR at the last step.

  c.loss = ml_collections.ConfigDict()
  c.loss.class_weights = placeholder(object)  # None | 'cityscapes' | (C floats): any literal.
  c.loss.aux_weight = 0.4  # Weight of the aux head's CE (OCR, DeepLab).
  c.loss.ohem = False  # Online hard example mining CE.
  c.loss.ohem_threshold = 0.7  # OHEM probability threshold.
  c.loss.ohem_min_kept = 100_000  # OHEM minimum kept pixels.

  c.contrast = ml_collections.ConfigDict()
  c.contrast.enabled = True  # Add the pixel contrast loss (needs a *_contrast model).
  c.contrast.recipe = "paper"  # paper (Eq. 3 with memory) | official (released, in-batch) | official_mem (released, queues).
  c.contrast.weight = 1.0  # lambda of Eq. 4.
  c.contrast.warmup_steps = 0  # lambda = 0 before this step.
  c.contrast.hard_mining_ramp_steps = 0  # Semi-hard's top fraction 1 -> semi_hard_fraction over these steps.
  c.contrast.global_batch = True  # Sample anchors from the global batch (device-count independent).
  c.contrast.temperature = 0.1  # tau of Eq. 3.
  c.contrast.base_temperature = placeholder(float)  # None: no tau / base_tau factor (official: 0.07).
  # Contrast set, Table 2: Sec. 3.2 samples positives and negatives "from the memory bank M" (and
  # the released memory code contrasts with its queue only), so the mini-batch pixels are anchors
  # only; add "batch" to contrast with them too (docs/ABLATIONS.md, "Departures").
  c.contrast.sources = ("pixel_memory", "region_memory")
  c.contrast.scope = "inter"  # inter (cross-image, paper) | intra (within each image), Table 1.
  c.contrast.anchor_sampling = "seg_aware_hard"  # random | seg_aware_hard (Table 3).
  c.contrast.anchors_per_class = 50  # Anchors per class per mini-batch.
  # random | hardest | semi_hard (Table 3) | hardness_weighted (beyond the paper). Paper: semi_hard,
  # which collapses the embedding when classes overlap (docs/ABLATIONS.md, "When the embedding
  # collapses"); random does not.
  c.contrast.mining = "random"
  c.contrast.num_positives = 1024  # K positives per anchor.
  c.contrast.num_negatives = 2048  # K negatives per anchor.
  c.contrast.semi_hard_fraction = 0.1  # Top 10% hardest, then K at random.
  c.contrast.mining_temperature = 0.2  # hardness_weighted: draw probability ~ exp(hardness / T).
  c.contrast.semi_hard_at_least_k = True  # Semi-hard keeps >= K hardest when the top 10% of a pool is smaller.
  c.contrast.top_k = "bisect"  # mining top-k: bisect (exact, no sort) | sort (lax.top_k) | approx (TPU).
  c.contrast.positive_pool = 10240  # Candidate pool per class for positives (10 x K+).
  c.contrast.negative_pool = 20480  # Candidate pool for negatives (10 x K-).
  c.contrast.batch_pool_fraction = 0.2  # Share of the pools drawn from the mini-batch.
  c.contrast.class_block = 1  # Classes per loop step of the loss (memory vs speed).
  c.contrast.remat = True  # Recompute loss blocks in the backward pass (peak memory).
  c.contrast.max_samples = 1024  # Official recipe: total anchor views.
  c.contrast.max_views = 100  # Official recipe: views per (image, class).

  c.memory = ml_collections.ConfigDict()
  c.memory.pixels_per_class = 10  # V pixels per class per image enqueued (Sec. 4.1).
  c.memory.pixel_queue_size = placeholder(int)  # T per class; None = 10 N (paper).
  c.memory.region_mode = "indexed"  # indexed (C x N, paper) | fifo.
  c.memory.region_queue_size = 0  # Per-class FIFO size for region_mode='fifo'.
  # The released memory recipe only (`:official_mem`, contrast/official_mem.py), released values;
  # its quirks are listed in docs/ABLATIONS.md "Departures".
  c.memory.official_queue_size = 5000  # `memory_size`: entries per class of each queue (segment, pixel).
  c.memory.official_label_stride = 8  # `network.stride`: labels[:, ::s, ::s] read against stride-4 HRNet keys; 4 aligns them.
  c.memory.official_pixel_ptr_step = "one"  # one (released: +1 per write of K keys) | count (+K, a FIFO).
  c.memory.official_skip_class0 = True  # Released: class 0 never enqueued; zero vectors stand in its contrast rows.
  c.memory.official_enqueue_images = 2  # Leading images of the global batch enqueued per step (released: rank 0's 2 of 8); 0 = all.

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 5000  # Periodic validation.
  c.eval.protocol = placeholder(str)  # None (scales/flip below) | single | paper | official.
  c.eval.mode = "whole"  # whole | slide.
  c.eval.scales = (1.0,)  # Test scales during training (single scale).
  c.eval.flip = False  # Flip test.
  c.eval.crop_size = placeholder(tuple)  # Sliding window (mode 'slide').
  c.eval.stride = placeholder(tuple)  # Sliding stride (default = crop).
  c.eval.max_batches = placeholder(int)  # Limit eval batches (None = whole split).
  c.eval.num_summary_images = 3  # Prediction images written to TensorBoard.
  c.eval.aggregate = "logits"  # Multi-scale fusion: logits (official tester) | softmax.
  c.eval.split = ""  # Split evaluated by mode eval ('' = the dataset's validation split).

  # `--config.mode=predict`: segment every image of a folder.
  c.predict = ml_collections.ConfigDict()
  c.predict.input_dir = ""  # Folder of PNG/JPEG images.
  c.predict.output_dir = ""  # Receives label/<name>.png (class ids) and color/<name>.png.
  # train_id (0..C-1) | label_id: raw dataset ids (Cityscapes labelIds 0..33), named
  # label/<city>_<seq>_<frame>_labelIds.png for cityscapesscripts and the benchmark server.
  c.predict.label_format = "train_id"

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1000  # Save period.
  c.checkpoint.max_to_keep = 3  # Latest checkpoints kept (plus the best-mIoU one).
  c.checkpoint.keep_best = True  # Also keep the best-mIoU checkpoint.
  c.checkpoint.async_save = True  # Overlap saving with training.
  # SIGTERM / TPU preemption is looked for every k steps; on several hosts each look waits
  # for the device to finish the step. A stop request saves at the next look.
  c.checkpoint.preemption_check_every_steps = 10

  c.log = ml_collections.ConfigDict()
  c.log.every_steps = 50  # Train metrics to the writers.
  c.log.profile = False  # Write a profile of a few steps.
  c.log.embedding_health = True  # Class structure of the embedding (contrast/health.py) in train metrics.
  c.log.collapse_gap = 0.05  # Collapse alarm: embedding gap below this after the contrast warm-up ...
  c.log.collapse_patience = 4  # ... for this many logged steps in a row logs one warning (0 = off).
  return c


def apply_official(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The official released recipe (tfzhou/ContrastiveSeg): in-batch, lambda 0.1 after 5000 steps."""
  c.contrast.recipe = "official"
  c.contrast.weight = 0.1  # `loss.params.loss_weight`.
  c.contrast.warmup_steps = 5000  # `contrast.warmup_iters`.
  c.contrast.temperature = 0.1
  c.contrast.base_temperature = 0.07  # The extra tau / base_tau factor.
  c.contrast.sources = ("batch",)
  c.contrast.max_samples = 1024
  c.contrast.max_views = 100
  c.contrast.global_batch = False  # Per-GPU sampling as with DDP.
  c.augment.color_jitter = False  # Official: RandomBrightness only.
  c.augment.bgr = True  # Official: cv2 BGR input, ImageNet RGB statistics applied by position.
  return c


def apply_official_mem(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The released memory recipe (H_48_D_4_MEM.json, run_h_48_d_4_contrast_mem.sh).

  One anchor view per (image, class) against two random-initialised per-class queues of 5000
  (class means and pixels, 10 per class and image), no in-batch contrast, tau = base tau = 0.07,
  lambda 1 after 5000 steps. The released quirks are reproduced (`config.memory.official_*`).
  """
  apply_official(c)  # Data, augmentation and per-GPU sampling as the in-batch release.
  c.contrast.recipe = "official_mem"
  c.contrast.weight = 1.0  # `contrast.loss_weight` of H_48_D_4_MEM.
  c.contrast.warmup_steps = 5000  # `contrast.warmup_iters`.
  c.contrast.temperature = 0.07
  c.contrast.base_temperature = 0.07
  c.contrast.sources = ("pixel_memory", "region_memory")  # Informational: queues only.
  c.contrast.max_samples = 1024
  c.contrast.max_views = 1
  c.memory.pixels_per_class = 10  # `pixel_update_freq`.
  c.memory.official_queue_size = 5000
  c.memory.official_label_stride = 8
  c.memory.official_pixel_ptr_step = "one"
  c.memory.official_skip_class0 = True
  c.memory.official_enqueue_images = 2
  return c


def apply_runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A CPU-sized variant of any experiment: tiny HRNet/ResNet widths, 64x64 crops, few steps."""
  name = c.model.name
  if name.startswith("hrnet"):
    c.model.overrides = ml_collections.ConfigDict(dict(
        widths=(8, 16, 32, 64), stage_modules=(1, 1, 1), num_blocks=1, stem_width=16,
        layer1_planes=8, layer1_blocks=1))
  else:
    c.model.overrides = ml_collections.ConfigDict(dict(
        stage_depths=(1, 1, 1, 1), width=8, stem_width=8))
  if "ocr" in name:
    c.model.overrides.ocr_channels = 16
    c.model.overrides.ocr_key_channels = 8
  c.model.proj_dim = 16
  c.data.batch_size = 2
  c.data.crop_size = (64, 64)
  c.data.worker_count = 0
  if c.data.dataset == "synthetic":
    c.data.synthetic_size = (64, 128)
    c.data.synthetic_num_train = 16
    c.data.synthetic_num_val = 4
    c.data.eval_pad_size = (64, 128)
  c.data.eval_batch_size = 2
  c.schedule.total_steps = 10
  c.contrast.anchors_per_class = 8
  c.contrast.num_positives = 32
  c.contrast.num_negatives = 64
  if c.contrast.recipe != "official_mem":  # Its one view per (image, class) fits any crop.
    c.contrast.max_samples = 64
    c.contrast.max_views = 8
  c.contrast.positive_pool = 128
  c.contrast.negative_pool = 256
  c.memory.pixel_queue_size = 64
  c.memory.official_queue_size = 64
  c.eval.every_steps = 5
  c.eval.max_batches = 2
  c.eval.mode = "whole"
  c.eval.protocol = None
  c.eval.scales = (1.0,)
  c.eval.flip = False
  c.eval.num_summary_images = 1
  c.checkpoint.every_steps = 5
  c.log.every_steps = 1
  return c


def finalize(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies the common arg words (official or official_mem, bf16, runlocal) in a fixed order."""
  words = parse_arg(arg)
  if {"official", "official_mem"} <= words:
    raise ValueError("config args 'official' and 'official_mem' are two recipes; give one")
  if "official" in words:
    apply_official(c)
  if "official_mem" in words:
    apply_official_mem(c)
  if "bf16" in words:
    # The TPU / GPU setting (pixcon_jax/precision.py): bf16 compute, float32 parameters, optimizer,
    # BN statistics, outputs and losses; matmul precision 'default' (model.matmul_precision None).
    c.model.dtype = "bfloat16"
  if "runlocal" in words:
    apply_runlocal(c)
  return c
