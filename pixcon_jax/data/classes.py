"""Class tables: the single source of truth for ids, train ids, names and colours.

A dataset's raw label files store *ids* (Cityscapes label ids 0-33, COCO-Stuff ids 0-182,
PASCAL-Context 0-59). Training uses contiguous *train ids* 0..C-1 and 255 = ignore. Every
mapping, palette and class-name list in the project is derived from a table of `ClassEntry`.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

IGNORE_LABEL = 255


@dataclasses.dataclass(frozen=True)
class ClassEntry:
  """One raw label id of a dataset.

  Attributes:
    id: the value stored in the raw label files.
    train_id: contiguous training id, or IGNORE_LABEL.
    name: class name (unique among entries with a train id).
    color: RGB colour used for visualisation (the official one where there is one).
    ignore_in_eval: True when the class is excluded from training and evaluation.
  """
  id: int
  train_id: int
  name: str
  color: tuple[int, int, int]
  ignore_in_eval: bool


def num_classes(table: Sequence[ClassEntry]) -> int:
  """Number of train ids C of a table."""
  return len({e.train_id for e in table if e.train_id != IGNORE_LABEL})


def class_names(table: Sequence[ClassEntry]) -> tuple[str, ...]:
  """Names of the train ids 0..C-1, in train-id order."""
  names = {e.train_id: e.name for e in table if e.train_id != IGNORE_LABEL}
  return tuple(names[i] for i in range(len(names)))


def palette(table: Sequence[ClassEntry]) -> np.ndarray:
  """Colours of the train ids: [C, 3] uint8."""
  cols = {e.train_id: e.color for e in table if e.train_id != IGNORE_LABEL}
  return np.asarray([cols[i] for i in range(len(cols))], dtype=np.uint8)


def id_to_train_id_lut(table: Sequence[ClassEntry], unknown: int = IGNORE_LABEL) -> np.ndarray:
  """Lookup table over all 256 uint8 ids: lut[id] = train id; ids not in the table -> `unknown`.

  Returns: [256] uint8.
  """
  lut = np.full((256,), unknown, dtype=np.uint8)
  for e in table:
    lut[e.id] = e.train_id
  return lut


def train_id_to_id_lut(table: Sequence[ClassEntry]) -> np.ndarray:
  """The raw label id of every train id: [C] int64, lut[train_id] = id.

  Raises:
    ValueError when several ids share a train id (the raw id would be ambiguous).
  """
  ids: dict[int, int] = {}
  for e in table:
    if e.train_id == IGNORE_LABEL:
      continue
    if e.train_id in ids:
      raise ValueError(f"train id {e.train_id} comes from ids {ids[e.train_id]} and {e.id}; "
                       "cannot map predictions back to label ids")
    ids[e.train_id] = e.id
  return np.asarray([ids[i] for i in range(len(ids))], np.int64)


def known_ids_mask(table: Sequence[ClassEntry]) -> np.ndarray:
  """[256] bool, True for ids listed in the table (used to count unknown label ids)."""
  mask = np.zeros((256,), dtype=bool)
  for e in table:
    mask[e.id] = True
  return mask


def generated_colors(n: int, seed: int = 0) -> list[tuple[int, int, int]]:
  """Deterministic distinct-ish colours for datasets without an official palette."""
  rng = np.random.default_rng(seed)
  cols = rng.integers(0, 256, size=(n, 3))
  return [tuple(int(v) for v in c) for c in cols]
