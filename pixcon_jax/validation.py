"""User-input errors, and the folder check shared by the config schema and main.

`InputError` (`ConfigError`, `MissingInputError`) marks a mistake in what the user asked for
(a config key, a file, a folder). `main.py` prints its message as one line and exits with
`EXIT_BAD_INPUT`, without a traceback; anything else is a bug and keeps its traceback. The
config's values are checked by `pixcon_jax.config_schema` before anything runs.
"""
from __future__ import annotations

import os
import tempfile

EXIT_BAD_INPUT = 2  # As for a usage error: the run did not start.
MODES = ("train", "eval", "predict")
INIT_FROM_SCOPES = ("backbone", "full", "partial")


class InputError(Exception):
  """A bad config value, file or folder; the message names it and says what was expected."""


class ConfigError(InputError, ValueError):
  """A config value (or a file's content) that cannot be used."""


class MissingInputError(InputError, FileNotFoundError):
  """A file or folder the user named does not exist or holds nothing usable."""


def check_output_dir(path: str, key: str) -> None:
  """Fails if `path` (a folder to create or reuse; empty is allowed) cannot be written.

  Creates nothing that stays: the nearest existing folder (`path` itself or a parent) is
  probed by creating and removing a temporary folder in it, since permission bits alone do
  not tell (root passes `os.access` on /proc, where nothing can be created).

  Args:
    path: the folder; it may not exist yet.
    key: how the user gave it (`--workdir`, `config.predict.output_dir`), for the message.
  Raises:
    ConfigError when `path` or one of its parents is an existing non-directory, or when no
    folder can be created in the nearest existing one.
  """
  if not path or "://" in path:  # Remote folders (gs://) are checked by their file system.
    return
  current = os.path.abspath(os.path.expanduser(path))
  while not os.path.exists(current):
    parent = os.path.dirname(current)
    if parent == current:
      return
    current = parent
  if not os.path.isdir(current):
    where = "is a file" if current == os.path.abspath(path) else f"is under the file {current!r}"
    raise ConfigError(f"{key}={path!r} {where}: expected a directory (give a new or existing "
                     f"folder)")
  try:
    os.rmdir(tempfile.mkdtemp(prefix=".pixcon_probe_", dir=current))
  except OSError as e:
    raise ConfigError(f"{key}={path!r}: cannot create a folder in {current!r} "
                      f"({e.strerror or e}): give a writable folder") from None
