"""User-given paths: a local path or an object-store URL (`gs://bucket/dir`), one type for both.

Every path a user gives (`--workdir`, `config.init_from`, `config.data.data_dir`,
`config.predict.input_dir` / `output_dir`) goes through `resolve`. `os.path` would break a URL
(`os.path.abspath('gs://b/run')` is `<cwd>/gs:/b/run`), so URLs are kept as they are and read
and written through `etils.epath` (tf.io.gfile when TensorFlow is installed, else fsspec);
local paths get `~` expanded and are made absolute, so that a process started from another
directory (a restart, an evaluation job) finds the same files.
"""
from __future__ import annotations

import os
import re

from etils import epath

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: str | os.PathLike) -> bool:
  """True for `scheme://...` (gs://, s3://, ...), False for a local path."""
  return bool(_URL.match(os.fspath(path)))


def resolve(path: str | os.PathLike) -> epath.Path:
  """The path as an `epath.Path`: a URL unchanged, a local path `~`-expanded and absolute."""
  if is_url(path):
    return epath.Path(path)
  return epath.Path(path).expanduser().absolute()


def resolve_str(path: str | os.PathLike | None) -> str | None:
  """`resolve` as a string (for libraries that take `str`), None stays None."""
  return None if path is None else os.fspath(resolve(path))
