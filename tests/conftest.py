"""Shared pytest setup: absl flags, golden fixture location, small helpers."""
import os
import pathlib

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
