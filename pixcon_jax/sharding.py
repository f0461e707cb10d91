"""Data-parallel mesh, shardings and host-local -> global arrays.

The project is data-parallel only (DESIGN.md decision 2): a 1-D mesh over axis
`'data'` spanning every device of every process, train state replicated, batch
sharded along its leading axis.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Any = None) -> Mesh:
  """A 1-D mesh over the given devices (default: every device of the run) with axis 'data'.

  `devices` may be those of another machine: `jax.experimental.topologies.get_topology_desc`
  gives compile-only TPU or GPU devices on a CPU host (`scripts/aot_compile.py`), and
  everything built from the mesh (models, state, steps, evaluator) then targets them. This
  default is the one place below `main` that asks JAX for the local devices.

  The axis is `Auto` rather than `jax.make_mesh`'s default `Explicit`: every
  collective is written by hand inside `shard_map`, and Auto keeps the plain
  `jit` code outside it (init, eval) free of sharding-in-types rules.
  """
  if devices is None:
    devices = jax.devices()
  return Mesh(np.asarray(devices).reshape(-1), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def mesh_platform(mesh: Mesh) -> str:
  """The platform of the mesh's devices ("cpu", "gpu", "tpu"): what models are built for."""
  return mesh.devices.flat[0].platform


def mesh_process_count(mesh: Mesh) -> int:
  """How many processes (hosts) the mesh's devices belong to."""
  return len({d.process_index for d in mesh.devices.flat})


def mesh_local_device_count(mesh: Mesh) -> int:
  """How many of the mesh's devices this process drives (the rows a host-local batch needs)."""
  return len(mesh.local_devices)


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of the train state: a full copy on every device."""
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch leaf: leading (batch) axis split over 'data'."""
  return NamedSharding(mesh, P(DATA_AXIS))


def batch_sizes(global_batch_size: int, *, num_processes: int,
                num_devices: int) -> tuple[int, int]:
  """Derives the per-process and per-device batch sizes from the global one.

  Args:
    global_batch_size: `config.data.batch_size` (images per step over all devices).
    num_processes: the mesh's processes (`mesh_process_count`).
    num_devices: the mesh's devices (`mesh.size`).
  Returns:
    (per_process, per_device).
  Raises:
    ValueError naming `config.data.batch_size` when it does not divide evenly.
  """
  if global_batch_size <= 0 or global_batch_size % num_devices:
    raise ValueError(
        f"config.data.batch_size={global_batch_size} must be a positive multiple of the number "
        f"of devices ({num_devices}, over {num_processes} process(es)); set e.g. "
        f"--config.data.batch_size={max(1, global_batch_size // num_devices or 1) * num_devices}")
  return global_batch_size // num_processes, global_batch_size // num_devices


def host_local_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles per-process batches into global arrays sharded over 'data'.

  Args:
    batch: this process's slice, each leaf [B_local, ...].
    mesh: the data mesh.
  Returns:
    the same keys, each leaf a global jax.Array [B_local * num_processes, ...].
  """
  sharding = data_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
