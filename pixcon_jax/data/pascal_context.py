"""PASCAL-Context (59 classes + ignore): class table and the project's TFDS builder.

Manual files (`--manual_dir` is the VOC2010 folder, or a folder containing `VOCdevkit/VOC2010`):

  JPEGImages/<id>.jpg                          from VOCtrainval_03-May-2010.tar
  SegmentationClassContext/<id>.png            59-class label maps: 0 = background (-> ignore),
                                               1..59 = the classes below, in this order
  ImageSets/SegmentationContext/train.txt      4996 ids
  ImageSets/SegmentationContext/val.txt        5104 ids

The label maps are the standard conversion of `trainval_merged.json` with the Detail API (for
example mmsegmentation's `tools/dataset_converters/pascal_context.py`). Ids > 59 are unknown
(ignored with a counted warning when reading).
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from pixcon_jax.data import classes
from pixcon_jax.data import tfds_builder

TFDS_NAME = "pascal_context"
MANUAL_FILES = ("JPEGImages", "SegmentationClassContext",
                "ImageSets/SegmentationContext/train.txt", "ImageSets/SegmentationContext/val.txt")
NUM_TRAIN_IMAGES = 4996
NUM_VAL_IMAGES = 5104

NAMES_59 = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow",
    "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground",
    "horse", "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform",
    "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa",
    "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood")
assert len(NAMES_59) == 59

CLASS_TABLE: tuple[classes.ClassEntry, ...] = (
    (classes.ClassEntry(0, classes.IGNORE_LABEL, "background", (0, 0, 0), True),) + tuple(
        classes.ClassEntry(i + 1, i, n, c, False)
        for i, (n, c) in enumerate(zip(NAMES_59, classes.generated_colors(59, seed=59)))))

ID_TO_TRAIN_ID = classes.id_to_train_id_lut(CLASS_TABLE)


def resolve_root(manual_dir: str) -> str:
  """The VOC2010 folder: `manual_dir` itself or `manual_dir/VOCdevkit/VOC2010`."""
  nested = os.path.join(manual_dir, "VOCdevkit", "VOC2010")
  return nested if os.path.isdir(nested) else manual_dir


def check_manual_dir(manual_dir: str) -> None:
  """Raises FileNotFoundError naming the expected files when one is missing."""
  tfds_builder.check_files(
      resolve_root(manual_dir), MANUAL_FILES, "PASCAL-Context",
      "See the module docstring of pixcon_jax/data/pascal_context.py and docs/DATA.md.")


class PascalContext(tfds.core.GeneratorBasedBuilder):
  """PASCAL-Context 59-class semantic segmentation (raw ids 0-59 stored; see module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds_builder.features(),
        homepage="https://cs.stanford.edu/~roozbeh/pascal-context/")

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    check_manual_dir(manual_dir)
    root = resolve_root(manual_dir)
    lists = os.path.join(root, "ImageSets", "SegmentationContext")
    return {
        "train": self._generate_examples(root, os.path.join(lists, "train.txt")),
        "validation": self._generate_examples(root, os.path.join(lists, "val.txt")),
    }

  def _generate_examples(self, root: str, list_file: str):
    for stem in tfds_builder.read_list(list_file):
      image_path = os.path.join(root, "JPEGImages", stem + ".jpg")
      label_path = os.path.join(root, "SegmentationClassContext", stem + ".png")
      for p in (image_path, label_path):
        if not os.path.isfile(p):
          raise FileNotFoundError(f"PASCAL-Context example {stem!r}: missing file {p}")
      hw = tfds_builder.image_size(image_path, stem)
      try:
        label = np.asarray(Image.open(label_path))
      except Exception as e:
        raise ValueError(f"corrupt label for example {stem!r}: {label_path}: {e}") from e
      tfds_builder.check_same_size(hw, label.shape, stem)
      yield stem, {"image_id": stem, "image": image_path,
                   "label": tfds_builder.png_bytes(label.astype(np.uint8))}
