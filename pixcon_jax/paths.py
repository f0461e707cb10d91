"""User-given paths: a local path or an object-store URL (`gs://bucket/dir`), one type for both.

Every path a user gives (`--workdir`, `config.init_from`, `config.data.data_dir`,
`config.predict.input_dir` / `output_dir`) goes through `resolve`. `os.path` would break a URL
(`os.path.abspath('gs://b/run')` is `<cwd>/gs:/b/run`), so URLs are kept as they are and read
and written through `etils.epath` (tf.io.gfile when TensorFlow is installed, else fsspec);
local paths get `~` expanded and are made absolute, so that a process started from another
directory (a restart, an evaluation job) finds the same files.

The shell expands `~` only at the start of a word, so `--config.data.data_dir=~/tfds` and
`--workdir=~/runs/1` reach the program with the `~` still in them: `resolve` expands it for
every path it is given, and `expand_config_paths` does so in the config's path keys once, at
the entry point, so that the config that is logged and saved holds the real paths.
"""
from __future__ import annotations

import os
import re

from etils import epath
import ml_collections

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

# Config keys that hold a user path (besides --workdir, which is a flag).
CONFIG_PATH_KEYS = ("data.data_dir", "init_from", "predict.input_dir", "predict.output_dir")


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


def expand_config_paths(config: ml_collections.ConfigDict) -> None:
  """Expands a leading `~` in the string values of `CONFIG_PATH_KEYS` of `config`, in place.

  Keys that are absent, None or '' are left as they are; nothing is made absolute (a relative
  path stays relative to the working directory, as the user wrote it).
  """
  for key in CONFIG_PATH_KEYS:
    *groups, name = key.split(".")
    holder = config
    for group in groups:
      holder = holder.get(group) if holder is not None else None
    if holder is not None and isinstance(holder.get(name), str):
      holder[name] = os.path.expanduser(holder[name])
