"""Cityscapes: class table, official class weights and the TFDS `cityscapes/semantic_segmentation` source.

Manual download (https://www.cityscapes-dataset.com, registration required), both zips in one
directory `--manual_dir`:

  leftImg8bit_trainvaltest.zip   leftImg8bit/{train,val,test}/CITY/CITY_SEQ_FRAME_leftImg8bit.png
  gtFine_trainvaltest.zip        gtFine/{train,val,test}/CITY/CITY_SEQ_FRAME_gtFine_labelIds.png

TFDS's built-in builder reads exactly these two zips (it extracts them into `<data_dir>/downloads`)
and stores features `image_id` (text), `image_left` (PNG, [1024, 2048, 3]) and `segmentation_label`
(PNG of label ids 0-33, [1024, 2048, 1]). We prepare it in ArrayRecord format so that
`tfds.data_source` can read it with random access.
"""
from __future__ import annotations

import os

import numpy as np

from pixcon_jax.data import classes

TFDS_NAME = "cityscapes/semantic_segmentation"
IMAGE_KEY = "image_left"
LABEL_KEY = "segmentation_label"
MANUAL_FILES = ("leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip")
NUM_TRAIN_IMAGES = 2975
NUM_VAL_IMAGES = 500

_E = classes.ClassEntry
_I = classes.IGNORE_LABEL
# cityscapesScripts/helpers/labels.py (the license plate, id -1, never occurs in the label maps).
CLASS_TABLE: tuple[classes.ClassEntry, ...] = (
    _E(0, _I, "unlabeled", (0, 0, 0), True),
    _E(1, _I, "ego vehicle", (0, 0, 0), True),
    _E(2, _I, "rectification border", (0, 0, 0), True),
    _E(3, _I, "out of roi", (0, 0, 0), True),
    _E(4, _I, "static", (0, 0, 0), True),
    _E(5, _I, "dynamic", (111, 74, 0), True),
    _E(6, _I, "ground", (81, 0, 81), True),
    _E(7, 0, "road", (128, 64, 128), False),
    _E(8, 1, "sidewalk", (244, 35, 232), False),
    _E(9, _I, "parking", (250, 170, 160), True),
    _E(10, _I, "rail track", (230, 150, 140), True),
    _E(11, 2, "building", (70, 70, 70), False),
    _E(12, 3, "wall", (102, 102, 156), False),
    _E(13, 4, "fence", (190, 153, 153), False),
    _E(14, _I, "guard rail", (180, 165, 180), True),
    _E(15, _I, "bridge", (150, 100, 100), True),
    _E(16, _I, "tunnel", (150, 120, 90), True),
    _E(17, 5, "pole", (153, 153, 153), False),
    _E(18, _I, "polegroup", (153, 153, 153), True),
    _E(19, 6, "traffic light", (250, 170, 30), False),
    _E(20, 7, "traffic sign", (220, 220, 0), False),
    _E(21, 8, "vegetation", (107, 142, 35), False),
    _E(22, 9, "terrain", (152, 251, 152), False),
    _E(23, 10, "sky", (70, 130, 180), False),
    _E(24, 11, "person", (220, 20, 60), False),
    _E(25, 12, "rider", (255, 0, 0), False),
    _E(26, 13, "car", (0, 0, 142), False),
    _E(27, 14, "truck", (0, 0, 70), False),
    _E(28, 15, "bus", (0, 60, 100), False),
    _E(29, _I, "caravan", (0, 0, 90), True),
    _E(30, _I, "trailer", (0, 0, 110), True),
    _E(31, 16, "train", (0, 80, 100), False),
    _E(32, 17, "motorcycle", (0, 0, 230), False),
    _E(33, 18, "bicycle", (119, 11, 32), False),
)

# The per-class loss weights of the official HRNet / openseg Cityscapes recipe, train-id order.
# This is their single home; `pixcon_jax.losses` should import it from here.
CLASS_WEIGHTS: tuple[float, ...] = (
    0.8373, 0.918, 0.866, 1.0345, 1.0166, 0.9969, 0.9754, 1.0489, 0.8786, 1.0023,
    0.9539, 0.9843, 1.1116, 0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.0507)

ID_TO_TRAIN_ID = classes.id_to_train_id_lut(CLASS_TABLE)


def check_manual_dir(manual_dir: str) -> None:
  """Raises FileNotFoundError naming the expected zips when one is missing from `manual_dir`."""
  missing = [f for f in MANUAL_FILES if not os.path.isfile(os.path.join(manual_dir, f))]
  if missing:
    raise FileNotFoundError(
        f"Cityscapes: missing {missing} in manual directory {manual_dir!r}; expected the official "
        f"zips {list(MANUAL_FILES)} from https://www.cityscapes-dataset.com/downloads/")


def map_label(label_ids: np.ndarray) -> np.ndarray:
  """Label ids 0-33 -> train ids 0-18 / 255. [H, W] uint8 -> [H, W] uint8."""
  return ID_TO_TRAIN_ID[label_ids]
