"""The dataset registry: what each dataset is and where its records come from.

`get_dataset_info(name) -> DatasetInfo` (classes, palette, loss weights, split names and sizes,
default crop and eval sizes) and `make_source(data_cfg, split)`, the random-access source of a
configured split: procedural scenes for `synthetic`, a prepared TFDS dataset (`tfds_source`)
for the others; `InMemorySource` serves fixed arrays (benchmarks).
"""
from __future__ import annotations

import dataclasses
import io
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from pixcon_jax import paths
from pixcon_jax.data import classes
from pixcon_jax.data import cityscapes
from pixcon_jax.data import synthetic
from pixcon_jax.data import tfds_source

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


def _get(cfg: Mapping[str, Any], key: str, default: Any) -> Any:
  v = cfg.get(key, default) if cfg is not None else default
  return default if v is None else v


def make_source(data_cfg: Mapping[str, Any], split: str):
  """Source of records `{"image" uint8 [H,W,3], "label" uint8 [H,W], "image_id" int32}`.

  Args:
    data_cfg: `config.data` (see `config_defaults.default_data_config`).
    split: a split name ('train', 'validation', ...) as stored in TFDS.
  """
  name = data_cfg["dataset"]
  info = get_dataset_info(name)
  if name == "synthetic":
    n = (_get(data_cfg, "synthetic_num_train", synthetic.DEFAULT_NUM_TRAIN) if split == "train"
         else _get(data_cfg, "synthetic_num_val", synthetic.DEFAULT_NUM_VAL))
    return synthetic.SyntheticSource(
        n, seed=_get(data_cfg, "synthetic_seed", 0),
        size=tuple(_get(data_cfg, "synthetic_size", synthetic.DEFAULT_SIZE)), split=split)
  # '' is "unset" as None is (a command line cannot write None into a string key); `~` is
  # expanded here too for callers other than main (scripts/data_stats.py --data_dir=~/tfds), and
  # a gs:// URL is kept as it is.
  data_dir = paths.resolve_str(_get(data_cfg, "data_dir", None) or None)
  return tfds_source.TfdsSource(
      dataset=name, tfds_name=_get(data_cfg, "tfds_name", None) or info.tfds_name, split=split,
      data_dir=data_dir, image_key=info.image_key,
      label_key=info.label_key, class_table=info.class_table,
      unknown_label=_get(data_cfg, "unknown_label", "ignore"))


class InMemorySource:
  """A fixed set of (image, label) pairs repeated to `length` records (benchmarks and tests).

  With `encode_png` the images are held as PNG bytes and decoded on every access, like a prepared
  Cityscapes record. Records: `image` uint8 [H, W, 3], `label` uint8 [H, W], `image_id` int32.
  """

  def __init__(self, examples: Sequence[tuple[np.ndarray, np.ndarray]], length: int, *,
               encode_png: bool = False):
    self._length, self._encode_png = int(length), encode_png
    self._examples = []
    for image, label in examples:
      if encode_png:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        image = buf.getvalue()
      self._examples.append((image, label))

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    image, label = self._examples[index % len(self._examples)]
    if self._encode_png:
      image = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    return {"image": image, "label": label, "image_id": np.int32(index)}
