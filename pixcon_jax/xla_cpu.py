"""XLA:CPU options of the entry points: matrix products on Eigen instead of YNNPACK.

jaxlib 0.10's XLA:CPU hands every dot to YNNPACK ("individual_dot" fusions). On this
project's matmuls (the im2col and Winograd products of the CPU convs, the projection head,
the contrast loss's similarities) Eigen's matmul is faster on the CPUs we measured: 164-183 vs
127-131 GFLOP/s for [16, 4096, 720] x [16, 720, 720] on two Zen 4 cores, and the HRNet-W48
CE train step (2 x 256x512, float32) took 5.5 s instead of 6.9-7.2 s. YNNPACK keeps the
reductions (BN statistics), where it beats XLA's own loops: with every YNNPACK fusion off the
step took 7.0 s. `scripts/bench_train.py --noeigen_dots` measures the default.

XLA reads XLA_FLAGS once, when the first backend starts, so `use_eigen_dots` runs before
that; `eigen_dot_flags` is the pure decision. GPU and TPU compiles ignore the flag.
"""
from __future__ import annotations

import os
from typing import Mapping, MutableMapping

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
EIGEN_DOTS = f"{YNN_FUSION_FLAG}=-individual_dot"


def compiles_for_cpu(environ: Mapping[str, str]) -> bool:
  """Whether JAX may run on the CPU: JAX_PLATFORMS unset, or a list that names "cpu"."""
  platforms = environ.get("JAX_PLATFORMS", "")
  return not platforms or "cpu" in platforms.split(",")


def eigen_dot_flags(environ: Mapping[str, str]) -> str | None:
  """The XLA_FLAGS value with dots on Eigen, or None to leave the environment as it is.

  Args:
    environ: the current environment.
  Returns:
    XLA_FLAGS plus `EIGEN_DOTS`, or None when XLA_FLAGS already sets the YNNPACK fusion
    types (the user's choice, or an earlier call) or JAX_PLATFORMS leaves out the CPU.
  """
  if not compiles_for_cpu(environ):
    return None
  flags = environ.get("XLA_FLAGS", "")
  if YNN_FUSION_FLAG in flags:
    return None
  return " ".join(f for f in (flags, EIGEN_DOTS) if f)


def use_eigen_dots(environ: MutableMapping[str, str] = os.environ) -> bool:
  """Sets XLA_FLAGS in `environ` so that XLA:CPU runs dots on Eigen; returns whether it did.

  Raises:
    RuntimeError: a JAX backend has started already, so the flag would not take effect.
  """
  value = eigen_dot_flags(environ)
  if value is None:
    return False
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    raise RuntimeError("use_eigen_dots() must run before the first JAX computation: XLA reads "
                       "XLA_FLAGS when its backend starts")
  environ["XLA_FLAGS"] = value
  return True
