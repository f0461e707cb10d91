"""pixcon_jax: supervised pixel-wise contrastive learning for semantic segmentation in JAX/Flax.

Public names (`__all__`) are resolved on first use, so `import pixcon_jax` imports neither JAX
nor TensorFlow:

- `load_segmenter(workdir_or_checkpoint, ...)` -> `Segmenter`: a trained model as a function of
  a numpy image (`pixcon_jax/segment.py`);
- `contrast`: the pixel-contrast loss and its memory bank for your own train step
  (`pixcon_jax/contrast/__init__.py`; docs/LIBRARY.md).

Everything else (the modules behind `python -m pixcon_jax.main`) is internal: importable, but
its names may change between versions. docs/ARCHITECTURE.md marks which is which.
"""
import importlib

# Public name -> the module that defines it (imported lazily by `__getattr__`).
_LAZY = {
    "load_segmenter": "pixcon_jax.segment",
    "Segmenter": "pixcon_jax.segment",
}
_SUBPACKAGES = ("contrast",)

__all__ = ["load_segmenter", "Segmenter", "contrast"]


def __getattr__(name: str):
  if name in _LAZY:
    value = getattr(importlib.import_module(_LAZY[name]), name)
  elif name in _SUBPACKAGES:
    value = importlib.import_module(f"{__name__}.{name}")
  else:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  globals()[name] = value  # Resolved once.
  return value


def __dir__():
  return sorted(set(globals()) | set(__all__))
