"""Paths a user types on the command line: a leading `~` is expanded here, not by the shell.

The shell expands `~` only at the start of a word, so `--config.data.data_dir=~/tfds` and
`--workdir=~/runs/1` reach the program with the `~` still in them.
"""
from __future__ import annotations

import os

import ml_collections

# Config keys that hold such a path.
CONFIG_PATH_KEYS = ("data.data_dir", "init_from", "predict.input_dir", "predict.output_dir")


def expand_config_paths(config: ml_collections.ConfigDict) -> None:
  """Expands a leading `~` in the string values of `CONFIG_PATH_KEYS` of `config`, in place.

  Keys that are absent, None or '' are left as they are.
  """
  for key in CONFIG_PATH_KEYS:
    *groups, name = key.split(".")
    holder = config
    for group in groups:
      holder = holder.get(group) if holder is not None else None
    if holder is not None and isinstance(holder.get(name), str):
      holder[name] = os.path.expanduser(holder[name])
