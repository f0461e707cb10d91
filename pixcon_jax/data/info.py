"""Dataset registry: `DatasetInfo` (classes, palette, weights, sizes) for each supported dataset."""
from __future__ import annotations

import dataclasses

import numpy as np

from pixcon_jax.data import classes
from pixcon_jax.data import cityscapes
from pixcon_jax.data import synthetic

DATASETS = ("cityscapes", "pascal_context", "coco_stuff", "synthetic")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model, loss and evaluation need to know about a dataset.

  Attributes:
    name: registry name.
    num_classes: C.
    class_names: C names in train-id order.
    palette: [C, 3] uint8 colours.
    class_weights: C loss weights of the official recipe, or None.
    ignore_label: 255.
    num_train_images / num_val_images: split sizes (synthetic: the defaults).
    class_table: the full id table (raw ids -> train ids).
    tfds_name: TFDS builder name (None for synthetic).
    image_key / label_key: TFDS feature names.
    train_split / val_split: TFDS split names.
    crop_size: default training crop (h, w).
    eval_pad_size: default common eval size (h, w) that every image fits in.
  """
  name: str
  num_classes: int
  class_names: tuple[str, ...]
  palette: np.ndarray
  class_weights: tuple[float, ...] | None
  ignore_label: int
  num_train_images: int
  num_val_images: int
  class_table: tuple[classes.ClassEntry, ...]
  tfds_name: str | None
  image_key: str
  label_key: str
  train_split: str
  val_split: str
  crop_size: tuple[int, int]
  eval_pad_size: tuple[int, int]


def _make(name, table, **kw) -> DatasetInfo:
  return DatasetInfo(name=name, num_classes=classes.num_classes(table),
                     class_names=classes.class_names(table), palette=classes.palette(table),
                     ignore_label=classes.IGNORE_LABEL, class_table=tuple(table), **kw)


def get_dataset_info(name: str) -> DatasetInfo:
  """The `DatasetInfo` of a registered dataset; ValueError naming the known ones otherwise."""
  if name == "cityscapes":
    return _make(name, cityscapes.CLASS_TABLE, class_weights=cityscapes.CLASS_WEIGHTS,
                 num_train_images=cityscapes.NUM_TRAIN_IMAGES,
                 num_val_images=cityscapes.NUM_VAL_IMAGES, tfds_name=cityscapes.TFDS_NAME,
                 image_key=cityscapes.IMAGE_KEY, label_key=cityscapes.LABEL_KEY,
                 train_split="train", val_split="validation", crop_size=(512, 1024),
                 eval_pad_size=(1024, 2048))
  if name == "pascal_context":
    from pixcon_jax.data import pascal_context  # pylint: disable=g-import-not-at-top
    return _make(name, pascal_context.CLASS_TABLE, class_weights=None,
                 num_train_images=pascal_context.NUM_TRAIN_IMAGES,
                 num_val_images=pascal_context.NUM_VAL_IMAGES,
                 tfds_name=pascal_context.TFDS_NAME, image_key="image", label_key="label",
                 train_split="train", val_split="validation", crop_size=(520, 520),
                 eval_pad_size=(512, 512))  # VOC images are at most 500x500.
  if name == "coco_stuff":
    from pixcon_jax.data import coco_stuff  # pylint: disable=g-import-not-at-top
    return _make(name, coco_stuff.CLASS_TABLE, class_weights=None,
                 num_train_images=coco_stuff.NUM_TRAIN_IMAGES,
                 num_val_images=coco_stuff.NUM_VAL_IMAGES, tfds_name=coco_stuff.TFDS_NAME,
                 image_key="image", label_key="label", train_split="train",
                 val_split="validation", crop_size=(520, 520),
                 eval_pad_size=(640, 640))  # COCO images are at most 640x640.
  if name == "synthetic":
    return _make(name, synthetic.CLASS_TABLE, class_weights=None,
                 num_train_images=synthetic.DEFAULT_NUM_TRAIN,
                 num_val_images=synthetic.DEFAULT_NUM_VAL, tfds_name=None, image_key="image",
                 label_key="label", train_split="train", val_split="validation",
                 crop_size=(128, 256), eval_pad_size=synthetic.DEFAULT_SIZE)
  raise ValueError(f"unknown dataset {name!r}; known: {DATASETS}")
