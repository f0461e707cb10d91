"""Shared pieces of the project's own TFDS builders (PASCAL-Context, COCO-Stuff-10k).

Every builder stores the same features: `image_id` (text: the file stem), `image` (the original
encoded JPEG bytes, not re-encoded) and `label` (PNG of the dataset's *raw* ids, [H, W, 1] uint8).
The id -> train-id mapping happens when reading (`tfds_source.py`), so a prepared dataset never
has to be rebuilt when a class table changes.
"""
from __future__ import annotations

import io
import os
from typing import Iterable

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds


def features() -> tfds.features.FeaturesDict:
  """The feature spec shared by the project's builders."""
  return tfds.features.FeaturesDict({
      "image_id": tfds.features.Text(),
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
      "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
  })


def png_bytes(label: np.ndarray) -> bytes:
  """[H, W] uint8 -> PNG bytes (PIL, no TensorFlow)."""
  buf = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8), mode="L").save(buf, format="PNG")
  return buf.getvalue()


def image_size(path: str, example: str) -> tuple[int, int]:
  """(H, W) of an image file, read from its header; errors name the example."""
  try:
    with Image.open(path) as im:
      im.verify()
    with Image.open(path) as im:
      return im.size[1], im.size[0]
  except Exception as e:  # PIL raises many types for corrupt files.
    raise ValueError(f"corrupt or unreadable image for example {example!r}: {path}: {e}") from e


def check_same_size(image_hw: tuple[int, int], label_hw: tuple[int, ...], example: str) -> None:
  """Raises ValueError naming the example when image and label sizes differ."""
  if tuple(image_hw) != tuple(label_hw[:2]):
    raise ValueError(
        f"example {example!r}: image size {tuple(image_hw)} != label size {tuple(label_hw[:2])}")


def check_files(manual_dir: str, expected: Iterable[str], dataset: str, hint: str) -> None:
  """Raises FileNotFoundError listing the expected files/folders missing from `manual_dir`."""
  expected = list(expected)
  missing = [p for p in expected if not os.path.exists(os.path.join(manual_dir, p))]
  if missing:
    raise FileNotFoundError(
        f"{dataset}: missing {missing} in manual directory {manual_dir!r}; expected {expected}. "
        f"{hint}")


def read_list(path: str) -> list[str]:
  """Non-empty stripped lines of an image-list file (stems, optionally with extensions)."""
  with open(path) as f:
    return [os.path.splitext(os.path.basename(l.strip()))[0] for l in f if l.strip()]
