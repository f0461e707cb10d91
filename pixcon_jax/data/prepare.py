"""`prepare_dataset`: build a dataset's TFDS ArrayRecord files from its manual downloads.

Bad downloads are input errors (`validation.InputError`, one `error:` line from
scripts/prepare_data.py): a missing file, a zip without its central directory (truncated),
a member that does not extract (corrupt). A failed preparation removes what it created under
`data_dir` (a half-extracted archive, TFDS's incomplete folders), so a rerun starts clean.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile

from pixcon_jax import validation
from pixcon_jax.data.datasets import get_dataset_info


def _check_manual_dir(dataset: str, manual_dir: str) -> None:
  """Raises MissingInputError naming the folder or the files the dataset needs."""
  if not os.path.isdir(manual_dir):
    raise validation.MissingInputError(
        f"--manual_dir={manual_dir} does not exist ({dataset}); see docs/DATA.md for the "
        f"expected files")
  try:
    _check_dataset_files(dataset, manual_dir)
  except FileNotFoundError as e:  # The dataset modules' own checks name the files.
    raise validation.MissingInputError(str(e)) from None
  for name in sorted(os.listdir(manual_dir)):
    path = os.path.join(manual_dir, name)
    if name.endswith(".zip") and os.path.isfile(path):
      _check_zip(path)


def _check_zip(path: str) -> None:
  """Opens the zip's central directory (at its end: a truncated download has none); cheap."""
  try:
    with zipfile.ZipFile(path):
      pass
  except (zipfile.BadZipFile, OSError) as e:
    raise validation.ConfigError(
        f"--manual_dir={os.path.dirname(path)}: {os.path.basename(path)} is truncated or not a "
        f"zip archive ({e}; {os.path.getsize(path)} bytes): download it again") from None


def _check_dataset_files(dataset: str, manual_dir: str) -> None:
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
  Raises:
    validation.InputError naming the folder or archive when a download is missing, truncated
    or corrupt; what the run created under `data_dir` is removed first.
  """
  info = get_dataset_info(dataset)
  if info.tfds_name is None:
    raise validation.ConfigError(
        f"--dataset={dataset} is generated on the fly and needs no preparation")
  _check_manual_dir(dataset, manual_dir)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from pixcon_jax.data import coco_stuff, pascal_context  # pylint: disable=g-import-not-at-top,unused-import
  before = _existing_paths(data_dir)
  try:
    builder = tfds.builder(info.tfds_name, data_dir=data_dir, file_format="array_record")
    download_dir = os.path.join(data_dir, "downloads")
    refresh_stale_extraction(manual_dir, download_dir)
    builder.download_and_prepare(
        download_dir=download_dir,
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except BaseException as e:
    removed = _remove_new_paths(data_dir, before)
    if isinstance(e, tfds.download.extractor.ExtractError):
      raise validation.ConfigError(
          f"--manual_dir={manual_dir}: an archive does not extract ({_first_line(e)}): download "
          f"it again"
          f"{'; removed the partial ' + ', '.join(removed) if removed else ''}") from None
    raise
  return {name: split.num_examples for name, split in builder.info.splits.items()}


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return lines[0][:400] if lines else type(error).__name__


def _existing_paths(root: str) -> set[str] | None:
  """Every file and folder under `root` (None when `root` does not exist yet)."""
  if not os.path.isdir(root):
    return None
  found = {root}
  for dirpath, dirnames, filenames in os.walk(root):
    found.update(os.path.join(dirpath, n) for n in dirnames + filenames)
  return found


def _remove_new_paths(root: str, before: set[str] | None) -> list[str]:
  """Deletes what appeared under `root` since `_existing_paths(root)` gave `before`.

  Returns:
    the top-most removed paths (all of `root` when it did not exist before).
  """
  if before is None:
    if os.path.isdir(root):
      shutil.rmtree(root, ignore_errors=True)
      return [root]
    return []
  new = sorted((_existing_paths(root) or set()) - before)
  top = [p for p in new if os.path.dirname(p) not in new]
  for p in top:
    if os.path.isdir(p) and not os.path.islink(p):
      shutil.rmtree(p, ignore_errors=True)
    else:
      os.remove(p)
  return top
