"""A fusion barrier for XLA:CPU, the `residual_out` hook of models built for the CPU."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def fusion_barrier(x: jax.Array) -> jax.Array:
  """x, materialised for XLA:CPU: XLA may not fuse the ops before it into the ops after it.

  `models.build_model` puts it on the outputs of residual blocks and HRNet branch fusions when
  the model's convs are the CPU algorithms (`cpu.conv`); models built for GPU and TPU (which
  fuse well), and an explicit "xla" on CPU, get the identity instead: one value, set where the
  model is built, picks the graph. XLA:CPU duplicates cheap elementwise producers into every
  consumer fusion, and a residual path is one long elementwise chain (BN, ReLU, sums of all
  previous blocks): without a barrier every backward ReLU mask of an HRNet stage recomputed the
  forward of the whole stage, per pixel, and the step ran 2x slower. XLA:CPU drops
  `lax.optimization_barrier` before fusion, so the barrier is a conditional, which XLA never
  fuses across, on a predicate it cannot fold: `x[0] == x[0]`. Its other branch only runs when
  x[0] is NaN and makes all of x NaN (a NaN loss stops the run either way). One extra copy of
  x, about a millisecond for an HRNet-W48 feature map.

  Args:
    x: any array.
  Returns:
    x (same shape and dtype).
  """
  first = x.reshape(-1)[0]
  return lax.cond(first == first, lambda v: v, lambda v: v * jnp.nan, x)
