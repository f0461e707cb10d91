"""Pixel-wise contrastive learning (paper Sec. 3): label resizing, anchor sampling, losses, memory.

Submodules are imported explicitly by their users (`from pixcon_jax.contrast import official`);
only the label rule shared by every submodule is re-exported here.
"""
from pixcon_jax.contrast.labels import downsample_labels, legacy_nearest_indices

__all__ = ["downsample_labels", "legacy_nearest_indices"]
