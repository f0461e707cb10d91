"""XLA:CPU options of the entry points: dots on Eigen, and thunks scheduled for memory order.

jaxlib 0.10's XLA:CPU hands every dot to YNNPACK ("individual_dot" fusions). On this
project's matmuls (the im2col and Winograd products of the CPU convs, the projection head,
the contrast loss's similarities) Eigen's matmul is faster on the CPUs we measured: 164-183 vs
127-131 GFLOP/s for [16, 4096, 720] x [16, 720, 720] on two Zen 4 cores, and the HRNet-W48
CE train step (2 x 256x512, float32) took 5.5 s instead of 6.9-7.2 s. YNNPACK keeps the
reductions (BN statistics), where it beats XLA's own loops: with every YNNPACK fusion off the
step took 7.0 s.

XLA:CPU's default "concurrency-optimized" schedule orders the thunks so that independent branches
run at the same time; on the step's independent branches -- the projection head's backward beside
the classifier's and the backbone's -- two multi-threaded Eigen dots then share the two cores.
The memory-ordered schedule (`SEQUENTIAL_SCHEDULE`) runs them one after the other: in
`scripts/bench_train.py` (2-core EPYC, 2026-12-05) the paper recipe's time overhead over CE went
from 1.88 times its FLOP overhead to 0.94 and 0.66 (two runs), and the projection head's backward
inside the step from +0.57 s to +0.44 s (0.32 s alone), at +0.3 GB of XLA's peak for the CE
step. `scripts/bench_train.py --notune_xla_cpu` measures the defaults.

XLA reads XLA_FLAGS once, when the first backend starts, so `use_tuned_flags` runs before
that; `tuned_flags` is the pure decision. Both these flags and the huge-page restart
(`cpu.host_memory`) engage only when the run computes on the CPU (`runs_on_cpu`): a GPU or TPU
host keeps its XLA_FLAGS and its process, since an XLA build that does not know the flag
aborts, and host malloc is not where an accelerator step keeps its memory.

Which backend JAX will pick is decided before JAX starts, so it is inferred the way JAX would
find it: an installed GPU/TPU plugin counts only when its hardware is on this host
(`usable_accelerator_plugins`). With the compile-only extra (`pip install ".[aot]"`: libtpu and
the CUDA plugin) on a CPU host, JAX fails to start those backends and runs on the CPU, and so
the run keeps the CPU tuning.
"""
from __future__ import annotations

import fnmatch
import glob
import importlib.metadata
import importlib.util
import os
import pkgutil
from typing import Iterable, Mapping, MutableMapping, Sequence

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
EIGEN_DOTS = f"{YNN_FUSION_FLAG}=-individual_dot"
SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
SEQUENTIAL_SCHEDULE = f"{SCHEDULER_FLAG}=false"
TUNED = (EIGEN_DOTS, SEQUENTIAL_SCHEDULE)


def installed_accelerator_plugins() -> list[str]:
  """The GPU/TPU backends JAX would load here, found as JAX finds them, without importing them.

  Returns:
    names of `jax_plugins` entry points and `jax_plugins.*` modules (the CUDA and ROCm plugins,
    e.g. "xla_cuda12"), plus "libtpu" when the TPU runtime package is installed.
  """
  names = [ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")]
  spec = importlib.util.find_spec("jax_plugins")
  if spec is not None and spec.submodule_search_locations:
    names += [m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)]
  if importlib.util.find_spec("libtpu") is not None:
    names.append("libtpu")
  return sorted(set(names))


# Device files of each accelerator kind: what its driver creates when the hardware is there.
# NVIDIA: /dev/nvidia0.. (nvidia driver); AMD: /dev/kfd (ROCm); TPU: /dev/accel0.. (v2-v4) or
# VFIO groups /dev/vfio/<n> (v5e, v5p, v6e).
DEVICE_FILES = {"cuda": ("nvidia[0-9]*",), "rocm": ("kfd",), "tpu": ("accel[0-9]*", "vfio/[0-9]*")}


def accelerator_device_files(dev: str = "/dev") -> list[str]:
  """The GPU/TPU device files present under `dev` (`DEVICE_FILES`)."""
  return sorted(f for patterns in DEVICE_FILES.values() for p in patterns
                for f in glob.glob(os.path.join(dev, p)))


def _plugin_kind(name: str) -> str | None:
  for kind in DEVICE_FILES:
    if kind in name.lower():
      return kind
  return None


def usable_accelerator_plugins(installed: Sequence[str],
                               device_files: Iterable[str]) -> list[str]:
  """The installed plugins whose hardware is present, i.e. the backends JAX would start.

  Args:
    installed: `installed_accelerator_plugins()`, e.g. ["libtpu", "xla_cuda12"].
    device_files: `accelerator_device_files()`, e.g. ["/dev/nvidia0"].
  Returns:
    the names of `installed` whose kind ("cuda", "rocm", "tpu") has a device file; a plugin of
    an unknown kind counts as usable (it is not tuned for, rather than tuned against).
  """
  files = list(device_files)
  present = {kind for kind, patterns in DEVICE_FILES.items()
             if any(fnmatch.fnmatch(f, "*/" + p) for f in files for p in patterns)}
  return [p for p in installed if _plugin_kind(p) in present or _plugin_kind(p) is None]


def runs_on_cpu(environ: Mapping[str, str], accelerator_plugins: Sequence[str]) -> bool:
  """Whether JAX's default backend will be the CPU.

  Args:
    environ: the current environment (JAX_PLATFORMS).
    accelerator_plugins: the usable ones, `usable_accelerator_plugins(...)`.
  Returns:
    True when JAX_PLATFORMS starts with "cpu", or is unset and no usable GPU/TPU plugin is
    there (with one, JAX prefers that backend; an installed plugin without its hardware makes
    JAX fall back to the CPU).
  """
  platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    return platforms[0] == "cpu"
  return not accelerator_plugins


def tuned_flags(environ: Mapping[str, str],
                accelerator_plugins: Sequence[str] = ()) -> str | None:
  """The XLA_FLAGS value with the `TUNED` flags, or None to leave the environment as it is.

  Args:
    environ: the current environment.
    accelerator_plugins: the usable ones (`usable_accelerator_plugins`).
  Returns:
    XLA_FLAGS plus each `TUNED` flag whose name XLA_FLAGS does not set already (the user's
    choice, or an earlier call); None when there is none to add or the run is not on the CPU
    (`runs_on_cpu`).
  """
  if not runs_on_cpu(environ, accelerator_plugins):
    return None
  flags = environ.get("XLA_FLAGS", "")
  add = [f for f in TUNED if f.split("=")[0] not in flags]
  if not add:
    return None
  return " ".join(f for f in (flags, *add) if f)


def use_tuned_flags(environ: MutableMapping[str, str] = os.environ) -> bool:
  """Sets XLA_FLAGS in `environ` to `tuned_flags`; returns whether it changed.

  Call it before the first JAX computation: XLA reads XLA_FLAGS when its backend starts.
  """
  value = tuned_flags(environ, usable_accelerator_plugins(installed_accelerator_plugins(),
                                                          accelerator_device_files()))
  if value is None:
    return False
  environ["XLA_FLAGS"] = value
  return True
