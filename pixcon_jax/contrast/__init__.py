"""Pixel-wise contrastive learning (paper Sec. 3) as a library: the loss and its memory bank.

The public API (`__all__`, from `contrast/api.py`) is what a JAX user needs in their own train
step; docs/LIBRARY.md walks through it and examples/own_model.py runs it:

- settings: `make_settings(num_classes, **overrides)` (configs/common.py's defaults) or
  `settings_from_config(config)` -> `PixelContrastSettings` (`ContrastSettings` of the loss,
  `MemorySettings` of the bank);
- state: `create_memory(settings=, dim=, num_images=)` -> `MemoryBank` (a pytree);
- in the step: `contrast_loss(embedding, label, memory, rng, settings=, predict=, image_id=,
  axis_name=)` -> (loss, metrics);
- after the step: `update_memory(memory, embedding, label, rng, settings=, image_id=,
  axis_name=)`, or `memory_keys` + `push_memory` / `flush_memory` for a deferred write.

The submodules (`loss`, `memory`, `sampling`, `collectives`, `official`, `health`) are the
implementation: importable, but their names may change between versions.
"""
from pixcon_jax.contrast.api import MemorySettings
from pixcon_jax.contrast.api import PixelContrastSettings
from pixcon_jax.contrast.api import align_labels
from pixcon_jax.contrast.api import align_predictions
from pixcon_jax.contrast.api import contrast_loss
from pixcon_jax.contrast.api import create_memory
from pixcon_jax.contrast.api import flush_memory
from pixcon_jax.contrast.api import make_settings
from pixcon_jax.contrast.api import memory_keys
from pixcon_jax.contrast.api import push_memory
from pixcon_jax.contrast.api import settings_from_config
from pixcon_jax.contrast.api import update_memory
from pixcon_jax.contrast.labels import downsample_labels
from pixcon_jax.contrast.labels import legacy_nearest_indices
from pixcon_jax.contrast.loss import ContrastSettings
from pixcon_jax.contrast.memory import MemoryBank
from pixcon_jax.contrast.memory import MemoryUpdate

__all__ = [
    # Settings.
    "make_settings", "settings_from_config", "PixelContrastSettings", "ContrastSettings",
    "MemorySettings",
    # State.
    "create_memory", "MemoryBank", "MemoryUpdate",
    # The step.
    "contrast_loss", "update_memory", "memory_keys", "push_memory", "flush_memory",
    # Label alignment to the embedding grid.
    "align_labels", "align_predictions", "downsample_labels", "legacy_nearest_indices",
]
