"""PyTorch `state_dict` (numpy arrays) -> Flax variables `{"params", "batch_stats"}`.

Our module names mirror the official `state_dict`, so conversion is a table:
a torch key `a.b.c.<leaf>` lands at the Flax path `a/b/c/<leaf'>` with

| torch leaf (module kind)            | Flax collection / leaf        | value            |
|-------------------------------------|-------------------------------|------------------|
| `weight`, rank 4 (conv)             | params / `kernel`             | OIHW -> HWIO     |
| `weight`, rank 2 (linear)           | params / `kernel`             | OI -> IO         |
| `bias` (conv / linear)              | params / `bias`               |                  |
| `weight` / `bias` (BN)              | params / `scale` / `bias`     |                  |
| `running_mean` / `running_var` (BN) | batch_stats / `mean` / `var`  |                  |
| `num_batches_tracked`               | dropped                       |                  |

A module is BN when the state_dict also has its `running_mean`. A leading
`module.` (DataParallel) is stripped. Every leaf of the model's variables must
be filled with the right shape; extra torch keys are an error unless they are
known to be unused by our models (`IGNORED_MODULES`, memory-bank buffers).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax
import numpy as np

from pixcon_jax import checkpointing
from pixcon_jax import models
from pixcon_jax import validation
from pixcon_jax.models.registry import BACKBONE_PREFIX

# Top-level torch modules (after an optional `backbone.`) that our models never use:
# the ImageNet classification parts of HRNet and ResNet checkpoints.
IGNORED_MODULES = ("incre_modules", "downsamp_modules", "final_layer", "classifier", "fc")
# Buffers of the official memory bank (`segment_queue`, `pixel_queue`, `*_queue_ptr`): our
# memory lives in the train state, not in the model.
IGNORED_LEAF_SUFFIXES = ("queue", "queue_ptr")

_BN_LEAVES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_TORCH_LEAF = {("params", "kernel"): "weight", ("params", "scale"): "weight",
               ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
               ("batch_stats", "var"): "running_var"}


class StateDictMismatch(validation.ConfigError):
  """A state_dict that does not fit the model: every missing, mis-shaped and unexpected key.

  `str()` lists them all (one per line group); `summary()` is one line for the command line.
  """

  def __init__(self, *, missing: list[str], mismatched: list[str], unexpected: list[str],
               num_keys: int, num_mapped: int):
    self.missing, self.mismatched, self.unexpected = missing, mismatched, unexpected
    self.num_keys, self.num_mapped = num_keys, num_mapped
    msg = ["state_dict does not fit the model:"]
    if missing:
      msg.append(f"missing keys ({len(missing)}): " + ", ".join(missing))
    if mismatched:
      msg.append(f"shape mismatches ({len(mismatched)}): " + "; ".join(mismatched))
    if unexpected:
      msg.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
    super().__init__("\n".join(msg))

  def summary(self, model: str, source: str) -> str:
    """One line: which keys of `source` do not fit `model`, and the models there are."""
    def some(names):
      return f"{names[:3]}{f' and {len(names) - 3} more' if len(names) > 3 else ''}"
    parts = [f"{source} does not fit --model={model}: {self.num_mapped} of its {self.num_keys} "
             f"keys are arrays of that model"]
    if self.unexpected:
      parts.append(f"{len(self.unexpected)} keys are not, e.g. {some(self.unexpected)}")
    if self.mismatched:
      parts.append(f"{len(self.mismatched)} have other shapes, e.g. {some(self.mismatched)}")
    if self.missing:
      parts.append(f"{len(self.missing)} of the model's arrays are missing, e.g. "
                   f"{some(self.missing)}")
    return ("; ".join(parts) + f". Registered models: {', '.join(models.model_names())}; give "
            f"the official checkpoint of one of them (--backbone_only for an ImageNet backbone)")


@dataclasses.dataclass
class ConversionReport:
  """What happened to every torch key.

  Attributes:
    mapped: torch keys copied into the variables.
    skipped: torch keys known to be unused (classification heads, memory queues).
    dropped: `num_batches_tracked` counters (no Flax counterpart).
  """
  mapped: list[str] = dataclasses.field(default_factory=list)
  skipped: list[str] = dataclasses.field(default_factory=list)
  dropped: list[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    lines = [f"mapped {len(self.mapped)} tensors, dropped {len(self.dropped)} "
             f"num_batches_tracked, skipped {len(self.skipped)} unused tensors"]
    lines += [f"  skipped: {k}" for k in self.skipped]
    return "\n".join(lines)


def strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Removes the `module.` that DataParallel / DistributedDataParallel put before every key."""
  out = {}
  for k, v in state_dict.items():
    out[k[len("module."):] if k.startswith("module.") else k] = np.asarray(v)
  return out


def _is_ignored(key: str) -> bool:
  parts = key.split(".")
  if parts[0] == BACKBONE_PREFIX and len(parts) > 1:
    parts = parts[1:]
  return parts[0] in IGNORED_MODULES or parts[-1].endswith(IGNORED_LEAF_SUFFIXES)


def torch_leaf_name(path: tuple[str, ...]) -> str:
  """Flax (collection, *modules, leaf) -> the torch key it is converted from."""
  collection, *modules, leaf = path
  return ".".join(modules + [_TORCH_LEAF.get((collection, leaf), leaf)])


def _map_key(key: str, value: np.ndarray, keys: set[str]
             ) -> tuple[tuple[str, ...], np.ndarray] | None:
  """(flax path incl. collection, converted value) of one torch entry, or None to drop it."""
  module, _, leaf = key.rpartition(".")
  mod_path = tuple(module.split(".")) if module else ()
  if leaf == "num_batches_tracked":
    return None
  if module + ".running_mean" in keys and leaf in _BN_LEAVES:
    collection, name = _BN_LEAVES[leaf]
    return (collection, *mod_path, name), value
  if leaf == "weight" and value.ndim == 4:
    return ("params", *mod_path, "kernel"), value.transpose(2, 3, 1, 0)
  if leaf == "weight" and value.ndim == 2:
    return ("params", *mod_path, "kernel"), value.T
  if leaf == "bias" and value.ndim == 1:
    return ("params", *mod_path, "bias"), value
  raise ValueError(f"no conversion rule for torch key {key!r} of shape {list(value.shape)}")


def convert_state_dict(state_dict: Mapping[str, Any], target: Any, *, backbone_only: bool = False
                       ) -> tuple[dict[str, Any], ConversionReport]:
  """Converts a torch state_dict to the variables of a model.

  Args:
    state_dict: torch key -> array (numpy or anything np.asarray accepts).
    target: the model's variables or their shapes, e.g.
      `jax.eval_shape(model.init, rngs, image)`; a dict with "params" (and "batch_stats").
    backbone_only: the state_dict is a bare backbone (an ImageNet checkpoint whose keys
      have no `backbone.` prefix): its keys are mapped under "backbone", and only the
      target's backbone leaves are required.
  Returns:
    (variables, report). `variables` holds numpy arrays in the target's dtypes, with the
    target's structure (only its "backbone" subtrees if `backbone_only`; overlay them on
    initialised variables with `merge_variables`).
  Raises:
    StateDictMismatch (a ValueError): listing every missing key, shape mismatch and unexpected
      key.
  """
  sd = strip_module_prefix(state_dict)
  keys = set(sd)
  flat_target = flax.traverse_util.flatten_dict(flax.core.unfreeze(target))
  if backbone_only:
    flat_target = {p: v for p, v in flat_target.items() if len(p) > 1 and p[1] == BACKBONE_PREFIX}

  report = ConversionReport()
  flat_out: dict[tuple[str, ...], np.ndarray] = {}
  unexpected, mismatched = [], []
  for key in sd:
    if _is_ignored(key):
      report.skipped.append(key)
      continue
    try:
      mapped = _map_key(key, sd[key], keys)
    except ValueError:  # No rule for it (not a conv / linear / BN array): not of this model.
      unexpected.append(key)
      continue
    if mapped is None:
      report.dropped.append(key)
      continue
    path, value = mapped
    if backbone_only:
      path = (path[0], BACKBONE_PREFIX, *path[1:])
    if path not in flat_target:
      unexpected.append(key)
      continue
    want = flat_target[path]
    if tuple(value.shape) != tuple(want.shape):
      mismatched.append(f"{key}: torch {list(sd[key].shape)} -> flax {list(value.shape)}, "
                        f"model expects {list(want.shape)} at {'/'.join(path)}")
      continue
    flat_out[path] = np.asarray(value, dtype=want.dtype)
    report.mapped.append(key)

  missing = [p for p in flat_target if p not in flat_out]
  if missing or mismatched or unexpected:
    prefix = 1 if backbone_only else 0
    raise StateDictMismatch(
        missing=[torch_leaf_name((p[0], *p[1 + prefix:])) for p in missing],
        mismatched=mismatched, unexpected=unexpected, num_keys=len(sd),
        num_mapped=len(report.mapped))
  return flax.traverse_util.unflatten_dict(flat_out), report


# Official `network.model_name` values whose model is registered here under another name; all
# other official names we support are registered under the official name itself.
OFFICIAL_MODEL_NAMES = {"spatial_ocrnet": "ocr_r101"}


def checkpoint_model_name(config_dict: Mapping[str, Any] | None) -> str | None:
  """The model of an official `save_net` checkpoint, as our registered name.

  Args:
    config_dict: the checkpoint's `config_dict` (the official Configer's tree), or None.
  Returns:
    `config_dict["network"]["model_name"]` translated by `OFFICIAL_MODEL_NAMES`, or None
    when the checkpoint does not record it.
  """
  network = (config_dict or {}).get("network")
  name = network.get("model_name") if isinstance(network, Mapping) else None
  if not isinstance(name, str):
    return None
  return OFFICIAL_MODEL_NAMES.get(name, name)


def resolve_model_name(requested: str | None, config_dict: Mapping[str, Any] | None, *,
                       source: str) -> str:
  """The model to convert `source` for: the checkpoint's own when it records one.

  Args:
    requested: the user's model name (`--model`), or None.
    config_dict: the checkpoint's `config_dict`, or None.
    source: the checkpoint's file name, for messages.
  Returns:
    The registered model name.
  Raises:
    validation.ConfigError (a ValueError): one line, when `requested` contradicts the checkpoint's model, or when neither
      gives a model.
  """
  recorded = checkpoint_model_name(config_dict)
  if recorded is None:
    if requested is None:
      raise validation.ConfigError(f"{source} records no model (no config_dict network.model_name); "
                       "pass --model")
    return requested
  if requested is not None and requested != recorded:
    official = config_dict["network"]["model_name"]
    held = recorded if official == recorded else f"{official} (registered here as {recorded})"
    raise validation.ConfigError(f"--model={requested} does not match {source}, which holds model {held} "
                     f"(config_dict network.model_name); pass --model={recorded} or omit it")
  return recorded


def merge_variables(base: Any, update: Any) -> dict[str, Any]:
  """Overlays `update` (e.g. converted backbone variables) on `base` (initialised variables)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(base))
  flat.update(flax.traverse_util.flatten_dict(flax.core.unfreeze(update)))
  return flax.traverse_util.unflatten_dict(flat)


def convert_for_model(name: str, state_dict: Mapping[str, Any], *, num_classes: int,
                      backbone_only: bool = False, **overrides: Any
                      ) -> tuple[dict[str, Any], ConversionReport]:
  """`convert_state_dict` against the registered model `name` (see `models.build_model`)."""
  model = models.build_model(name, num_classes=num_classes, **overrides)
  return convert_state_dict(state_dict, checkpointing.variable_shapes(model),
                            backbone_only=backbone_only)
