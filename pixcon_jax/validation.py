"""User-input errors: the config checked before any compiling, and paths checked before use.

`InputError` (`ConfigError`, `MissingInputError`) marks a mistake in what the user asked for
(a config key, a file, a folder). `main.py` prints its message as one line and exits with
`EXIT_BAD_INPUT`, without a traceback; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import ml_collections

EXIT_BAD_INPUT = 2  # As for a usage error: the run did not start.
MODES = ("train", "eval", "predict")
INIT_FROM_SCOPES = ("backbone", "full", "partial")


class InputError(Exception):
  """A bad config value, file or folder; the message names it and says what was expected."""


class ConfigError(InputError, ValueError):
  """A config value (or a file's content) that cannot be used."""


class MissingInputError(InputError, FileNotFoundError):
  """A file or folder the user named does not exist or holds nothing usable."""


def _positive_int(config: ml_collections.ConfigDict, key: str) -> None:
  node: Any = config
  for part in key.split("."):
    node = node.get(part) if hasattr(node, "get") else None
  if isinstance(node, bool) or not isinstance(node, int) or node <= 0:
    raise ConfigError(f"config.{key}={node!r}: expected a positive integer")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the keys every mode relies on; cheap, so it runs before JAX starts.

  Raises:
    ConfigError naming the first bad key and the values it accepts.
  """
  mode = config.get("mode", "train")
  if mode not in MODES:
    raise ConfigError(f"config.mode must be train, eval or predict, got {mode!r}")
  for key in ("schedule.total_steps", "eval.every_steps", "checkpoint.every_steps",
              "checkpoint.max_to_keep", "log.every_steps", "data.batch_size",
              "data.eval_batch_size"):
    _positive_int(config, key)
  warmup = config.contrast.get("warmup_steps", 0)
  if not isinstance(warmup, int) or warmup < 0:
    raise ConfigError(f"config.contrast.warmup_steps={warmup!r}: expected an integer >= 0")
  c = config.contrast
  if (c.get("enabled", False) and c.get("recipe", "paper") == "paper"
      and c.get("global_batch", True) and c.get("top_k", "bisect") != "bisect"):
    # The global-batch loss selects over candidates spread on all devices: only the bisection
    # counts can be summed over them.
    raise ConfigError(f"config.contrast.top_k={c.top_k!r} selects within one device; with "
                      "config.contrast.global_batch=True use top_k='bisect' (the default)")
  scope = config.get("init_from_scope", "backbone")
  if scope not in INIT_FROM_SCOPES:
    raise ConfigError(f"config.init_from_scope={scope!r}: expected one of "
                     f"{', '.join(INIT_FROM_SCOPES)}")
  fraction = config.get("init_from_max_mismatch", 0.0)
  if not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
    raise ConfigError(f"config.init_from_max_mismatch={fraction!r}: expected a fraction in [0, 1]")
  init_from = config.get("init_from")
  if init_from and "://" not in init_from and not os.path.exists(os.path.expanduser(init_from)):
    # Checked here, not after the model is built and orbax's threads run; it also fails a
    # resume whose init_from went away (the resume would ignore it).
    raise MissingInputError(
        f"config.init_from={init_from!r}: no such file or directory, so no orbax checkpoint to "
        f"load; give the --out folder of scripts/convert_checkpoint.py")
  if mode == "predict":
    check_output_dir(config.predict.get("output_dir") or "", "config.predict.output_dir")


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
