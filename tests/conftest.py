"""Shared pytest setup: absl flags, golden fixture location, small helpers."""
import os
import pathlib
import warnings

import pytest
from absl import flags

# grain's worker processes and absl-based code read flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()

REPO = pathlib.Path(__file__).resolve().parents[1]
# The official PyTorch reference outputs, a byte-identical copy of ../shared/golden
# (tests/test_golden_copy.py) kept in the repository so that a clone passes its own tests.
GOLDEN = REPO / "tests" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
  """Path to tests/golden (the official PyTorch reference outputs)."""
  return GOLDEN


@pytest.fixture(scope="session")
def parse_config_flags():
  """`parse(args) -> ConfigDict`: the config that pixcon_jax.main builds from its command line.

  `args` are the `--config=FILE[:arg]` and `--config.a.b=value` arguments of a main command
  (FILE relative to the repository root). They are parsed by `ml_collections.config_flags` as
  main defines its flag, on a fresh FlagValues; an unknown key, a type that cannot be
  overridden or a value that does not parse raises.
  """
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  def parse(args):
    argv = ["main"]
    for arg in args:
      if arg.startswith("--config="):
        arg = f"--config={REPO / arg.split('=', 1)[1]}"
      argv.append(arg)
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                    lock_config=True, sys_argv=argv)
    with warnings.catch_warnings():
      # config_flags loads the file with the deprecated `load_module()`: not ours to fix.
      warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
      flag_values(argv)
    return flag_values.config

  return parse


# ---- networks (test_hrnet, test_heads, test_convert, test_parity_models) ------------------------

@pytest.fixture(scope="session")
def quick_jit():
  """`quick_jit(fn, *args)`: jit, compile and run fn(*args) with XLA:CPU optimisations off.

  The test models are tiny, so compiling dominates; at backend optimisation level 0 a
  tiny HRNet init + forward compiles about 5x faster, with the same float32 arithmetic.
  """
  import jax  # pylint: disable=g-import-not-at-top

  def run(fn, *args):
    lowered = jax.jit(fn).lower(*args)
    if jax.default_backend() == "cpu":
      return lowered.compile(compiler_options={"xla_backend_optimization_level": 0})(*args)
    return lowered.compile()(*args)

  return run


# ---- a trained run's stand-in (test_segment, test_export) ------------------------------------

@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory) -> pathlib.Path:
  """A run directory as training leaves it (config.json, checkpoints of steps 1 and 2) of a
  4-32 channel HRNet with random weights (tests/segment_fixtures.py)."""
  import segment_fixtures  # pylint: disable=g-import-not-at-top
  return segment_fixtures.tiny_run(tmp_path_factory.mktemp("tiny_run") / "run")
