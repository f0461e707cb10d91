"""Synthetic scenes: deterministic, any resolution, all classes, stats script JSON."""
import json
import os
import pathlib
import pickle
import subprocess
import sys

import numpy as np

from pixcon_jax import data
from pixcon_jax.data import synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_render_is_deterministic_and_split_dependent():
  a = synthetic.render(3, 5, (48, 96))
  b = synthetic.render(3, 5, (48, 96))
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[1], synthetic.render(3, 6, (48, 96))[1])
  assert not np.array_equal(a[1], synthetic.render(4, 5, (48, 96))[1])
  assert not np.array_equal(a[1], synthetic.render(3, 5, (48, 96), split="validation")[1])


def test_any_resolution_renders_the_same_scene():
  small = synthetic.render(0, 1, (64, 128))[1]
  large = synthetic.render(0, 1, (128, 256))[1]
  assert small.shape == (64, 128) and large.shape == (128, 256)
  # The layout is resolution-independent: the 2x render, subsampled, mostly agrees.
  assert np.mean(large[::2, ::2] == small) > 0.9
  img, lab = synthetic.render(0, 2, (37, 53))
  assert img.shape == (37, 53, 3) and img.dtype == np.uint8 and lab.dtype == np.uint8


def test_all_classes_occur_and_colour_alone_is_ambiguous():
  info = data.get_dataset_info("synthetic")
  assert info.num_classes == len(synthetic.CLASS_NAMES) >= 8
  present = set()
  mean_colors = {c: [] for c in range(info.num_classes)}
  for i in range(30):
    img, lab = synthetic.render(0, i, (96, 192))
    present |= set(np.unique(lab).tolist())
    for c in np.unique(lab):
      mean_colors[int(c)].append(img[lab == c].mean(0))
  assert present == set(range(info.num_classes))
  # Cars come in many colours, some as grey as a road: colour alone does not decide.
  car = np.array(mean_colors[synthetic.CAR])
  road = np.array(mean_colors[synthetic.ROAD])
  assert (car.max(0) - car.min(0)).min() > 60
  gap = np.abs(car[:, None, :] - road[None, :, :]).max(-1).min()
  assert gap < 20


def test_source_is_picklable_and_follows_the_record_contract():
  src = data.make_source({"dataset": "synthetic", "synthetic_size": (24, 40),
                          "synthetic_num_train": 5}, "train")
  src = pickle.loads(pickle.dumps(src))
  rec = src[4]
  assert len(src) == 5 and rec["image"].shape == (24, 40, 3) and rec["image_id"] == 4


def test_data_stats_script_prints_one_json_object():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [sys.executable, str(REPO / "scripts" / "data_stats.py"), "--dataset", "synthetic",
       "--split", "validation", "--max_examples", "3", "--class_weights"],
      capture_output=True, text=True, check=True, env=env, cwd=REPO)
  result = json.loads(out.stdout.strip())
  assert result["num_examples"] == 3
  assert set(result["pixel_counts"]) == set(synthetic.CLASS_NAMES)
  assert sum(result["pixel_counts"].values()) + result["ignored_pixels"] == 3 * 256 * 512
  assert len(result["class_weights"]) == 8
