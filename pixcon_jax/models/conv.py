"""The conv layer of every model: `nn.Conv`'s parameters, PyTorch's padding, an injectable algorithm.

A model receives its conv as a `ModuleDef` (`conv: ModuleDef`, a `functools.partial` of `Conv`
made once by `models.build_model`), so the compute dtype and the algorithm are set in one place.
The algorithm is `Conv.conv_fn`: the native `lax.conv_general_dilated` by default, and on XLA:CPU
the im2col / Winograd convs of `pixcon_jax.cpu.conv`, which `build_model` injects.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any
# (x [B, H, W, Cin], kernel [kh, kw, Cin, Cout], *, stride, padding, dilation) -> [B, Ho, Wo, Cout].
ConvFn = Callable[..., jax.Array]

# Values of `conv_impl` (`models.build_model`, `config.model.conv_impl`): "auto" is the native
# op off the CPU and the per-conv choice of `cpu.conv.choose_impl` on it.
IMPLS = ("auto", "xla", "matmul", "winograd")

# He-normal over fan-out, the initialisation of the official models for convs trained from scratch.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def check_impl(impl: str, *, where: str = "conv_impl") -> str:
  """Returns `impl` if it names an algorithm, else raises naming `where` and the choices."""
  if impl not in IMPLS:
    raise ValueError(f"{where}={impl!r}: expected one of {IMPLS}")
  return impl


def native_conv2d(x: jax.Array, kernel: jax.Array, *, stride: int = 1, padding: int = 0,
                  dilation: int = 1) -> jax.Array:
  """PyTorch `F.conv2d` (no bias) on NHWC by `lax.conv_general_dilated`.

  Args:
    x: [B, H, W, Cin].
    kernel: [kh, kw, Cin, Cout], same dtype as x.
    stride, padding, dilation: as in PyTorch (symmetric zero padding).
  Returns:
    [B, Ho, Wo, Cout], Ho = floor((H + 2 padding - dilation (kh - 1) - 1) / stride) + 1.
  """
  return lax.conv_general_dilated(
      x, kernel, (stride, stride), [(padding, padding), (padding, padding)],
      rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Conv(nn.Module):
  """A 2-D conv with `nn.Conv`'s parameters (`kernel` HWIO, `bias`) and PyTorch's padding.

  Attributes:
    features: Cout.
    kernel_size: k (square kernels).
    stride, dilation: as in PyTorch.
    padding: symmetric zero padding; None: `dilation * (k - 1) // 2` ("same" for odd k).
    use_bias: add a learned bias.
    dtype: compute dtype (inputs and kernel are cast to it); parameters are float32.
    kernel_init: initialiser of the kernel (He-normal over fan-out, as the official models).
    conv_fn: the algorithm (`ConvFn`): `native_conv2d`, or `cpu.conv.ConvAlgorithm(...)`.
  """
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: int | None = None
  dilation: int = 1
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  kernel_init: Any = conv_kernel_init
  conv_fn: ConvFn = native_conv2d

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, Cin] -> [B, Ho, Wo, features] in `dtype`."""
    k = self.kernel_size
    padding = self.dilation * (k - 1) // 2 if self.padding is None else self.padding
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features),
                        jnp.float32)
    y = self.conv_fn(x.astype(self.dtype), kernel.astype(self.dtype), stride=self.stride,
                     padding=padding, dilation=self.dilation)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y
