"""pixcon_jax: supervised pixel-wise contrastive learning for semantic segmentation in JAX/Flax."""
from __future__ import annotations

from typing import Any

# Imported on first use: `import pixcon_jax` stays cheap (no JAX start-up, no model code).
_LAZY = {"load_segmenter": "pixcon_jax.segment", "Segmenter": "pixcon_jax.segment"}


def __getattr__(name: str) -> Any:
  if name in _LAZY:
    import importlib  # pylint: disable=g-import-not-at-top
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'pixcon_jax' has no attribute {name!r}")
