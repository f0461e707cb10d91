"""Prints ONE JSON object with a split's per-class pixel counts (after id mapping, no augmentation).

  python scripts/data_stats.py --dataset cityscapes --data_dir DIR --split train [--class_weights]
  python scripts/data_stats.py --dataset synthetic --split validation
"""
import json

from absl import app
from absl import flags

from pixcon_jax.data import config_defaults
from pixcon_jax.data import stats

_DATASET = flags.DEFINE_string("dataset", None, "Dataset name.", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir (not needed for synthetic).")
_SPLIT = flags.DEFINE_string("split", "train", "Split name (train, validation, ...).")
_CLASS_WEIGHTS = flags.DEFINE_bool("class_weights", False, "Add frequency-derived class weights.")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", None, "Only the first N examples.")


def main(argv):
  del argv
  cfg = config_defaults.default_data_config(_DATASET.value)
  cfg.data_dir = _DATA_DIR.value
  if _DATASET.value != "synthetic" and not _DATA_DIR.value:
    raise app.UsageError(f"--data_dir is required for {_DATASET.value}")
  print(json.dumps(stats.compute_stats(cfg, _SPLIT.value, class_weights=_CLASS_WEIGHTS.value,
                                       max_examples=_MAX_EXAMPLES.value)))


if __name__ == "__main__":
  app.run(main)
