"""COCO-Stuff-10k (171 classes from the 182 raw ids): class table and the project's TFDS builder.

Manual files: `cocostuff-10k-v1.1.zip` from https://github.com/nightrome/cocostuff10k, either the
zip itself in `--manual_dir` (extracted by TFDS) or its extracted content:

  images/<name>.jpg                 10000 COCO images
  annotations/<name>.mat            MATLAB files with `S` [H, W]: 0 = unlabeled, 1..182 COCO ids
                                    (`annotations/<name>.png` with the same ids is accepted too)
  imageLists/train.txt              9000 names
  imageLists/test.txt               1000 names (the `validation` split, as in the paper)

Of the 182 ids, 11 thing ids are never used (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91); the other
171 become train ids 0..170 in id order, and 0 (unlabeled) becomes ignore.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from pixcon_jax.data import classes
from pixcon_jax.data import tfds_builder

TFDS_NAME = "coco_stuff10k"
ZIP_NAME = "cocostuff-10k-v1.1.zip"
MANUAL_FILES = ("images", "annotations", "imageLists/train.txt", "imageLists/test.txt")
NUM_TRAIN_IMAGES = 9000
NUM_VAL_IMAGES = 1000

# Raw ids 1..182 (0 = unlabeled); None marks the 11 ids absent from the annotations.
_RAW_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", None, "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", None, "backpack",
    "umbrella", None, None, "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", None, "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", None, "dining table", None, None, "toilet",
    None, "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", None, "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush", None,
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds",
    "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble",
    "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other",
    "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves",
    "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing",
    "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf",
    "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
    "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood")
assert len(_RAW_NAMES) == 182


def _table() -> tuple[classes.ClassEntry, ...]:
  colors = classes.generated_colors(171, seed=171)
  entries = [classes.ClassEntry(0, classes.IGNORE_LABEL, "unlabeled", (0, 0, 0), True)]
  train_id = 0
  for raw_id, name in enumerate(_RAW_NAMES, start=1):
    if name is not None:
      entries.append(classes.ClassEntry(raw_id, train_id, name, colors[train_id], False))
      train_id += 1
  assert train_id == 171
  return tuple(entries)


CLASS_TABLE = _table()
ID_TO_TRAIN_ID = classes.id_to_train_id_lut(CLASS_TABLE)


def resolve_root(manual_dir: str) -> str:
  """The folder holding `images/`: `manual_dir` or its single `cocostuff-10k*` subfolder."""
  if os.path.isdir(os.path.join(manual_dir, "images")):
    return manual_dir
  for sub in sorted(os.listdir(manual_dir)) if os.path.isdir(manual_dir) else []:
    if os.path.isdir(os.path.join(manual_dir, sub, "images")):
      return os.path.join(manual_dir, sub)
  return manual_dir


def check_manual_dir(manual_dir: str) -> None:
  """Raises FileNotFoundError naming the expected files when one is missing."""
  if os.path.isfile(os.path.join(manual_dir, ZIP_NAME)):
    return
  tfds_builder.check_files(
      resolve_root(manual_dir), MANUAL_FILES, "COCO-Stuff-10k",
      f"Put {ZIP_NAME} or its extracted content there; see docs/DATA.md.")


def read_annotation(path: str, example: str) -> np.ndarray:
  """Raw ids [H, W] uint8 from a `.mat` (`S`) or `.png` annotation; errors name the example."""
  try:
    if path.endswith(".mat"):
      import scipy.io  # Only needed for the official .mat annotations.
      label = scipy.io.loadmat(path)["S"]
    else:
      label = np.asarray(Image.open(path))
  except Exception as e:
    raise ValueError(f"corrupt annotation for example {example!r}: {path}: {e}") from e
  if label.max(initial=0) > 255:
    raise ValueError(f"example {example!r}: label id {label.max()} > 255 in {path}")
  return label.astype(np.uint8)


class CocoStuff10k(tfds.core.GeneratorBasedBuilder):
  """COCO-Stuff-10k (raw ids 0-182 stored; see module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds_builder.features(), homepage="https://github.com/nightrome/cocostuff10k")

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    check_manual_dir(manual_dir)
    zip_path = os.path.join(manual_dir, ZIP_NAME)
    if not os.path.isdir(os.path.join(resolve_root(manual_dir), "images")) and os.path.isfile(
        zip_path):
      manual_dir = os.fspath(dl_manager.extract(zip_path))
      check_manual_dir(manual_dir)
    root = resolve_root(manual_dir)
    return {
        "train": self._generate_examples(root, os.path.join(root, "imageLists", "train.txt")),
        "validation": self._generate_examples(root, os.path.join(root, "imageLists", "test.txt")),
    }

  def _generate_examples(self, root: str, list_file: str):
    for stem in tfds_builder.read_list(list_file):
      image_path = os.path.join(root, "images", stem + ".jpg")
      label_path = os.path.join(root, "annotations", stem + ".mat")
      if not os.path.isfile(label_path):
        label_path = os.path.join(root, "annotations", stem + ".png")
      for p in (image_path, label_path):
        if not os.path.isfile(p):
          raise FileNotFoundError(f"COCO-Stuff-10k example {stem!r}: missing file {p}")
      hw = tfds_builder.image_size(image_path, stem)
      label = read_annotation(label_path, stem)
      tfds_builder.check_same_size(hw, label.shape, stem)
      yield stem, {"image_id": stem, "image": image_path, "label": tfds_builder.png_bytes(label)}
