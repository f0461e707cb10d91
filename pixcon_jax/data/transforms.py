"""Joint image/label transforms: random scale, pad, crop, flip, photometric jitter, normalisation.

All geometric transforms draw their parameters once and apply them to image and label together,
so the two stay aligned pixel for pixel. For speed the random crop window is computed in the
coordinates of the *scaled* image and only the source region under it is resized (PIL `box`
resize on uint8): on a 1024x2048 Cityscapes image with scale 2.0 we resize a 256x512 region instead
of producing a 2048x4096 image and throwing 7/8 of it away. The sampling grid is exactly the one of
"resize the whole image, then crop", because the box is expressed with the same scale factors.

Images enter as uint8 [H, W, 3] RGB and leave as float32 [h, w, 3] normalised (RGB or BGR order;
in BGR order the statistics are applied by position, as the official code does, see `normalize`);
labels enter as uint8 train ids [H, W] (255 = ignore) and leave as int32 [h, w].
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np
from PIL import Image

from pixcon_jax.data.classes import IGNORE_LABEL

# ImageNet statistics on the 0-255 scale, RGB order.
IMAGENET_MEAN = np.asarray([0.485, 0.456, 0.406], np.float32) * 255.0
IMAGENET_STD = np.asarray([0.229, 0.224, 0.225], np.float32) * 255.0
NORMALIZATIONS = ("imagenet", "none")  # augment.normalize
PAD_IMAGE_VALUES = ("mean", "zero")  # augment.pad_image_value


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Static augmentation settings (see `config_defaults.default_augment_config` for each key)."""
  scale_range: tuple[float, float] = (0.5, 2.0)
  aspect_jitter: bool = False
  aspect_range: tuple[float, float] = (0.9, 1.1)
  flip: bool = True
  brightness_shift: int = 10
  brightness_prob: float = 1.0
  color_jitter: bool = False
  color_jitter_strength: float = 0.4
  normalize: str = "imagenet"
  bgr: bool = False
  pad_image_value: str = "mean"

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any] | None) -> "AugmentConfig":
    """Builds from a dict / ConfigDict `config.augment`; missing keys take the defaults."""
    if cfg is None:
      return cls()
    kwargs = {}
    for f in dataclasses.fields(cls):
      if f.name in cfg:
        v = cfg[f.name]
        kwargs[f.name] = tuple(v) if isinstance(v, (list, tuple)) else v
    unknown = set(cfg.keys()) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown augment keys {sorted(unknown)}; known: "
                       f"{[f.name for f in dataclasses.fields(cls)]}")
    out = cls(**kwargs)
    if out.normalize not in NORMALIZATIONS:
      raise ValueError(f"augment.normalize must be one of {NORMALIZATIONS}, got {out.normalize!r}")
    if out.pad_image_value not in PAD_IMAGE_VALUES:
      raise ValueError(f"augment.pad_image_value must be one of {PAD_IMAGE_VALUES}, got "
                       f"{out.pad_image_value!r}")
    return out


def mean_std(cfg: AugmentConfig) -> tuple[np.ndarray, np.ndarray]:
  """([3], [3]) float32 mean and std on 0-255 that `normalize` applies (by channel position)."""
  if cfg.normalize == "none":
    return np.zeros(3, np.float32), np.ones(3, np.float32)
  return IMAGENET_MEAN, IMAGENET_STD


def normalize(image: np.ndarray, cfg: AugmentConfig) -> np.ndarray:
  """uint8/float [h, w, 3] RGB on 0-255 -> float32 [h, w, 3] normalised.

  With `cfg.bgr` the channels are reversed *before* normalising and the RGB statistics are
  applied by position (channel 0, blue, gets R's mean and std): the official pipeline reads
  BGR with OpenCV and its `Normalize` zips the channels with the RGB lists, so its
  checkpoints were trained on exactly this input.
  """
  mean, std = mean_std(cfg)
  image = np.asarray(image, np.float32)
  if cfg.bgr:
    image = image[..., ::-1]
  return np.ascontiguousarray((image - mean) * (1.0 / std))


def pad_value(cfg: AugmentConfig) -> np.ndarray:
  """Normalised value of padding pixels: [3] float32 (0 for 'mean' padding)."""
  if cfg.pad_image_value == "mean":
    return np.zeros(3, np.float32)
  return normalize(np.zeros((1, 1, 3), np.float32), cfg)[0, 0]


def _draw_shift(rng: np.random.Generator, cfg: AugmentConfig) -> tuple[bool, float]:
  """Official RandomBrightness: with probability `brightness_prob` (official ratio 1.0) add
  round(U(-v, v)) to every channel, then clip to [0, 255]."""
  do_shift = rng.random() < cfg.brightness_prob
  shift = float(np.round(rng.uniform(-cfg.brightness_shift, cfg.brightness_shift)))
  return bool(do_shift and cfg.brightness_shift), shift


def photometric(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
  """Brightness shift (official) and optional colour jitter. float32 [h, w, 3] 0-255 RGB, clipped.

  The draws are made unconditionally so the random stream does not depend on the image.
  """
  do_shift, shift = _draw_shift(rng, cfg)
  factors = rng.uniform(1 - cfg.color_jitter_strength, 1 + cfg.color_jitter_strength, size=3)
  if do_shift and shift:
    image = image + np.float32(shift)
  if cfg.color_jitter:
    b, c, s = (np.float32(f) for f in factors)
    image = image * b
    gray = image @ np.asarray([0.299, 0.587, 0.114], np.float32)
    image = (image - gray.mean()) * c + gray.mean()
    gray = image @ np.asarray([0.299, 0.587, 0.114], np.float32)
    image = (image - gray[..., None]) * s + gray[..., None]
  return np.clip(image, 0.0, 255.0)


def _resize_region(array: np.ndarray, box: tuple[float, float, float, float],
                   size: tuple[int, int], resample: int) -> np.ndarray:
  """Resizes the source region `box` (x0, y0, x1, y1, source pixels) to `size` (w, h) with PIL.

  For strong bilinear downscaling the region is first box-reduced by an integer factor k (PIL
  `reduce`, several times faster than an antialiased resize). Reduced pixel i covers source pixels
  [k*i, k*(i+1)), so source coordinate x maps to x / k exactly and the geometry, hence the
  alignment with the (nearest-resized) label, is unchanged.
  """
  w, h = size
  if w <= 0 or h <= 0:
    return np.zeros((h, w) + array.shape[2:], array.dtype)
  pil = Image.fromarray(array)
  x0, y0, x1, y1 = box
  k = int(min((x1 - x0) / w, (y1 - y0) / h) / 1.5) if resample != Image.NEAREST else 1
  if k >= 2:
    ox, oy = int(x0 // k) * k, int(y0 // k) * k
    ex = min(array.shape[1], int(np.ceil(x1 / k)) * k)
    ey = min(array.shape[0], int(np.ceil(y1 / k)) * k)
    pil = pil.reduce(k, box=(ox, oy, ex, ey))
    box = ((x0 - ox) / k, (y0 - oy) / k, (x1 - ox) / k, (y1 - oy) / k)
  return np.asarray(pil.resize(size, resample=resample, box=box))


def random_scale_crop(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, *,
                      crop_size: tuple[int, int], cfg: AugmentConfig
                      ) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
  """Random scale, pad-to-crop and random crop, computed as one box resize.

  Args:
    image: [H, W, 3] uint8.
    label: [H, W] uint8 train ids.
    rng: the example's generator.
    crop_size: (h, w) output size.
    cfg: augmentation settings.

  Returns:
    image_region [rh, rw, 3] uint8, label_region [rh, rw] uint8 and the placement (top, left, rh, rw)
    of the region in the [h, w] crop; the rest of the crop is padding (ignore).
  """
  h_img, w_img = label.shape
  ch, cw = crop_size
  scale = rng.uniform(*cfg.scale_range)
  aspect = rng.uniform(*cfg.aspect_range)
  if not cfg.aspect_jitter:
    aspect = 1.0
  # Official aspect jitter: w scaled by sqrt(a), h by 1/sqrt(a).
  sw, sh = scale * np.sqrt(aspect), scale / np.sqrt(aspect)
  hs, ws = max(1, int(round(h_img * sh))), max(1, int(round(w_img * sw)))
  # Pad (bottom/right) to at least the crop size, then crop uniformly.
  hp, wp = max(hs, ch), max(ws, cw)
  y0 = int(rng.integers(0, hp - ch + 1))
  x0 = int(rng.integers(0, wp - cw + 1))
  y1, x1 = min(y0 + ch, hs), min(x0 + cw, ws)
  rh, rw = max(0, y1 - y0), max(0, x1 - x0)
  # Source-pixel box with the exact factors of a full resize to (hs, ws).
  fy, fx = h_img / hs, w_img / ws
  box = (x0 * fx, y0 * fy, x1 * fx, y1 * fy)
  img = _resize_region(image, box, (rw, rh), Image.BILINEAR)
  lab = _resize_region(label, box, (rw, rh), Image.NEAREST)
  return img, lab, (0, 0, rh, rw)


def _normalize_lut(shift: float, cfg: AugmentConfig) -> np.ndarray:
  """[256, 3] float32: uint8 value of channel c -> shifted, clipped, normalised value."""
  v = np.clip(np.arange(256, dtype=np.float32) + np.float32(shift), 0.0, 255.0)
  mean, std = mean_std(cfg)
  return (v[:, None] - mean) * (1.0 / std)


def _write_normalized(out: np.ndarray, image: np.ndarray, lut: np.ndarray, cfg: AugmentConfig
                      ) -> None:
  """out[..., k] = lut[image[..., c], k] with c = k (RGB) or 2 - k (BGR): one table lookup per
  channel replaces float conversion, shift, clip and normalisation (2x faster than arithmetic).
  The table column is the output position k, so in BGR the statistics go by position, as in
  `normalize`."""
  for k in range(3):
    c = 2 - k if cfg.bgr else k
    np.take(lut[:, k], image[..., c], out=out[..., k])


def train_transform(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, *,
                    crop_size: tuple[int, int], cfg: AugmentConfig
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Full training augmentation of one example.

  Args:
    image: [H, W, 3] uint8 RGB.
    label: [H, W] uint8 train ids, 255 = ignore.
    rng: generator seeded from (seed, example index) by grain.
    crop_size: (h, w).
    cfg: augmentation settings.

  Returns:
    image [h, w, 3] float32 normalised, label [h, w] int32 (255 in padding).
  """
  if image.shape[:2] != label.shape:
    raise ValueError(f"image {image.shape} and label {label.shape} sizes differ")
  img, lab, (top, left, rh, rw) = random_scale_crop(image, label, rng, crop_size=crop_size, cfg=cfg)
  flip = cfg.flip and rng.random() < 0.5
  if flip:
    img, lab = img[:, ::-1], lab[:, ::-1]
  ch, cw = crop_size
  out_img = np.empty((ch, cw, 3), np.float32)
  if rh < ch or rw < cw:
    out_img[...] = pad_value(cfg)
  out_lab = np.full((ch, cw), IGNORE_LABEL, np.int32)
  out_lab[top:top + rh, left:left + rw] = lab
  region = out_img[top:top + rh, left:left + rw]
  if cfg.color_jitter:
    region[...] = normalize(photometric(img.astype(np.float32), rng, cfg), cfg)
  else:
    # Same draws as `photometric`, folded into the normalisation table.
    do_shift, shift = _draw_shift(rng, cfg)
    rng.uniform(size=3)
    _write_normalized(region, img, _normalize_lut(shift if do_shift else 0, cfg), cfg)
  return out_img, out_lab


def eval_transform(image: np.ndarray, label: np.ndarray, *, pad_size: tuple[int, int] | None,
                   resize: tuple[int, int] | None, cfg: AugmentConfig
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Whole-image evaluation input: optional fixed resize, normalisation, pad to `pad_size`.

  Args:
    image: [H, W, 3] uint8; label: [H, W] uint8.
    pad_size: (Hp, Wp) common size of the batch, or None to keep the image size.
    resize: (h, w) to resize image (bilinear) and label (nearest) first, or None.
    cfg: only normalisation settings are used.

  Returns:
    image [Hp, Wp, 3] float32 and label [Hp, Wp] int32 with 255 in the padding.
  """
  if resize is not None:
    size = (int(resize[1]), int(resize[0]))
    image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
  h, w = label.shape
  hp, wp = pad_size if pad_size is not None else (h, w)
  if h > hp or w > wp:
    raise ValueError(f"image of size {(h, w)} does not fit the eval padding size {(hp, wp)}; "
                     "raise data.eval_pad_size or set data.eval_resize")
  out_img = np.empty((hp, wp, 3), np.float32)
  if (h, w) != (hp, wp):
    out_img[...] = pad_value(cfg)
  out_lab = np.full((hp, wp), IGNORE_LABEL, np.int32)
  _write_normalized(out_img[:h, :w], image, _normalize_lut(0, cfg), cfg)
  out_lab[:h, :w] = label
  return out_img, out_lab
