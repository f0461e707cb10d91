"""`prepare_dataset`: build a dataset's TFDS ArrayRecord files from its manual downloads."""
from __future__ import annotations

import json
import logging
import os
import shutil

from pixcon_jax.data.datasets import get_dataset_info


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


ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
STAMP_FILE = "pixcon_sources.json"  # In the download dir, beside TFDS's `extracted/`.


def source_stamp(manual_dir: str) -> dict[str, list[int]]:
  """{archive name: [size, mtime_ns]} of the archives directly in `manual_dir`."""
  out = {}
  for name in sorted(os.listdir(manual_dir)):
    path = os.path.join(manual_dir, name)
    if name.endswith(ARCHIVE_SUFFIXES) and os.path.isfile(path):
      st = os.stat(path)
      out[name] = [st.st_size, st.st_mtime_ns]
  return out


def refresh_stale_extraction(manual_dir: str, download_dir: str) -> bool:
  """Deletes `download_dir/extracted` when the archives changed since it was extracted.

  TFDS reuses an existing extraction folder whatever the archive now holds, so a zip
  replaced after a failed run (a missing file) would fail the same way forever. The
  archives' sizes and mtimes are stamped in `download_dir/pixcon_sources.json`; an
  extraction without a stamp is of unknown origin and is redone too.

  Returns:
    True if a stale extraction was removed.
  """
  extracted = os.path.join(download_dir, "extracted")
  stamp_path = os.path.join(download_dir, STAMP_FILE)
  now = source_stamp(manual_dir)
  try:
    with open(stamp_path) as f:
      before = json.load(f)
  except (OSError, ValueError):
    before = None
  removed = False
  if os.path.isdir(extracted) and before != now:
    changed = sorted(k for k in set(now) | set(before or {})
                     if (before or {}).get(k) != now.get(k))
    logging.warning("%s was extracted from other archives than those now in %s (changed: %s); "
                    "deleting it to extract again", extracted, manual_dir,
                    changed if before is not None else "no stamp")
    try:
      shutil.rmtree(extracted)
    except OSError as e:
      raise OSError(f"could not delete the stale extraction {extracted} ({e}); delete that "
                    f"folder and rerun") from e
    removed = True
  os.makedirs(download_dir, exist_ok=True)
  with open(stamp_path, "w") as f:
    json.dump(now, f, indent=1)
  return removed


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
  download_dir = os.path.join(data_dir, "downloads")
  refresh_stale_extraction(manual_dir, download_dir)
  builder.download_and_prepare(
      download_dir=download_dir,
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return {name: split.num_examples for name, split in builder.info.splits.items()}
