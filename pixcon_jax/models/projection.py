"""Projection head of the pixel contrast (paper Sec. 3.3): features -> L2-normalised embeddings.

Named like the official `ProjectionHead`: the layers sit under `proj`, which is
the conv itself for `linear` and an `nn.Sequential` (`proj.0` conv, `proj.1.0`
BN, `proj.2` conv) for `convmlp`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pixcon_jax.models import layers

Dtype = Any

PROJ_TYPES = ("convmlp", "linear")


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """`F.normalize(x, dim=channels)`: x / max(||x||_2, eps) over the last axis, in float32."""
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


class ConvMLP(nn.Module):
  """1x1 conv (bias) -> BNReLU -> 1x1 conv (bias), children "0", "1", "2"."""
  hidden: int
  proj_dim: int
  bn_axis_name: str | None = None
  dtype: Dtype = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = layers.conv(self.hidden, 1, use_bias=True, dtype=self.dtype, impl=self.conv_impl,
                    name="0")(x)
    x = layers.BNReLU(train, self.bn_axis_name, dtype=self.dtype, name="1")(x)
    return layers.conv(self.proj_dim, 1, use_bias=True, dtype=self.dtype, impl=self.conv_impl,
                       name="2")(x)


class ProjectionHead(nn.Module):
  """Maps features to unit-norm embeddings.

  Attributes:
    proj_dim: embedding size D (256 in the paper).
    proj_type: "convmlp" (paper default) or "linear".
    bn_axis_name: mesh axis for cross-replica BN in training.
    dtype: compute dtype; the output is float32.
  """
  proj_dim: int = 256
  proj_type: str = "convmlp"
  bn_axis_name: str | None = None
  dtype: Dtype = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x: [B, h, w, Cin] -> embedding [B, h, w, D] float32, L2-normalised over D."""
    if self.proj_type == "convmlp":
      y = ConvMLP(x.shape[-1], self.proj_dim, self.bn_axis_name, self.dtype,
                  conv_impl=self.conv_impl, name="proj")(x, train)
    elif self.proj_type == "linear":
      y = layers.conv(self.proj_dim, 1, use_bias=True, dtype=self.dtype, impl=self.conv_impl,
                      name="proj")(x)
    else:
      raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {self.proj_type!r}")
    return l2_normalize(y)
