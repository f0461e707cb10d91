"""`make_source(data_cfg, split)`: the random-access source of a configured dataset split."""
from __future__ import annotations

import io
import os
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from pixcon_jax import paths
from pixcon_jax.data import synthetic
from pixcon_jax.data import tfds_source
from pixcon_jax.data.info import get_dataset_info


def _get(cfg: Mapping[str, Any], key: str, default: Any) -> Any:
  v = cfg.get(key, default) if cfg is not None else default
  return default if v is None else v


def make_source(data_cfg: Mapping[str, Any], split: str):
  """Source of records `{"image" uint8 [H,W,3], "label" uint8 [H,W], "image_id" int32}`.

  Args:
    data_cfg: `config.data` (see `defaults.default_data_config`).
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
