"""`pixcon_jax.load_segmenter`: a run's workdir or a converted official checkpoint, from Python.

One tiny run directory (checkpoint + config.json, random weights, no training) serves the
workdir cases: the segmenter must give mode predict's PNGs pixel for pixel. The converted case
runs the full-width HRNet-W48 on the golden input against the official logits.
"""
import pathlib

import numpy as np
import pytest
from PIL import Image

import pixcon_jax
from pixcon_jax import predict
from pixcon_jax import segment
from pixcon_jax import validation

import segment_fixtures  # tests/segment_fixtures.py

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tiny_run_dir):
  return tiny_run_dir  # conftest.py


def _images(tmp_path):
  """Two images of one size and one of another, as PNG files and as arrays."""
  rng = np.random.default_rng(1)
  folder = tmp_path / "images"
  folder.mkdir()
  arrays = {}
  for name, (h, w) in (("a", (24, 40)), ("b", (24, 40)), ("c", (19, 33))):
    arrays[name] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arrays[name]).save(folder / f"{name}.png")
  return folder, arrays


def test_segmenter_equals_mode_predict_pixel_for_pixel(run_dir, tmp_path):
  folder, arrays = _images(tmp_path)
  config = segment.read_run_config(str(run_dir))
  config.mode = "predict"
  config.predict.input_dir = str(folder)
  config.predict.output_dir = str(tmp_path / "out")
  predict.predict_folder(config, str(run_dir))

  seg = pixcon_jax.load_segmenter(str(run_dir))
  assert isinstance(seg, pixcon_jax.Segmenter)
  assert "step 2" in seg.source  # the run's latest checkpoint
  singles = {name: seg(image) for name, image in arrays.items()}
  for name, label in singles.items():
    expected = np.asarray(Image.open(tmp_path / "out" / "label" / f"{name}.png"))
    assert label.shape == arrays[name].shape[:2] and label.dtype == np.int32
    np.testing.assert_array_equal(label, expected)
    color = np.asarray(Image.open(tmp_path / "out" / "color" / f"{name}.png"))
    np.testing.assert_array_equal(seg.colorize(label), color)
    assert len(np.unique(label)) > 1  # the random weights do not predict one class everywhere
  # Batched: an [N, H, W, 3] array and a list of images of different sizes.
  batch = seg(np.stack([arrays["a"], arrays["b"]]))
  assert batch.shape == (2, 24, 40)
  np.testing.assert_array_equal(batch, np.stack([singles["a"], singles["b"]]))
  listed = seg([arrays["a"], arrays["c"]])
  assert isinstance(listed, list)
  np.testing.assert_array_equal(listed[1], singles["c"])
  np.testing.assert_array_equal(np.argmax(seg.logits(arrays["c"]), -1), singles["c"])
  # Raw label ids, as mode predict's label_format='label_id'.
  lut = np.asarray([e.id for e in sorted(seg.info.class_table, key=lambda e: e.train_id)
                    if e.train_id != 255])
  np.testing.assert_array_equal(seg.label_ids(arrays["c"]), lut[singles["c"]])


def test_protocol_and_eval_overrides_change_the_settings(run_dir):
  seg = pixcon_jax.load_segmenter(str(run_dir), protocol="paper", mode="slide",
                                  crop_size=(16, 16))
  assert seg.settings.flip and seg.settings.scales[-1] == 2.0
  assert seg.settings.mode == "slide" and seg.settings.crop_size == (16, 16)


@pytest.mark.parametrize("make_path, kwargs, message", [
    (lambda d, t: t / "nowhere", {}, r"load_segmenter\('.*nowhere'\): no such file or directory"),
    (lambda d, t: t, {}, r"has no config.json.*pass model="),
    (lambda d, t: (t / "f.txt").write_text("x") and t / "f.txt", {}, r"f.txt'\) is a file"),
    (lambda d, t: t, {"model": "hrnet_w18_contrast"},
     r"load_segmenter\('.*'\): .*no orbax checkpoint"),
    (lambda d, t: d, {"model": "deeplab_v3_contrast"},
     r"model='deeplab_v3_contrast' but the run's config.json has 'hrnet_w18_contrast'"),
    (lambda d, t: d, {"protocol": "fast"}, r"protocol='fast': expected one of"),
    (lambda d, t: d, {"overrides": {"eval.modes": "x"}}, r"overrides\['eval.modes'\]"),
    (lambda d, t: d, {"colour": 1}, r"unknown argument\(s\) \['colour'\]"),
])
def test_bad_paths_and_arguments_are_one_input_error(run_dir, tmp_path, make_path, kwargs,
                                                     message):
  path = make_path(run_dir, tmp_path)
  with pytest.raises(validation.InputError, match=message) as info:
    pixcon_jax.load_segmenter(str(path), **kwargs)
  assert "\n" not in str(info.value)


def test_bad_image_shape_is_an_input_error(run_dir):
  seg = pixcon_jax.load_segmenter(str(run_dir))
  with pytest.raises(validation.InputError, match=r"\[H, W, 3\].*got shape \[8, 8\]"):
    seg(np.zeros((8, 8), np.uint8))


def test_converted_official_checkpoint_gives_the_official_argmax(golden_dir, tmp_path):
  """The golden HRNet-W48 stand-in weights, converted as scripts/convert_checkpoint.py writes
  them; the segmenter's labels are the argmax of the official logits resized (align_corners)
  to the input, as the official `ss_test` does."""
  out = segment_fixtures.converted_golden_checkpoint(golden_dir, "hrnet_w48_contrast",
                                                     tmp_path / "converted")
  with np.load(golden_dir / "hrnet_w48_contrast.npz") as f:
    image, seg_logits = f["input"].transpose(0, 2, 3, 1), f["seg"].transpose(0, 2, 3, 1)
  seg = pixcon_jax.load_segmenter(str(out), model="hrnet_w48_contrast", protocol="single")
  assert seg.augment.bgr  # the official recipe's input
  ours = seg(image, normalized=True)
  from pixcon_jax.models import layers  # pylint: disable=g-import-not-at-top
  ref = np.asarray(layers.resize_bilinear(seg_logits, image.shape[1:3]))
  top2 = np.sort(ref, axis=-1)[..., -2:]
  clear = (top2[..., 1] - top2[..., 0]) > 1e-3 * np.abs(ref).max()  # not a float32 tie
  assert clear.mean() > 0.99
  np.testing.assert_array_equal(ours[clear], np.argmax(ref, -1)[clear])
