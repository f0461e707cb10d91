"""Trained-model stand-ins for the segmenter and export tests (tests/test_segment.py,
tests/test_export.py): a tiny run directory and a converted golden checkpoint, no training."""
from __future__ import annotations

import json
import pathlib

import flax
import jax
import ml_collections
import numpy as np

import helpers

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(widths=(4, 8, 16, 32), stage_modules=(1, 1, 1), num_blocks=1, stem_width=8,
            layer1_planes=4, layer1_blocks=1)


def tiny_config() -> ml_collections.ConfigDict:
  """configs/demo.py:runlocal shrunk to a seconds-long compile (helpers.tiny_demo_config)."""
  return helpers.tiny_demo_config()


def _random_like(tree, seed: int):
  """He-normal kernels, BN near identity, small biases: varied predictions without training."""
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
  out = {}
  for path, leaf in flat.items():
    if path[-1] == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      value = rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)
    elif path[-1] in ("scale", "var"):
      value = 1.0 + 0.1 * rng.random(leaf.shape)
    else:
      value = 0.1 * rng.standard_normal(leaf.shape)
    out[path] = value.astype(leaf.dtype)
  return flax.traverse_util.unflatten_dict(out)


def tiny_run(path: pathlib.Path, config: ml_collections.ConfigDict | None = None) -> pathlib.Path:
  """A run directory as training leaves it: config.json and checkpoints of steps 1 and 2
  (random weights; step 2's differ from step 1's)."""
  from pixcon_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from pixcon_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from pixcon_jax import setup  # pylint: disable=g-import-not-at-top
  from pixcon_jax import train  # pylint: disable=g-import-not-at-top
  config = config or tiny_config()
  exp = setup.for_training(config)
  shapes = setup.abstract_state(exp)
  rep = jax.sharding.NamedSharding(exp.mesh, jax.sharding.PartitionSpec())
  state = jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype), rep), shapes)
  it = data_lib.make_train_iterator(config.data, config.augment, batch_size_per_process=2,
                                    seed=0, process_index=0, process_count=1)
  manager = checkpointing.make_manager(str(path), config)
  for step in (1, 2):
    params = jax.device_put(_random_like(shapes.params, seed=step), rep)
    stats = jax.device_put(_random_like(shapes.batch_stats, seed=10 + step), rep)
    checkpointing.save(manager, step, state.replace(step=state.step + step, params=params,
                                                    batch_stats=stats), it)
  manager.wait_until_finished()
  manager.close()
  train.save_run_config(config, str(path))
  return path


def converted_golden_checkpoint(golden_dir: pathlib.Path, case: str,
                                out: pathlib.Path) -> pathlib.Path:
  """The golden case's stand-in weights converted and saved as scripts/convert_checkpoint.py
  saves them (a StandardCheckpointer tree of {params, batch_stats})."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  import golden_parity.models as parity_models  # pylint: disable=g-import-not-at-top
  from pixcon_jax import convert  # pylint: disable=g-import-not-at-top
  meta = json.loads((golden_dir / f"{case}.json").read_text())
  state_dict = parity_models.golden_weights_module(golden_dir).torch_style_weights(
      meta["state_dict_spec"], meta["weights"]["conv_gain"])
  variables, _ = convert.convert_for_model(meta["model"], state_dict,
                                           num_classes=int(meta["outputs"]["seg"][1]))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(out.resolve(), variables)
  checkpointer.wait_until_finished()
  return out
