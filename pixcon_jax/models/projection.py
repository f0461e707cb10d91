"""Projection head of the pixel contrast (paper Sec. 3.3): features -> L2-normalised embeddings.

Named like the official `ProjectionHead`: the layers sit under `proj`, which is
the conv itself for `linear` and an `nn.Sequential` (`proj.0` conv, `proj.1.0`
BN, `proj.2` conv) for `convmlp`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from pixcon_jax.models import heads
from pixcon_jax.models import layers

PROJ_TYPES = ("convmlp", "linear")


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """`F.normalize(x, dim=channels)`: x / max(||x||_2, eps) over the last axis, in float32."""
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


class ProjectionHead(layers.ConvNormModule):
  """Maps features to unit-norm embeddings.

  Attributes:
    proj_dim: embedding size D (256 in the paper).
    proj_type: "convmlp" (paper default: 1x1 conv, BNReLU, 1x1 conv, all convs with bias)
      or "linear" (one 1x1 conv).
    conv, norm: the model's `ModuleDef`s; the output is float32 whatever their dtype.
  """
  proj_dim: int = 256
  proj_type: str = "convmlp"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x: [B, h, w, Cin] -> embedding [B, h, w, D] float32, L2-normalised over D."""
    if self.proj_type == "convmlp":
      # The official `convmlp` is the FCN head's layout with 1x1 convs: "0", "1.0", "2".
      y = heads.FCNHead(self.proj_dim, dropout=None, final_bias=True, kernel_size=1,
                        **self.conv_norm(), name="proj")(x, train)
    elif self.proj_type == "linear":
      y = self.conv(self.proj_dim, 1, use_bias=True, name="proj")(x)
    else:
      raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {self.proj_type!r}")
    return l2_normalize(y)
