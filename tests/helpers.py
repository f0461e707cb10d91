"""Helpers only the tests use: the inverse weight conversion, a CLU-style metric constructor,
`pixcon_jax.main` run in the test's own process, and the environment of a JAX subprocess.

Importable from any test module (pytest puts tests/ on sys.path: `import helpers`).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
from typing import Any

from absl import logging as absl_logging
import flax
import jax
import numpy as np

from pixcon_jax import convert
from pixcon_jax import metrics


def flax_to_state_dict(variables: Any) -> dict[str, np.ndarray]:
  """The inverse of `convert.convert_state_dict`: Flax variables -> a torch-style state_dict.

  Numpy arrays in torch layouts (conv kernels [O, I, kh, kw], dense [out, in]), keys named by
  `convert.torch_leaf_name`; `num_batches_tracked` is not produced. Tests convert it back to
  check the round trip.
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  out = {}
  for path, value in flat.items():
    value = np.asarray(value)
    if path[0] == "params" and path[-1] == "kernel":
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    out[convert.torch_leaf_name(path)] = value
  return out


def confusion_metric(*, prediction: jax.Array, label: jax.Array, num_classes: int,
                     mask: jax.Array | None = None) -> metrics.ConfusionMatrix:
  """`metrics.ConfusionMatrix` of one batch: prediction / label [B, H, W], mask [B, 1, 1] or None."""
  return metrics.ConfusionMatrix.from_confusion(
      metrics.confusion_matrix(prediction, label, num_classes, mask))


def subprocess_env(*, devices: int | None = None, cache_dir: str | os.PathLike | None = None,
                   **extra: str) -> dict[str, str]:
  """The environment for a test's JAX subprocess: this process's, on the CPU, compiling fast.

  XLA:CPU's backend optimisation is off: the test models are tiny, so compiling dominates, and
  the HLO (so every counted FLOP and byte) is the same. Output is unbuffered.

  Args:
    devices: fake host CPU devices (`--xla_force_host_platform_device_count`); None: one.
    cache_dir: a persistent compilation cache that every program enters, so that a later run of
      the same program (a second seed, a resumed run) loads it instead of compiling.
    **extra: further variables, set last.
  Returns:
    The variables, for `subprocess.run(..., env=...)`.
  """
  xla = "--xla_backend_optimization_level=0"
  if devices is not None:
    xla = f"--xla_force_host_platform_device_count={devices} {xla}"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla, PYTHONUNBUFFERED="1")
  if cache_dir is not None:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.update(extra)
  return env


def run_main(*args: str) -> tuple[int, list[str]]:
  """`pixcon_jax.main` on `args` in this process -> (exit code, non-empty stderr lines).

  Adds `--nohugepages --notune_xla_cpu` (no restart, no XLA_FLAGS change). main's process-wide
  settings (os.environ, absl verbosity, the log filters) are put back afterwards, so later tests
  see the process as it was. Paths in `args` are relative to the current directory.
  """
  from pixcon_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  environ = dict(os.environ)
  absl_logger = logging.getLogger("absl")
  filters, level = list(absl_logger.filters), absl_logger.level
  verbosity = absl_logging.get_verbosity()
  quiet = {name: logging.getLogger(name).level for name in ("orbax", "grain")}
  err = io.StringIO()
  code = None
  try:
    with contextlib.redirect_stderr(err):
      try:
        main_lib.run(["main", "--nohugepages", "--notune_xla_cpu", *args])
      except SystemExit as e:
        code = e.code
  finally:
    os.environ.clear()  # main sets PYTHONWARNINGS for its own children.
    os.environ.update(environ)
    absl_logger.filters[:] = filters
    absl_logger.setLevel(level)
    absl_logging.set_verbosity(verbosity)
    for name, value in quiet.items():
      logging.getLogger(name).setLevel(value)
  return code, [line for line in err.getvalue().splitlines() if line.strip()]


def load_script(name: str) -> Any:
  """scripts/<name>.py as a module, loaded once per process (its absl flags are defined once).

  Several test files load the same script in one pytest worker; a second execution would define
  its absl flags again (DuplicateFlagError).
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  module_name = f"pixcon_scripts_{name}"
  if module_name not in sys.modules:
    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[module_name] = module
  return sys.modules[module_name]


# A 4-32 channel HRNet: configs/demo.py's topology with a seconds-long compile.
TINY_HRNET = dict(widths=(4, 8, 16, 32), stage_modules=(1, 1, 1), num_blocks=1, stem_width=8,
                  layer1_planes=4, layer1_blocks=1)


def tiny_demo_config(**overrides: Any) -> Any:
  """configs/demo.py:runlocal shrunk to a seconds-long init (TINY_HRNET, 32x32 crops)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py"
  spec = importlib.util.spec_from_file_location("demo_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("runlocal")
  c.model.overrides = ml_collections.ConfigDict(dict(TINY_HRNET, **overrides))
  c.model.proj_dim = 8
  c.data.batch_size = 2
  c.data.crop_size = (32, 32)
  c.data.synthetic_size = (32, 64)
  c.data.eval_pad_size = (32, 64)
  c.data.synthetic_num_train = 4
  c.data.synthetic_num_val = 2
  c.data.eval_batch_size = 2
  c.data.worker_count = 0
  c.memory.pixel_queue_size = 16
  c.checkpoint.async_save = False
  return c
