"""Default `config.data` and `config.augment` groups, one comment per key (configs copy these)."""
from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from pixcon_jax.data.datasets import get_dataset_info


def default_data_config(dataset: str = "cityscapes") -> ml_collections.ConfigDict:
  """`config.data` with the paper's values for `dataset`.

  Keys:
    dataset: registry name: cityscapes | pascal_context | coco_stuff | synthetic.
    data_dir: TFDS data_dir of the prepared dataset (unused by synthetic); None or '' = TFDS's
      default (~/tensorflow_datasets); a leading ~ is expanded.
    tfds_name: TFDS builder name; None or '' = the dataset's (e.g.
      'cityscapes/semantic_segmentation').
    train_split / eval_split: TFDS split names.
    batch_size: GLOBAL batch size (paper: 8 Cityscapes, 16 PASCAL-Context / COCO-Stuff); the
      training loop divides it by the process count and passes the per-process size here.
    crop_size: (h, w) training crop (512x1024 Cityscapes, 520x520 the others).
    eval_pad_size: (h, w) every evaluation image is padded to (label 255 in the padding); None =
      the dataset's default (1024x2048 Cityscapes, 512x512 PASCAL-Context, 640x640 COCO-Stuff,
      `synthetic_size` for synthetic).
    eval_resize: (h, w) to resize evaluation images to first, or None for native resolution.
    worker_count: grain worker processes per host (0 = in the main process).
    prefetch: batches buffered per worker (grain `worker_buffer_size`).
    read_threads: threads reading / rendering records (grain ReadOptions.num_threads).
    seed: shuffling and augmentation seed (per example: (seed, index)).
    unknown_label: 'ignore' (counted warning) or 'error' for label ids outside the class table.
    synthetic_size / synthetic_num_train / synthetic_num_val / synthetic_seed: synthetic scenes.
  """
  info = get_dataset_info(dataset)
  c = ml_collections.ConfigDict()
  c.dataset = dataset
  # Keys that default to None are typed placeholders, so that `--config.data.x=...` can set them.
  c.data_dir = placeholder(str)
  c.tfds_name = placeholder(str)
  c.train_split = info.train_split
  c.eval_split = info.val_split
  c.batch_size = {"cityscapes": 8, "synthetic": 8}.get(dataset, 16)
  c.crop_size = info.crop_size
  c.eval_pad_size = placeholder(tuple) if dataset == "synthetic" else info.eval_pad_size
  c.eval_resize = placeholder(tuple)
  c.worker_count = 2
  c.prefetch = 2
  c.read_threads = 4
  c.seed = 0
  c.unknown_label = "ignore"
  c.synthetic_size = (256, 512)
  c.synthetic_num_train = 2000
  c.synthetic_num_val = 100
  c.synthetic_seed = 0
  return c


def default_augment_config() -> ml_collections.ConfigDict:
  """`config.augment` (paper / official recipe values).

  Keys:
    scale_range: random scale factor range, uniform (0.5, 2.0).
    aspect_jitter: also jitter the aspect ratio (official openseg option), off by default.
    aspect_range: aspect ratio range when `aspect_jitter` (w *= sqrt(a), h /= sqrt(a)).
    flip: random horizontal flip with probability 0.5.
    brightness_shift: official RandomBrightness: add round(U(-v, v)) to all channels, clip
      (openseg configs: v = 10; 0 disables).
    brightness_prob: probability of the brightness shift (official `ratio` 1.0).
    color_jitter: brightness/contrast/saturation jitter as in the paper's text, off by default.
    color_jitter_strength: factors drawn in [1 - s, 1 + s].
    normalize: 'imagenet' (mean/std of ImageNet, 0-255 scale) or 'none'.
    bgr: feed channels in BGR order with the RGB statistics applied by position, exactly the
      official input (cv2 BGR + Normalize); the official PyTorch checkpoints need it.
    pad_image_value: 'mean' (normalised 0) or 'zero' (black) for padded image pixels.
  """
  c = ml_collections.ConfigDict()
  c.scale_range = (0.5, 2.0)
  c.aspect_jitter = False
  c.aspect_range = (0.9, 1.1)
  c.flip = True
  c.brightness_shift = 10
  c.brightness_prob = 1.0
  c.color_jitter = False
  c.color_jitter_strength = 0.4
  c.normalize = "imagenet"
  c.bgr = False
  c.pad_image_value = "mean"
  return c
