"""`prepare_dataset`: build a dataset's TFDS ArrayRecord files from its manual downloads."""
from __future__ import annotations

import os

from pixcon_jax.data.info import get_dataset_info


def _check_manual_dir(dataset: str, manual_dir: str) -> None:
  if not os.path.isdir(manual_dir):
    raise FileNotFoundError(f"{dataset}: manual directory {manual_dir!r} does not exist; see "
                            "docs/DATA.md for the expected files")
  if dataset == "cityscapes":
    from pixcon_jax.data import cityscapes  # pylint: disable=g-import-not-at-top
    cityscapes.check_manual_dir(manual_dir)
  elif dataset == "pascal_context":
    from pixcon_jax.data import pascal_context  # pylint: disable=g-import-not-at-top
    pascal_context.check_manual_dir(manual_dir)
  elif dataset == "coco_stuff":
    from pixcon_jax.data import coco_stuff  # pylint: disable=g-import-not-at-top
    coco_stuff.check_manual_dir(manual_dir)


def prepare_dataset(dataset: str, *, manual_dir: str, data_dir: str) -> dict[str, int]:
  """Prepares `dataset` in ArrayRecord format under `data_dir` from the files in `manual_dir`.

  Args:
    dataset: cityscapes | pascal_context | coco_stuff (synthetic needs no preparation).
    manual_dir: folder with the manual downloads (see docs/DATA.md).
    data_dir: TFDS data_dir to write to (and later read from with `data.data_dir`).

  Returns:
    Number of examples per split.
  """
  info = get_dataset_info(dataset)
  if info.tfds_name is None:
    raise ValueError(f"{dataset} is generated on the fly and needs no preparation")
  _check_manual_dir(dataset, manual_dir)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from pixcon_jax.data import coco_stuff, pascal_context  # pylint: disable=g-import-not-at-top,unused-import
  builder = tfds.builder(info.tfds_name, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return {name: split.num_examples for name, split in builder.info.splits.items()}
