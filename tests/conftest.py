"""Shared pytest setup: absl flags, golden fixture location, small helpers."""
import os
import pathlib

import pytest
from absl import flags

# grain's worker processes and absl-based code read flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = REPO.parent / "shared" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
  """Path to ../shared/golden (the official PyTorch reference outputs)."""
  if not GOLDEN.is_dir():
    raise FileNotFoundError(
        f"golden fixtures not found at {GOLDEN}; CI keeps ../shared beside the checkout")
  return GOLDEN
