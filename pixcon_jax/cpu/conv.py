"""2-D convolution by im2col or Winograd for XLA:CPU, and the per-shape choice among them.

Every algorithm computes the same function as PyTorch's `Conv2d`: cross-correlation
of an NHWC input with an HWIO kernel, symmetric zero padding, stride and dilation.
They differ in speed and in float32 rounding only (about 1e-6 relative):

- "xla": the native `lax.conv_general_dilated` (what `models.conv.Conv` runs by default).
  cuDNN on GPUs and the MXU on TPUs are fast at every conv, forward and backward.
- "matmul": im2col. The k*k shifted (strided, dilated) views of the input are
  concatenated along channels and multiplied by the kernel as one
  `[P, k*k*Cin] x [k*k*Cin, Cout]` matrix product; the backward pass is two more
  matmuls.
- "winograd": Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, CVPR 2016)
  for 3x3 stride-1 undilated convs: 4x4 input tiles are transformed, multiplied
  per tile position by the transformed kernel (16 batched matmuls) and transformed
  back to 2x2 output tiles. It needs 16/36 of the multiplications of the direct
  conv, and its gradient is again Winograd-shaped for both the input and the kernel.

`models.build_model` decides, from the platform the model is built for, whether the model's
convs run through this module at all (`ConvAlgorithm`): "auto" on GPU and TPU is the native op
and never reaches it. "auto" on CPU is resolved here per conv from the static shapes and the
dtype (`choose_impl`): for convs of at least `MATMUL_MIN_FLOPS`, Winograd for the 3x3
stride-1 convs of large maps and im2col for the rest, and the native op for the small convs,
where compilation costs more than the run. XLA:CPU's native conv computes weight gradients at
10-40 GFLOP/s on two cores where a matmul reaches ~100, runs 1x1 convs ~7x slower than a
matmul, and its weight gradient transposes the input, into which XLA fuses the ops that
produced it. Per conv shape: `scripts/bench_conv.py`; in the train step:
`scripts/bench_train.py --conv_impl=...`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Dtype = Any

# What `conv2d` computes with; "auto" stands for one of the others (`choose_impl`).
IMPLS = ("auto", "xla", "matmul", "winograd")

# Below this many forward FLOPs (2 B Ho Wo k^2 Cin Cout) a conv costs less to run natively than
# its im2col or Winograd graph costs to compile (tiny test and demo models). HRNet-W48 at
# 2 x 256x512 keeps 37 of its 309 convs native, 0.4% of its conv FLOPs.
MATMUL_MIN_FLOPS = 10 ** 8

# Winograd pays for its transforms only when each of its 16 per-position matmuls has at least
# this many rows (2x2 output tiles); smaller maps (HRNet's 1/16 and 1/32 branches) use im2col.
WINOGRAD_MIN_TILES = 512

# F(2x2, 3x3) transforms (Lavin & Gray 2016, Sec. 4.1): kernel G g G^T, input B^T d B,
# output A^T m A.
_WINOGRAD_BT = np.array([[1, 0, -1, 0],
                         [0, 1, 1, 0],
                         [0, -1, 1, 0],
                         [0, 1, 0, -1]])
_WINOGRAD_AT = np.array([[1, 1, 1, 0],
                         [0, 1, -1, -1]])
_WINOGRAD_G = np.array([[1.0, 0.0, 0.0],
                        [0.5, 0.5, 0.5],
                        [0.5, -0.5, 0.5],
                        [0.0, 0.0, 1.0]], np.float32)


def output_size(size: int, kernel_size: int, stride: int, padding: int, dilation: int) -> int:
  """PyTorch's conv output length: floor((size + 2p - d (k - 1) - 1) / s) + 1."""
  return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


def check_impl(impl: str, *, where: str = "conv_impl") -> str:
  """Returns `impl` if it names an algorithm, else raises naming `where` and the choices."""
  if impl not in IMPLS:
    raise ValueError(f"{where}={impl!r}: expected one of {IMPLS}")
  return impl


def winograd_applies(kernel_shape: Sequence[int], stride: int, dilation: int) -> bool:
  """Whether F(2x2, 3x3) computes this conv: a 3x3 kernel, stride 1, no dilation."""
  return tuple(kernel_shape[:2]) == (3, 3) and stride == 1 and dilation == 1


def choose_impl(x_shape: Sequence[int], kernel_shape: Sequence[int], *, stride: int,
                padding: int, dilation: int, dtype: Dtype, backend: str) -> str:
  """The algorithm "auto" stands for (static: shapes, dtype and backend only).

  Args:
    x_shape: [B, H, W, Cin] of the input.
    kernel_shape: [kh, kw, Cin, Cout].
    backend: the platform the conv runs on, "cpu", "gpu", "tpu", ...: the native op off the
      CPU (`ConvAlgorithm` always passes "cpu").
  Returns:
    "xla", "matmul" or "winograd".
  """
  if backend != "cpu":
    return "xla"
  # On CPU the native op only for small convs: its weight gradient transposes the input to
  # channel-major order, and XLA fuses the elementwise chain that produced the input (BN,
  # ReLU, residual sums, resizes) into that transpose, recomputing it at a cache-hostile stride.
  b, h, w, _ = x_shape
  kh, kw, cin, cout = kernel_shape
  ho = output_size(h, kh, stride, padding, dilation)
  wo = output_size(w, kw, stride, padding, dilation)
  if 2 * b * ho * wo * kh * kw * cin * cout < MATMUL_MIN_FLOPS:
    return "xla"
  if jnp.dtype(dtype) == jnp.float32 and winograd_applies(kernel_shape, stride, dilation):
    # Winograd's transforms lose too much precision in bfloat16; float32 only.
    if b * (-(-ho // 2)) * (-(-wo // 2)) >= WINOGRAD_MIN_TILES:
      return "winograd"
  return "matmul"


def _conv_xla(x, kernel, stride, padding, dilation, precision):
  return lax.conv_general_dilated(
      x, kernel, (stride, stride), [(padding, padding), (padding, padding)],
      rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=precision)


def _shifted_views(x, kh, kw, stride, padding, dilation):
  """The kh * kw views x_pad[:, i d + s r, j d + s c, :] of im2col, in HWIO tap order.

  Strided views are taken as contiguous slices of the input cut into s x s blocks
  ([B, H/s, s, W/s, s, C]); a strided slice would have a strided pad as its gradient,
  which XLA:CPU runs far slower than a plain one.
  """
  b, h, w, c = x.shape
  ho = output_size(h, kh, stride, padding, dilation)
  wo = output_size(w, kw, stride, padding, dilation)
  s = stride
  # Padded rows must cover every block a view reads: ((k - 1) d) // s + ho blocks of s rows.
  rows = s * (((kh - 1) * dilation) // s + ho)
  cols = s * (((kw - 1) * dilation) // s + wo)
  pad_h = (padding, max(rows - h - padding, 0))
  pad_w = (padding, max(cols - w - padding, 0))
  if pad_h != (0, 0) or pad_w != (0, 0):
    x = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
  x = x[:, :rows, :cols]
  if s > 1:
    x = x.reshape(b, rows // s, s, cols // s, s, c)
  views = []
  for i in range(kh):
    qi, ri = divmod(i * dilation, s)
    for j in range(kw):
      qj, rj = divmod(j * dilation, s)
      if s > 1:
        views.append(x[:, qi:qi + ho, ri, qj:qj + wo, rj])
      else:
        views.append(x[:, qi:qi + ho, qj:qj + wo])
  return views


def _conv_matmul(x, kernel, stride, padding, dilation, precision):
  kh, kw, cin, cout = kernel.shape
  views = _shifted_views(x, kh, kw, stride, padding, dilation)
  cols = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)
  # HWIO flattens to (i, j, cin) major-to-minor: the order the views were concatenated in.
  return lax.dot_general(cols, kernel.reshape(kh * kw * cin, cout),
                         (((3,), (0,)), ((), ())), precision=precision)


def _signed_sum(terms):
  """sum(c * a for c, a in terms) over the non-zero c, with +-1 as additions and subtractions."""
  out = None
  for c, a in terms:
    if c == 0:
      continue
    if out is None:
      out = a if c == 1 else -a if c == -1 else c * a
    else:
      out = out + a if c == 1 else out - a if c == -1 else out + c * a
  return out


# The Winograd transforms are linear maps from one array to another. Each output component is
# written as one signed sum of slices of the input, and the sixteen (or four) components are
# stacked at once, so that XLA:CPU computes a transform in a single pass over memory. Their
# transposes are given explicitly in the same form: autodiff would transpose every slice into
# a pad of the whole tensor and sum them with intermediate copies.

@jax.custom_vjp
def _input_transform(xq):
  """B^T d B of every 4x4 input tile.

  Args:
    xq: [B, th + 1, 2, tw + 1, 2, C], the padded input cut into 2x2 blocks: tile (t, u) is
      blocks t..t+1 by u..u+1 (rows 2t..2t+3, columns 2u..2u+3).
  Returns:
    [16, B, th, tw, C]: the transformed tiles, tile position (i, j) at index 4 i + j.
  """
  th, tw = xq.shape[1] - 1, xq.shape[3] - 1

  def d(r, c):  # Element (r, c) of every tile: [B, th, tw, C].
    return xq[:, r // 2:r // 2 + th, r % 2, c // 2:c // 2 + tw, c % 2]

  def v(i, j):
    return _signed_sum([(_WINOGRAD_BT[i, r] * _WINOGRAD_BT[j, c], d(r, c))
                        for r in range(4) for c in range(4)])

  # Stacks of 4, not one of 16: XLA:CPU does not fuse a concatenate of more than 8 operands.
  tiles = jnp.stack([jnp.stack([v(i, j) for j in range(4)]) for i in range(4)])
  return tiles.reshape((16,) + tiles.shape[2:])


def _input_transform_fwd(xq):
  return _input_transform(xq), None


def _input_transform_bwd(_, dv):
  def dd(r, c):  # Gradient of tile element (r, c): B dV B^T.
    return _signed_sum([(_WINOGRAD_BT[i, r] * _WINOGRAD_BT[j, c], dv[4 * i + j])
                        for i in range(4) for j in range(4)])

  def block(sr, sc):  # Block element (sr, sc) gets tile (t, u), (t - 1, u), (t, u - 1), ...
    return sum(jnp.pad(dd(2 * ot + sr, 2 * ou + sc),
                       ((0, 0), (ot, 1 - ot), (ou, 1 - ou), (0, 0)))
               for ot in range(2) for ou in range(2))

  dxq = jnp.stack([jnp.stack([block(sr, sc) for sc in range(2)], axis=3) for sr in range(2)],
                  axis=2)
  return (dxq,)


_input_transform.defvjp(_input_transform_fwd, _input_transform_bwd)


@jax.custom_vjp
def _output_transform(m):
  """A^T m A of every 4x4 tile of products.

  Args:
    m: [16, B, th, tw, Cout], tile position (i, j) at index 4 i + j.
  Returns:
    [B, th, 2, tw, 2, Cout]: the 2x2 output tiles.
  """
  def y(a, b):
    return _signed_sum([(_WINOGRAD_AT[a, i] * _WINOGRAD_AT[b, j], m[4 * i + j])
                        for i in range(4) for j in range(4)])

  return jnp.stack([jnp.stack([y(a, b) for b in range(2)], axis=3) for a in range(2)], axis=2)


def _output_transform_fwd(m):
  return _output_transform(m), None


def _output_transform_bwd(_, dy):
  dm = jnp.stack([jnp.stack([_signed_sum([(_WINOGRAD_AT[a, i] * _WINOGRAD_AT[b, j],
                                           dy[:, :, a, :, b])
                                          for a in range(2) for b in range(2)])
                             for j in range(4)]) for i in range(4)])
  return (dm.reshape((16,) + dm.shape[2:]),)


_output_transform.defvjp(_output_transform_fwd, _output_transform_bwd)


def _conv_winograd(x, kernel, padding, precision):
  b, h, w, cin = x.shape
  cout = kernel.shape[-1]
  ho, wo = output_size(h, 3, 1, padding, 1), output_size(w, 3, 1, padding, 1)
  th, tw = -(-ho // 2), -(-wo // 2)
  # Tiles cover padded rows 2t .. 2t+3; an odd output size gets one extra zero row (column),
  # whose outputs are cropped below.
  x = jnp.pad(x, ((0, 0), (padding, padding + 2 * th - ho), (padding, padding + 2 * tw - wo),
                  (0, 0)))
  v = _input_transform(x.reshape(b, th + 1, 2, tw + 1, 2, cin)).reshape(16, b * th * tw, cin)
  g = jnp.asarray(_WINOGRAD_G, kernel.dtype)
  u = jnp.einsum("ai,ijco,bj->abco", g, kernel, g, precision=lax.Precision.HIGHEST)
  m = lax.dot_general(v, u.reshape(16, cin, cout), (((2,), (1,)), ((0,), (0,))),
                      precision=precision)
  y = _output_transform(m.reshape(16, b, th, tw, cout)).reshape(b, 2 * th, 2 * tw, cout)
  return y[:, :ho, :wo]


def conv2d(x: jax.Array, kernel: jax.Array, *, stride: int = 1, padding: int = 0,
           dilation: int = 1, impl: str = "auto",
           precision: lax.PrecisionLike = None) -> jax.Array:
  """PyTorch `F.conv2d` (no bias) on NHWC.

  Args:
    x: [B, H, W, Cin].
    kernel: [kh, kw, Cin, Cout], same dtype as x.
    stride, padding, dilation: as in PyTorch (symmetric zero padding).
    impl: "auto" (the CPU choice of `choose_impl`), "xla", "matmul" or "winograd" (3x3,
      stride 1, undilated only).
  Returns:
    [B, Ho, Wo, Cout], Ho = `output_size(H, kh, stride, padding, dilation)`.
  """
  check_impl(impl, where="impl")
  if impl == "auto":
    impl = choose_impl(x.shape, kernel.shape, stride=stride, padding=padding,
                       dilation=dilation, dtype=x.dtype, backend="cpu")
  if impl == "xla":
    return _conv_xla(x, kernel, stride, padding, dilation, precision)
  if impl == "matmul":
    return _conv_matmul(x, kernel, stride, padding, dilation, precision)
  if not winograd_applies(kernel.shape, stride, dilation):
    raise ValueError(f"conv impl 'winograd' needs a 3x3 kernel, stride 1 and dilation 1; got "
                     f"kernel {tuple(kernel.shape[:2])}, stride {stride}, dilation {dilation}")
  return _conv_winograd(x, kernel, padding, precision)


@dataclasses.dataclass(frozen=True)
class ConvAlgorithm:
  """The `conv_fn` of `models.conv.Conv` for one model-wide algorithm (hashable, so a module field).

  Attributes:
    impl: "auto" (the per-conv choice of `choose_impl`), "matmul" or "winograd"; a
      model-wide "winograd" falls back to "matmul" where F(2x2, 3x3) does not apply (1x1,
      strided or dilated convs), so that one value can be set for a whole network.
  """
  impl: str

  def __call__(self, x: jax.Array, kernel: jax.Array, *, stride: int, padding: int,
               dilation: int) -> jax.Array:
    """x [B, H, W, Cin], kernel [kh, kw, Cin, Cout] -> [B, Ho, Wo, Cout] (see `conv2d`)."""
    impl = self.impl
    if impl == "winograd" and not winograd_applies(kernel.shape, stride, dilation):
      impl = "matmul"
    return conv2d(x, kernel, stride=stride, padding=padding, dilation=dilation, impl=impl)
