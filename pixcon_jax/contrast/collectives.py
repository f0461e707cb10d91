"""Reductions over the devices that evaluate one contrast loss together.

The global-batch contrast splits its work over the mesh axis (see `loss.py`, "Work split over
devices"): every device holds all anchors, the pool entries drawn from its own images and its
slice of the memory pools. A reduction over pool entries -- a count, a maximum, a sum -- is then
also a reduction over devices. Each helper here is that one reduction, and the identity with
`axis_name=None` (one device, or a loss that each device evaluates on its own), so that the
loss has one code path for both.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

AxisName = str | None


def size(axis_name: AxisName) -> int:
  """Number of devices along the axis (static); 1 without an axis."""
  return 1 if axis_name is None else int(lax.axis_size(axis_name))


def index(axis_name: AxisName) -> jax.Array | int:
  """This device's position along the axis; 0 without an axis."""
  return 0 if axis_name is None else lax.axis_index(axis_name)


def psum(x: jax.Array, axis_name: AxisName) -> jax.Array:
  return x if axis_name is None else lax.psum(x, axis_name)


def pmax(x: jax.Array, axis_name: AxisName) -> jax.Array:
  """Maximum over devices. Not differentiable: callers pass detached values."""
  return x if axis_name is None else lax.pmax(lax.stop_gradient(x), axis_name)


def concat_last(x: jax.Array, axis_name: AxisName) -> jax.Array:
  """[..., n] on each device -> [..., N * n], device d's entries at [d * n, (d + 1) * n).

  A psum of each device's block placed in zeros, rather than an all_gather, so that the result
  is typed device-invariant (shard_map's replication check) like the selections made from it.
  Not differentiable (+inf entries are not supported; -inf is). Callers pass detached scores.
  """
  if axis_name is None:
    return x
  n = lax.axis_size(axis_name)
  mine = jnp.arange(n) == lax.axis_index(axis_name)  # [N]
  blocks = jnp.where(mine[:, None], lax.stop_gradient(x)[..., None, :], 0)  # [..., N, n]
  return lax.psum(blocks, axis_name).reshape(x.shape[:-1] + (n * x.shape[-1],))


def offset(count: jax.Array, axis_name: AxisName) -> jax.Array:
  """Sum of `count` over the devices before this one along the axis (0 without an axis).

  Args:
    count: [...] int, this device's count.
  Returns:
    [...] int: where this device's entries start in the order of all devices' entries.
  """
  if axis_name is None:
    return jnp.zeros_like(count)
  counts = concat_last(count[..., None], axis_name)  # [..., N]
  before = jnp.arange(counts.shape[-1]) < lax.axis_index(axis_name)
  return jnp.sum(jnp.where(before, counts, 0), axis=-1).astype(count.dtype)


def scatter_rows(x: jax.Array, axis_name: AxisName) -> jax.Array:
  """Sum over devices of [R, ...] blocks, each device keeping its contiguous R / N rows.

  A reduce-scatter: every device writes the rows it holds into zeros, and device d receives rows
  [d R / N, (d + 1) R / N) of the sum. Differentiable (its transpose is an all-gather of the
  rows' gradients). R must be a multiple of N.
  """
  if axis_name is None:
    return x
  return lax.psum_scatter(x, axis_name, scatter_dimension=0, tiled=True)
