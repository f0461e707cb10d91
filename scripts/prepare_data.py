"""Prepares a dataset's TFDS ArrayRecord files from its manual downloads.

  python scripts/prepare_data.py --dataset cityscapes --manual_dir DIR --data_dir DIR

See docs/DATA.md for the files each dataset expects in --manual_dir. Archives that changed
since the last run (size or mtime) are extracted again (pixcon_jax/data/prepare.py). A missing,
truncated or corrupt download ends in one `error:` line (exit 2) and leaves nothing new behind.
"""
import json
import os

from absl import app
from absl import flags

from pixcon_jax import cli
from pixcon_jax.data.prepare import prepare_dataset

_DATASET = flags.DEFINE_enum("dataset", None, ["cityscapes", "pascal_context", "coco_stuff"],
                             "Dataset to prepare.", required=True)
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Folder with the manual downloads.",
                                  required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir to write.", required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # `--data_dir=~/tfds`: the shell expands no `~` after `=`.
  manual_dir, data_dir = (os.path.expanduser(d) for d in (_MANUAL_DIR.value, _DATA_DIR.value))
  counts = prepare_dataset(_DATASET.value, manual_dir=manual_dir, data_dir=data_dir)
  print(json.dumps({"dataset": _DATASET.value, "data_dir": data_dir, "splits": counts}))


if __name__ == "__main__":
  cli.run(main)
