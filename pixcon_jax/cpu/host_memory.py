"""Host memory: run glibc's malloc on transparent huge pages for XLA:CPU.

XLA:CPU allocates the temporaries of every execution with malloc: several GB per HRNet-W48 train
step. glibc serves blocks that large with fresh `mmap` pages and unmaps them when freed, so each
step page-faults its way through all of them again (1.5 million minor faults in 10 runs of the
contrast loss at paper settings). With `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35)
malloc asks for transparent huge pages (`madvise`), which cuts the faults ~11x and the contrast
loss + gradient from ~0.5 s to 0.35 s on a 2-core CPU (`scripts/bench_contrast.py`).

glibc reads its tunables once, at process start, so the entry point re-executes itself with the
variable set (`reexec_with_hugepages`); `hugepage_environment` is the pure decision.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Mapping, Sequence

from pixcon_jax.cpu import xla_flags

TUNABLE = "glibc.malloc.hugetlb"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)


def _glibc_version() -> tuple[int, ...] | None:
  lib, version = platform.libc_ver()
  if lib != "glibc" or not version:
    return None
  try:
    return tuple(int(v) for v in version.split(".")[:2])
  except ValueError:
    return None


def _thp_setting() -> str:
  try:
    with open(THP_SETTING) as f:
      return f.read()
  except OSError:
    return ""


def hugepage_environment(environ: Mapping[str, str], *, glibc: tuple[int, ...] | None,
                         thp_setting: str,
                         accelerator_plugins: Sequence[str] = ()) -> dict[str, str] | None:
  """The environment to re-execute with, or None to keep this process as it is.

  Args:
    environ: the current environment.
    glibc: (major, minor) of the C library, None if it is not glibc.
    thp_setting: contents of /sys/kernel/mm/transparent_hugepage/enabled ("" if absent).
    accelerator_plugins: the usable ones (`xla_flags.usable_accelerator_plugins`).
  Returns:
    `environ` plus `GLIBC_TUNABLES=...:glibc.malloc.hugetlb=1`, or None when that would not
    help or was decided already: not glibc >= 2.35, huge pages disabled ("[never]"), a run
    that is not on the CPU (`xla_flags.runs_on_cpu`: a GPU or TPU host is never restarted), or
    GLIBC_TUNABLES already naming the tunable (set it to 0 there to opt out).
  """
  if glibc is None or glibc < MIN_GLIBC:
    return None
  if not thp_setting or "[never]" in thp_setting:
    return None
  if not xla_flags.runs_on_cpu(environ, accelerator_plugins):
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if TUNABLE in tunables:
    return None
  env = dict(environ)
  env["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, f"{TUNABLE}=1") if t)
  return env


def reexec_with_hugepages(command: Sequence[str]) -> None:
  """Replaces this process by `command` with huge pages on; returns if there is no need.

  Args:
    command: the command line that restarts this program, e.g.
      `[sys.executable, "-m", "pixcon_jax.main", *sys.argv[1:]]` or `[sys.executable, *sys.argv]`.
  Call it before any JAX backend starts. The process is replaced in place: its PID stays the
  same, so signals sent to it still arrive.
  """
  if not sys.platform.startswith("linux"):
    return
  env = hugepage_environment(os.environ, glibc=_glibc_version(), thp_setting=_thp_setting(),
                             accelerator_plugins=xla_flags.usable_accelerator_plugins(
                                 xla_flags.installed_accelerator_plugins(),
                                 xla_flags.accelerator_device_files()))
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(command[0], list(command), env)
