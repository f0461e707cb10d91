"""Random-access source over a prepared TFDS dataset (ArrayRecord), read with `tfds.data_source`.

Records are decoded here (PIL), not by TFDS, so that a corrupt file names its example, image and
label sizes are checked, and raw label ids go through the dataset's class table:
`{"image": [H, W, 3] uint8, "label": [H, W] uint8 train ids (255 = ignore), "image_id": int32}`.
"""
from __future__ import annotations

import io
from typing import Any

from absl import logging
import numpy as np
from PIL import Image

from pixcon_jax import validation
from pixcon_jax.data import classes


UNKNOWN_LABEL_MODES = ("ignore", "error")  # config.data.unknown_label


class UnknownLabelError(ValueError):
  """A label map holds ids that are not in the dataset's class table."""


class TfdsSource:
  """grain RandomAccessDataSource over `tfds.data_source(name, split=...)`.

  The TFDS handle is opened lazily and dropped when pickled, so the source can be shipped to grain
  worker processes.
  """

  def __init__(self, *, dataset: str, tfds_name: str, split: str, data_dir: str | None,
               image_key: str, label_key: str, class_table, unknown_label: str = "ignore"):
    if unknown_label not in UNKNOWN_LABEL_MODES:
      raise ValueError(f"data.unknown_label must be one of {UNKNOWN_LABEL_MODES}, got "
                       f"{unknown_label!r}")
    self._dataset, self._tfds_name, self._split = dataset, tfds_name, split
    self._data_dir, self._image_key, self._label_key = data_dir, image_key, label_key
    self._lut = classes.id_to_train_id_lut(class_table)
    self._known = classes.known_ids_mask(class_table)
    self._unknown_label = unknown_label
    self._ds = None
    self.num_unknown_pixels = 0  # Per process: a running count for the warning.

  def _open(self):
    if self._ds is None:
      import tensorflow_datasets as tfds  # Heavy import, only where a TFDS dataset is read.
      # The project's own builders register themselves on import.
      from pixcon_jax.data import coco_stuff, pascal_context  # pylint: disable=g-import-not-at-top,unused-import
      try:
        self._ds = tfds.data_source(
            self._tfds_name, split=self._split, data_dir=self._data_dir, download=False,
            decoders={self._image_key: tfds.decode.SkipDecoding(),
                      self._label_key: tfds.decode.SkipDecoding()})
      except Exception as e:
        # An InputError: main ends it in one line (exit 2) naming the folder and what to run.
        # Only our instruction: TFDS's own hints (download_and_prepare, "already prepared in
        # TFRECORD format") point at commands this project does not use.
        logging.debug("tfds.data_source(%r, data_dir=%r): %s", self._tfds_name, self._data_dir, e)
        raise validation.MissingInputError(
            f"{self._dataset}: no prepared TFDS dataset {self._tfds_name!r} (split "
            f"{self._split!r}) in data_dir {self._data_dir!r}. Prepare it with `python "
            f"scripts/prepare_data.py --dataset {self._dataset} --manual_dir DIR --data_dir DIR`."
        ) from e
    return self._ds

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state["_ds"] = None
    return state

  def __len__(self) -> int:
    return len(self._open())

  def _decode(self, data: bytes, what: str, name: str, index: int) -> np.ndarray:
    try:
      with Image.open(io.BytesIO(data)) as im:
        if what == "image":
          return np.asarray(im.convert("RGB"))
        return np.asarray(im)
    except Exception as e:
      raise ValueError(f"{self._dataset}/{self._split}: corrupt {what} for example {name!r} "
                       f"(index {index}): {e}") from e

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    rec = self._open()[index]
    name = rec.get("image_id", index)
    name = name.decode() if isinstance(name, bytes) else str(name)
    image = self._decode(rec[self._image_key], "image", name, index)
    raw = self._decode(rec[self._label_key], "label", name, index)
    if raw.ndim == 3:
      raw = raw[..., 0]
    if image.shape[:2] != raw.shape:
      raise ValueError(f"{self._dataset}/{self._split}: example {name!r} (index {index}): image "
                       f"size {image.shape[:2]} != label size {raw.shape}")
    raw = raw.astype(np.uint8)
    unknown = int(np.count_nonzero(~self._known[raw]))
    if unknown:
      bad = sorted(set(np.unique(raw[~self._known[raw]]).tolist()))
      if self._unknown_label == "error":
        raise UnknownLabelError(f"{self._dataset}/{self._split}: example {name!r} (index "
                                f"{index}) has label ids {bad} outside the class table")
      self.num_unknown_pixels += unknown
      logging.warning("%s/%s: example %r has %d pixels with unknown label ids %s -> ignore "
                      "(%d such pixels so far in this process)", self._dataset, self._split,
                      name, unknown, bad, self.num_unknown_pixels)
    return {"image": image, "label": self._lut[raw], "image_id": np.int32(index)}

  def __repr__(self) -> str:
    return f"TfdsSource({self._tfds_name!r}, split={self._split!r}, data_dir={self._data_dir!r})"
