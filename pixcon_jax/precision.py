"""Matmul precision of the jitted steps (`config.model.matmul_precision`), and the choice per platform.

The choice per platform (the experiment files' `bf16` word sets it: `--config=...py:bf16`):
- TPU and GPU: `:bf16`. Convolutions, BN outputs and activations in bfloat16 at the 'default'
  matmul precision (one MXU pass on a TPU; bf16 tensor cores on a GPU). Float32 stays where
  rounding would accumulate or decide: parameters and their SGD momentum (`train_step`), BN
  statistics and their running averages (`models.layers.BatchNorm`), every model output
  (`models.segmenter`: logits, embeddings), hence the CE and its reductions, the projection's L2
  normalisation (`models.projection`) and the contrast's similarities, log-sum-exp and means
  (`contrast.loss`), and the memory bank. The full-size step's per-chip memory and FLOPs at this
  setting are in docs/PERFORMANCE.md (`scripts/aot_compile.py`).
- CPU, and the parity tests against the official PyTorch outputs: float32 compute at 'highest'
  (a CPU computes float32 products either way; bf16 is not faster there).
Without `:bf16` a TPU runs float32 at 'highest': six bf16 passes per product, several times the
step time of `:bf16` for the same FLOPs.

On TPU a float32 matmul or convolution with the default precision runs single bf16 passes of
the MXU (about 3 significant digits per product); 'highest' asks for the float32 result
(6 passes, ~2-3x slower matmuls). GPUs read 'default' as TF32 where enabled. The setting is a
`jax.default_matmul_precision` context entered while a step is traced, so it is recorded on
every dot and convolution of its graph (ops that fix their own precision keep it); CPUs compute
float32 products either way.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import jax
import jax.numpy as jnp

PRECISIONS = ("default", "high", "highest")
F = TypeVar("F", bound=Callable[..., Any])


def matmul_precision(config: Any) -> str:
  """The configured precision; a missing key: 'highest' for float32 compute, else 'default'.

  Raises:
    ValueError naming `config.model.matmul_precision` when it is not one of `PRECISIONS`.
  """
  value = config.model.get("matmul_precision")
  if value is None:
    return "highest" if jnp.dtype(config.model.dtype) == jnp.float32 else "default"
  if value not in PRECISIONS:
    raise ValueError(f"config.model.matmul_precision={value!r}: expected one of {PRECISIONS}")
  return value


def with_matmul_precision(fn: F, precision: str) -> F:
  """`fn` traced (and run) under `jax.default_matmul_precision(precision)`."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.default_matmul_precision(precision):
      return fn(*args, **kwargs)
  return wrapped  # type: ignore[return-value]
