"""Matmul precision of the jitted steps: `config.model.matmul_precision`.

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
