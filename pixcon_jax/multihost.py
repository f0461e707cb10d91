"""Joining the processes of a multi-host run: whether and how to call `jax.distributed.initialize`.

`jax.distributed.initialize()` without arguments finds the coordinator, the process count and
this process's id itself on Cloud TPU (GKE and GCE), Slurm, Open MPI and Kubernetes indexed
jobs. `decide` reads the same signs of those environments from the environment variables
(JAX's own detection lives in private modules, which the package does not import), so an entry
point calls it with no arguments exactly where a cluster is there, keeps explicit flags for
other setups and stays single-process elsewhere. A GCE TPU VM is only known to JAX through its
metadata server: with the TPU runtime installed and no pod variable set, `initialize()` is tried
and a host where it finds no cluster (its documented ValueError) runs as one process.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Mapping, Sequence

import jax

# Variables JAX's Slurm detection requires (all of them), and Open MPI's launcher URI.
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
              "SLURM_LOCALID")
OMPI_URI = "OMPI_MCA_orte_hnp_uri"
# Cloud TPU on GKE lists the workers; multislice jobs name the coordinator.
TPU_POD_VARS = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")
MEGASCALE = "MEGASCALE_COORDINATOR_ADDRESS"

FLAGS, AUTO, PROBE, SINGLE = "flags", "auto", "probe", "single"


def _count(environ: Mapping[str, str], key: str) -> int:
  try:
    return int(environ.get(key, "1"))
  except ValueError:
    return 1


def decide(environ: Mapping[str, str], *, explicit: bool, tpu_runtime: bool,
           kubernetes: bool) -> tuple[str, str]:
  """How this process joins the others.

  Args:
    environ: the process environment.
    explicit: --coordinator_address was given.
    tpu_runtime: the `libtpu` package is installed.
    kubernetes: the `kubernetes` package is installed (JAX's Kubernetes detection needs it).
  Returns:
    (mode, what was found): mode FLAGS (initialize with the flags), AUTO (initialize() with no
    arguments: a cluster is there), PROBE (initialize() may find a GCE TPU pod through the
    metadata server; none found means one process) or SINGLE (do not initialize).
  """
  if explicit:
    return FLAGS, "explicit --coordinator_address"
  if all(k in environ for k in SLURM_VARS):
    n = _count(environ, "SLURM_NTASKS")
    if n > 1:
      return AUTO, f"Slurm job, {n} tasks"
    return SINGLE, "Slurm job with one task"
  if OMPI_URI in environ:
    n = _count(environ, "OMPI_COMM_WORLD_SIZE")
    if n > 1:
      return AUTO, f"Open MPI, {n} ranks"
    return SINGLE, "Open MPI with one rank"
  if tpu_runtime:
    if environ.get(MEGASCALE):
      return AUTO, f"Cloud TPU multislice ({MEGASCALE})"
    for key in TPU_POD_VARS:
      if environ.get(key, "").count(","):
        return AUTO, f"Cloud TPU pod ({key})"
    if not any(environ.get(k) for k in TPU_POD_VARS) and "TPU_SKIP_MDS_QUERY" not in environ:
      return PROBE, "TPU runtime without pod variables (GCE TPU VM?)"
    return SINGLE, "TPU runtime, no TPU pod"
  if "KUBERNETES_SERVICE_HOST" in environ and "JOB_COMPLETION_INDEX" in environ and kubernetes:
    return AUTO, "Kubernetes indexed job"
  return SINGLE, "no cluster environment"


def _installed(package: str) -> bool:
  return importlib.util.find_spec(package) is not None


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: Sequence[int] | None = None) -> str:
  """Joins the run's processes if there are several; returns one line saying what it did.

  With `coordinator_address` the explicit arguments are used as given; otherwise `decide` on
  this process's environment picks the automatic call or none. Call it before any JAX
  computation.
  """
  mode, found = decide(os.environ, explicit=coordinator_address is not None,
                       tpu_runtime=_installed("libtpu"), kubernetes=_installed("kubernetes"))
  if mode == FLAGS:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids)
    return f"jax.distributed.initialize({coordinator_address}, {num_processes} processes): {found}"
  if mode == AUTO:
    jax.distributed.initialize()
    return f"jax.distributed.initialize() auto-detected: {found}"
  if mode == PROBE:
    try:
      jax.distributed.initialize()
    except ValueError as e:  # No environment gave a coordinator address or process count.
      return f"single process: {found}; jax.distributed found no cluster ({e})"
    return f"jax.distributed.initialize() auto-detected: {found}"
  return f"single process: {found}"
