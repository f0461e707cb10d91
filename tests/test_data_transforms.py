"""Joint transforms keep image and label aligned, never turn ignore into a class, are seeded."""
import dataclasses

import numpy as np
import pytest

from pixcon_jax.data import transforms

# Distinct colours per label value; label 255 (ignore) has its own colour too.
_COLORS = {v: np.array([(37 * v + 20) % 256, (91 * v + 60) % 256, (151 * v + 100) % 256],
                       np.float32) for v in list(range(10)) + [255]}
_RAW = dataclasses.replace(transforms.AugmentConfig(), normalize="none", brightness_shift=0,
                           pad_image_value="zero")


def _pattern(h=64, w=96, block=8):
  """Blocks whose label is a function of position, coloured by label (some blocks ignore)."""
  by, bx = np.meshgrid(np.arange(h) // block, np.arange(w) // block, indexing="ij")
  label = ((by * 7 + bx * 3) % 11).astype(np.uint8)
  label[label == 10] = 255
  image = np.zeros((h, w, 3), np.uint8)
  for v, c in _COLORS.items():
    image[label == v] = c.astype(np.uint8)
  return image, label


def _uniform_interior(label, r):
  """Pixels whose (2r+1)^2 neighbourhood has one label (the crop border, whose neighbours lie
  outside the crop, never counts)."""
  h, w = label.shape
  ok = np.zeros_like(label, dtype=bool)
  pad = np.pad(label.astype(np.int32), r, constant_values=-1)
  ok[:] = True
  for dy in range(-r, r + 1):
    for dx in range(-r, r + 1):
      ok &= pad[r + dy:r + dy + h, r + dx:r + dx + w] == label
  return ok


def _color_of(label):
  out = np.zeros(label.shape + (3,), np.float32)
  for v, c in _COLORS.items():
    out[label == v] = c
  return out


def test_crop_flip_pad_without_scaling_is_exact():
  image, label = _pattern()
  cfg = dataclasses.replace(_RAW, scale_range=(1.0, 1.0))
  for seed in range(8):
    img, lab = transforms.train_transform(image, label, np.random.default_rng(seed),
                                          crop_size=(48, 128), cfg=cfg)
    assert img.shape == (48, 128, 3) and lab.shape == (48, 128) and lab.dtype == np.int32
    real = np.zeros_like(lab, dtype=bool)
    real[:, :96] = True  # Width 96 < 128: padded on the right with ignore.
    np.testing.assert_array_equal(lab[~real], 255)
    np.testing.assert_array_equal(img[~real], 0)
    np.testing.assert_array_equal(img[real], _color_of(lab)[real])


@pytest.mark.parametrize("aspect_jitter", [False, True])
def test_scaled_crops_keep_image_and_label_aligned(aspect_jitter):
  image, label = _pattern()
  cfg = dataclasses.replace(_RAW, aspect_jitter=aspect_jitter, aspect_range=(0.7, 1.4))
  for seed in range(12):
    img, lab = transforms.train_transform(image, label, np.random.default_rng(seed),
                                          crop_size=(40, 56), cfg=cfg)
    interior = _uniform_interior(lab, 2)
    # Padding (image 0, label 255) is excluded: only pixels coloured like some label count.
    not_pad = np.abs(img).sum(-1) > 0
    sel = interior & not_pad
    err = np.abs(img - _color_of(lab)).max(-1)[sel]
    assert sel.sum() > 50
    assert np.mean(err < 12) > 0.99, (seed, np.mean(err < 12))


def test_ignore_never_becomes_a_class_and_no_new_labels():
  image, label = _pattern()
  ignore_color = _COLORS[255]
  for seed in range(12):
    img, lab = transforms.train_transform(image, label, np.random.default_rng(seed),
                                          crop_size=(40, 56), cfg=_RAW)
    assert set(np.unique(lab)) <= set(np.unique(label)) | {255}
    interior = _uniform_interior(lab, 2)
    looks_ignore = (np.abs(img - ignore_color).max(-1) < 3) & interior
    assert np.all(lab[looks_ignore] == 255)


def test_same_seed_same_output_and_normalisation():
  image, label = _pattern()
  cfg = transforms.AugmentConfig(color_jitter=True)
  a = transforms.train_transform(image, label, np.random.default_rng(5), crop_size=(32, 32), cfg=cfg)
  b = transforms.train_transform(image, label, np.random.default_rng(5), crop_size=(32, 32), cfg=cfg)
  c = transforms.train_transform(image, label, np.random.default_rng(6), crop_size=(32, 32), cfg=cfg)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])


def test_rgb_imagenet_normalisation():
  image = np.full((4, 4, 3), (10, 120, 240), np.uint8)
  label = np.zeros((4, 4), np.uint8)
  rgb = transforms.eval_transform(image, label, pad_size=None, resize=None,
                                  cfg=transforms.AugmentConfig())[0]
  expected = (np.array([10, 120, 240]) / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array(
      [0.229, 0.224, 0.225])
  np.testing.assert_allclose(rgb[0, 0], expected, rtol=1e-5)


def _official_bgr_input(rgb: np.ndarray) -> np.ndarray:
  """The official network input for an RGB uint8 [H, W, 3] image, [H, W, 3] float64.

  Written from tfzhou/ContrastiveSeg @287e5d3: the loader reads BGR with cv2 (`input_mode`
  BGR), `ToTensor` makes CHW floats, `Normalize(div_value=255, mean, std)` divides by 255 and
  zips the channels with the RGB lists, so channel i gets mean[i] and std[i] by position.
  """
  chw = rgb[..., ::-1].transpose(2, 0, 1).astype(np.float64) / 255.0
  mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
  out = np.stack([(chw[i] - mean[i]) / std[i] for i in range(3)])
  return out.transpose(1, 2, 0)


def test_bgr_matches_the_official_normalisation_on_both_code_paths():
  rgb = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
  rgb[0, 0] = (10, 120, 240)  # Strongly unequal channels: a swapped statistic shows here.
  label = np.zeros(rgb.shape[:2], np.uint8)
  expected = _official_bgr_input(rgb)
  cfg = transforms.AugmentConfig(bgr=True)
  # Arithmetic path (also the colour-jitter branch of `train_transform`).
  np.testing.assert_allclose(transforms.normalize(rgb, cfg), expected, atol=1e-5)
  # Lookup-table paths: evaluation, and training with an identity geometry and no shift.
  got = transforms.eval_transform(rgb, label, pad_size=None, resize=None, cfg=cfg)[0]
  np.testing.assert_allclose(got, expected, atol=1e-5)
  train_cfg = dataclasses.replace(cfg, scale_range=(1.0, 1.0), flip=False, brightness_shift=0)
  got = transforms.train_transform(rgb, label, np.random.default_rng(0), crop_size=(6, 10),
                                   cfg=train_cfg)[0]
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_brightness_shift_is_bounded_and_shared_by_all_pixels():
  image = np.full((8, 8, 3), 100, np.uint8)
  label = np.zeros((8, 8), np.uint8)
  cfg = dataclasses.replace(_RAW, scale_range=(1.0, 1.0), brightness_shift=10, brightness_prob=1.0)
  shifts = set()
  for seed in range(20):
    img, _ = transforms.train_transform(image, label, np.random.default_rng(seed),
                                        crop_size=(8, 8), cfg=cfg)
    assert np.all(img == img[0, 0, 0])
    shifts.add(float(img[0, 0, 0]) - 100)
  assert all(-10 <= s <= 10 for s in shifts) and len(shifts) > 3


def test_eval_padding_and_errors():
  image, label = _pattern(30, 40)
  img, lab = transforms.eval_transform(image, label, pad_size=(32, 48), resize=None, cfg=_RAW)
  assert img.shape == (32, 48, 3)
  np.testing.assert_array_equal(lab[:30, :40], label)
  assert np.all(lab[30:] == 255) and np.all(lab[:, 40:] == 255)
  with pytest.raises(ValueError, match="eval padding size"):
    transforms.eval_transform(image, label, pad_size=(16, 16), resize=None, cfg=_RAW)
  with pytest.raises(ValueError, match="sizes differ"):
    transforms.train_transform(image, label[:10], np.random.default_rng(0), crop_size=(8, 8),
                               cfg=_RAW)
  with pytest.raises(ValueError, match="unknown augment keys"):
    transforms.AugmentConfig.from_config({"scale": (1, 2)})


def test_eval_resize_policy_keeps_alignment():
  image, label = _pattern(64, 96)
  img, lab = transforms.eval_transform(image, label, pad_size=(40, 56), resize=(32, 48), cfg=_RAW)
  assert img.shape == (40, 56, 3) and np.all(lab[32:] == 255) and np.all(lab[:, 48:] == 255)
  interior = _uniform_interior(lab[:32, :48], 1)
  err = np.abs(img[:32, :48] - _color_of(lab[:32, :48])).max(-1)[interior]
  assert np.mean(err < 12) > 0.99
