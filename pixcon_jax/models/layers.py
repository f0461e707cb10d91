"""Building blocks shared by every network, matching PyTorch numerics.

Official checkpoints only reproduce their outputs if the primitives behave as
PyTorch's do: symmetric conv padding, BatchNorm with eps 1e-5 whose running
variance is updated with the *unbiased* batch variance, bilinear resize with
`align_corners=True`, and the ceil-mode max-pool of the deep-stem ResNet.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pixcon_jax.models import conv as conv_lib

Dtype = Any
# An unbound module class or `functools.partial` of one, injected into the models (`conv`, `norm`).
ModuleDef = Any
# What becomes of the output of a residual block or branch fusion ([...] -> same): `identity`, or
# on XLA:CPU the fusion barrier (`models.build_model` chooses).
ResidualOut = Callable[[jax.Array], jax.Array]


def identity(x: jax.Array) -> jax.Array:
  """x unchanged: the `residual_out` of models built for GPU and TPU."""
  return x


class BatchNorm(nn.Module):
  """BatchNorm over all axes but the last, with PyTorch's running-statistics rule.

  In training the input is normalised with the biased batch variance, and the
  running variance is updated with the unbiased one (n / (n - 1)), as
  `torch.nn.BatchNorm2d` does. With `axis_name` the statistics are averaged
  over that mapped axis (cross-replica / SyncBatchNorm); with running averages
  (evaluation) nothing is synchronised. Models take it as `norm: ModuleDef`,
  `functools.partial(BatchNorm, axis_name=..., dtype=...)`, and bind
  `use_running_average=not train` where they call it.

  Attributes:
    use_running_average: True in evaluation (use `batch_stats`), False in training.
    axis_name: mesh axis to synchronise batch statistics over (training only), or None.
    momentum: weight of the old running value (Flax convention; PyTorch 0.1 == 0.9 here).
    epsilon: added to the variance (PyTorch default 1e-5).
    dtype: compute dtype of the output; statistics are always float32.
  """
  use_running_average: bool
  axis_name: str | None = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., C] -> [..., C] in `dtype`."""
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      xf = x.astype(jnp.float32)
      axes = tuple(range(x.ndim - 1))
      count = float(np.prod([x.shape[a] for a in axes]))
      mean = jnp.mean(xf, axes)
      if self.axis_name is not None:
        mean = lax.pmean(mean, self.axis_name)
        count = count * lax.psum(1, self.axis_name)
      # Two passes (mean, then squared deviations) keep float32 close to PyTorch's kernel.
      var = jnp.mean(jnp.square(xf - mean), axes)
      if self.axis_name is not None:
        var = lax.pmean(var, self.axis_name)
      if not self.is_initializing():
        unbiased = var * (count / jnp.maximum(count - 1.0, 1.0))
        ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * unbiased
    mul = scale * lax.rsqrt(var + self.epsilon)
    y = x.astype(jnp.float32) * mul + (bias - mean * mul)
    return y.astype(self.dtype)


class ConvNormModule(nn.Module):
  """Base of the modules with convs and BNs: both injected, as keyword-only fields.

  `models.build_model` makes them once (`registry.layer_defs`: compute dtype, conv algorithm,
  cross-replica BN axis) and every module hands them on to its children (`conv_norm()`). The
  defaults (native float32 conv, BN without an axis) serve modules built directly.

  Attributes:
    conv: `ModuleDef` of `conv.Conv`, called as `conv(features, kernel_size, stride=...,
      dilation=..., use_bias=..., name=...)`.
    norm: `ModuleDef` of `BatchNorm`, called as `norm(use_running_average=not train, name=...)`.
  """
  conv: ModuleDef = dataclasses.field(default=conv_lib.Conv, kw_only=True)
  norm: ModuleDef = dataclasses.field(default=BatchNorm, kw_only=True)

  def conv_norm(self) -> dict[str, ModuleDef]:
    """This module's conv and norm, as keyword arguments of a child module."""
    return {"conv": self.conv, "norm": self.norm}


class ResidualModule(ConvNormModule):
  """Base of the modules with residual blocks or branch fusions: also `residual_out`.

  Attributes:
    residual_out: applied to every residual block and fusion output: `identity`, or on
      XLA:CPU the fusion barrier (`registry.layer_defs` decides; models never see why).
  """
  residual_out: ResidualOut = dataclasses.field(default=identity, kw_only=True)

  def conv_norm_residual(self) -> dict[str, Any]:
    """conv, norm and residual_out, as keyword arguments of a child module."""
    return {**self.conv_norm(), "residual_out": self.residual_out}


def batch_axis(norm: ModuleDef) -> str | None:
  """The mesh axis the batch is split over, as the model's BN knows it (`layer_defs`), or None."""
  return getattr(norm, "keywords", {}).get("axis_name")


class Dropout2d(nn.Module):
  """`nn.Dropout2d` on NHWC: one keep/drop decision per (image, channel), needs rng 'dropout'.

  Image i's decisions are drawn from fold_in(key, its position in the global mini-batch), with
  the same 'dropout' key on every device: with `axis_name` (the mesh axis the batch is split
  over, inside `shard_map`) this device's images sit at axis_index * b + [0, b). So the masks,
  and everything computed from them (the predictions that pick the contrast's hard anchors),
  do not depend on the number of devices.

  Attributes:
    rate: probability of dropping a channel.
    axis_name: the batch's mesh axis, or None (this call's images are the whole batch).
    deterministic: no dropout (evaluation).
  """
  rate: float
  axis_name: str | None = None
  deterministic: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, h, w, C] -> the same, channels of each image zeroed or scaled by 1 / (1 - rate)."""
    if self.deterministic or self.rate == 0.0:
      return x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    key = self.make_rng("dropout")
    b = x.shape[0]
    first = 0 if self.axis_name is None else lax.axis_index(self.axis_name) * b
    draw = lambda pos: jax.random.bernoulli(jax.random.fold_in(key, pos), 1.0 - self.rate,
                                            (x.shape[-1],))
    keep = jax.vmap(draw)(first + jnp.arange(b))  # [B, C]
    scaled = x / jnp.asarray(1.0 - self.rate, x.dtype)
    return jnp.where(keep[:, None, None, :], scaled, jnp.zeros_like(x))


class BNReLU(nn.Module):
  """BN then ReLU, named like the official `BNReLU` (`nn.Sequential(BN, ReLU)`): BN params sit under `0`."""
  norm: ModuleDef = BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x: [..., C] -> [..., C]."""
    return nn.relu(self.norm(use_running_average=not train, name="0")(x))


def _align_corners_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source indices and weights of PyTorch's bilinear `align_corners=True` along one axis.

  The arithmetic is float32, as in PyTorch's CPU kernel, so the taps match bit for bit.
  """
  if out_size > 1:
    scale = np.float32(in_size - 1) / np.float32(out_size - 1)
  else:
    scale = np.float32(0.0)
  src = np.arange(out_size, dtype=np.float32) * scale
  i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam = (src - i0.astype(np.float32)).astype(np.float32)
  return i0, i1, lam


def _interpolation_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] float32: row o holds the two taps of output o (`_align_corners_taps`)."""
  i0, i1, lam = _align_corners_taps(in_size, out_size)
  rows = np.arange(out_size)
  m = np.zeros((out_size, in_size), np.float32)
  np.add.at(m, (rows, i0), np.float32(1.0) - lam)
  np.add.at(m, (rows, i1), lam)
  return m


def _traced_interpolation_matrix(in_size: Any, out_size: Any) -> jax.Array:
  """`_interpolation_matrix` in the graph, for symbolic sizes (jax.export shape polymorphism).

  The same float32 operations as `_align_corners_taps` (so the same taps, bit for bit): the
  division of the two sizes, the iota times the scale, floor, and the two one-hot rows.
  """
  num = jnp.asarray(in_size - 1).astype(jnp.float32)
  den = jnp.asarray(out_size - 1).astype(jnp.float32)
  scale = jnp.where(den > 0, num / jnp.maximum(den, 1.0), jnp.float32(0.0))
  src = jnp.arange(out_size, dtype=jnp.float32) * scale
  last = jnp.asarray(in_size - 1).astype(jnp.int32)
  i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), last)
  i1 = jnp.minimum(i0 + 1, last)
  lam = src - i0.astype(jnp.float32)
  cols = jnp.arange(in_size, dtype=jnp.int32)[None, :]
  return ((jnp.float32(1.0) - lam)[:, None] * (cols == i0[:, None]) +
          lam[:, None] * (cols == i1[:, None]))


def _is_static(size: Any) -> bool:
  return isinstance(size, (int, np.integer))


def _resize_axis(x: jax.Array, axis: int, out_size: Any) -> jax.Array:
  in_size = x.shape[axis]
  if in_size == out_size:
    return x
  # A matmul with the [out, in] interpolation matrix, not two gathers: the gradient of a gather
  # is a scatter-add (serial on CPU, slow on TPU), and XLA:CPU fuses the whole elementwise
  # chain that produced x into a gather, recomputing it for every output pixel.
  if _is_static(in_size) and _is_static(out_size):
    m = jnp.asarray(_interpolation_matrix(in_size, out_size))
  else:
    m = _traced_interpolation_matrix(in_size, out_size)
  # math.prod, not int(np.prod): the leading (batch) size may be symbolic (jax.export).
  n, k = math.prod(x.shape[:axis]), math.prod(x.shape[axis + 1:])
  y = jnp.einsum("oi,nik->nok", m, x.reshape(n, in_size, k).astype(jnp.float32),
                 precision=lax.Precision.HIGHEST)
  return y.reshape(x.shape[:axis] + (out_size,) + x.shape[axis + 1:]).astype(x.dtype)


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Bilinear resize with PyTorch's `align_corners=True`.

  Args:
    x: [B, H, W, C].
    size: (h, w) output spatial size: ints, or symbolic dimensions under `jax.export`.
  Returns:
    [B, h, w, C] in x's dtype; output pixel o samples input coordinate o * (in - 1) / (out - 1).
  """
  h, w = (int(s) if _is_static(s) else s for s in size)
  # Width first, then height: the same association of products as PyTorch's kernel.
  return _resize_axis(_resize_axis(x, 2, w), 1, h)


def max_pool_ceil(x: jax.Array, window: int = 3, stride: int = 2, padding: int = 1) -> jax.Array:
  """`torch.nn.MaxPool2d(window, stride, padding, ceil_mode=True)` on [B, H, W, C].

  The output size is ceil((H + 2p - k) / s) + 1, minus one if the last window
  would start in the right padding; padded cells are -inf so they never win.
  """
  pads = [(0, 0)]
  for size in x.shape[1:3]:
    out = -(-(size + 2 * padding - window) // stride) + 1
    if (out - 1) * stride >= size + padding:
      out -= 1
    extra = max((out - 1) * stride + window - size - 2 * padding, 0)
    pads.append((padding, padding + extra))
  pads.append((0, 0))
  # A Python scalar init keeps reduce_window differentiable (an array init is not).
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1), pads)
