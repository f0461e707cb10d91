"""Compile targets: `tpu:v5e:2x2`, `cuda:h100:4`, ... -> a chip, its HBM and compile-only devices.

A target is `<platform>:<chip>:<shape>`: for TPUs the slice topology as Cloud TPU names it
(`v5e:2x2` is 4 chips, `v5p:2x2x4` 16), for GPUs the number of GPUs (8 per host). libtpu
gives one device per chip for v5e / v5p (megacore), one per TensorCore for v4 (two per chip,
sharing its HBM). Its devices
come from `jax.experimental.topologies.get_topology_desc`, which needs the `[aot]` extra: libtpu
compiles for any TPU topology on any host, the CUDA PJRT plugin for a GPU described by a
`GpuTargetConfigProto` text (the `targets/*.txtpb` files here, from the chips' published figures).
"""
from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import re
from typing import Any

GiB = 1 << 30
MiB = 1 << 20
TARGETS_DIR = pathlib.Path(__file__).resolve().parent / "targets"

# HBM per TPU chip, from the Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4,
# /v5e, /v5p, /v6e: "HBM2 capacity 32 GiB", "16 GiB", "95 GiB"; Trillium "32 GiB").
TPU_HBM = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB}

# GPU chips: their GpuTargetConfigProto file and memory as the device reports it (the NVIDIA A100
# and H100 datasheets: 40 / 80 GB HBM2(e), 80 GB HBM3; nvidia-smi shows 40960, 81920 and 81559 MiB).
GPUS = {"a100": ("a100_sxm_40.txtpb", 40960 * MiB), "a100_80": ("a100_sxm_80.txtpb", 81920 * MiB),
        "h100": ("h100_sxm.txtpb", 81559 * MiB)}
GPUS_PER_HOST = 8

EXAMPLES = "tpu:v5e:2x2, tpu:v4:2x2x1, tpu:v5p:2x2x4, cuda:h100:4, cuda:a100:8"


class TargetError(ValueError):
  """A `--target` that names no known chip or shape (the message names the flag)."""


@dataclasses.dataclass(frozen=True)
class Target:
  """A compile target.

  Attributes:
    name: as given, e.g. "tpu:v5e:2x2".
    platform: "tpu" or "cuda" (what `get_topology_desc` and `lowering_platforms` call it).
    chip: "v5e", "h100", ...
    shape: the TPU topology ("2x2") or the GPU count ("4").
    num_chips: chips in the target.
    hbm_bytes: memory of one chip.
  """
  name: str
  platform: str
  chip: str
  shape: str
  num_chips: int
  hbm_bytes: int


def parse(name: str) -> Target:
  """`tpu:<chip>:<topology>` or `cuda:<chip>:<count>` -> `Target`.

  Raises:
    TargetError naming `--target` when the platform, chip or shape is unknown.
  """
  parts = name.split(":")
  if len(parts) != 3:
    raise TargetError(f"--target={name}: expected <platform>:<chip>:<shape>, e.g. {EXAMPLES}")
  platform, chip, shape = parts
  if platform == "tpu":
    if chip not in TPU_HBM:
      raise TargetError(f"--target={name}: unknown TPU chip {chip!r}; known: {sorted(TPU_HBM)}")
    if not re.fullmatch(r"[1-9]\d*(x[1-9]\d*){1,2}", shape):
      raise TargetError(f"--target={name}: the TPU topology must look like 2x2 or 2x2x4")
    count = math.prod(int(d) for d in shape.split("x"))
    return Target(name, platform, chip, shape, count, TPU_HBM[chip])
  if platform in ("cuda", "gpu"):
    if chip not in GPUS:
      raise TargetError(f"--target={name}: unknown GPU {chip!r}; known: {sorted(GPUS)}")
    if not re.fullmatch(r"[1-9]\d*", shape):
      raise TargetError(f"--target={name}: the GPU count must be a positive integer")
    count = int(shape)
    if count > GPUS_PER_HOST and count % GPUS_PER_HOST:
      raise TargetError(f"--target={name}: more than {GPUS_PER_HOST} GPUs must be whole hosts "
                        f"of {GPUS_PER_HOST}")
    return Target(name, "cuda", chip, shape, count, GPUS[chip][1])
  raise TargetError(f"--target={name}: unknown platform {platform!r}; expected tpu or cuda")


def gpu_target_config(chip: str) -> str:
  """The `GpuTargetConfigProto` text of a GPU chip (`targets/*.txtpb`)."""
  return (TARGETS_DIR / GPUS[chip][0]).read_text()


def devices(target: Target) -> list[Any]:
  """The target's compile-only devices (they compile, they cannot run anything).

  Raises:
    RuntimeError when the `[aot]` extra (libtpu / the CUDA plugin) is not installed.
  """
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if target.platform == "tpu":
    topo = topologies.get_topology_desc(topology_name=f"{target.chip}:{target.shape}",
                                        platform="tpu")
  else:
    # The plugin refuses to load without a CUDA driver unless told that this host only compiles;
    # it reads this when JAX starts its first backend (scripts/aot_compile.py sets it earlier).
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    hosts = max(1, target.num_chips // GPUS_PER_HOST)
    topo = topologies.get_topology_desc(
        platform="cuda", target_config=gpu_target_config(target.chip),
        topology=f"1x{hosts}x{target.num_chips // hosts}")
  found = list(topo.devices)
  if len(found) % target.num_chips:
    raise RuntimeError(f"--target={target.name}: got {len(found)} devices for "
                       f"{target.num_chips} chips")
  return found


def hbm_per_device(target: Target, num_devices: int) -> int:
  """HBM of one device: a chip's, shared by its devices where each core is one (TPU v4)."""
  return target.hbm_bytes * target.num_chips // num_devices
