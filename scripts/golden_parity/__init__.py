"""Parity runners against the official PyTorch outputs in tests/golden.

Each golden case JSON names its `fixture` kind; `RUNNERS` maps a kind to a
function `run(case_json_path) -> list[dict]` returning one result row per
compared quantity with at least `case`, `max_abs_diff`, `tolerance`, `ok`.

Only scripts/parity.py and the tests use it, so it lives beside the script rather than in the
installed `pixcon_jax` package: the script imports it as a sibling (Python puts a script's own
folder on sys.path) and pytest finds it through `pythonpath = ["scripts"]` in pyproject.toml.
"""
from __future__ import annotations

import importlib
import pathlib
from typing import Callable

# fixture kind -> "module:function", imported lazily so a loss check does not build models.
_RUNNERS = {
    "model_eval": "golden_parity.models:run_model_eval",
    "backbone_train": "golden_parity.models:run_backbone_train",
    "contrastive_core": "golden_parity.losses:run_contrastive_core",
    "anchor_sampling": "golden_parity.losses:run_anchor_sampling",
    "contrast_loss_e2e": "golden_parity.losses:run_contrast_loss_e2e",
    "ce_weighted": "golden_parity.losses:run_ce_weighted",
    "resize_ops": "golden_parity.losses:run_resize_ops",
}


# Kinds whose runners build a network; they take `conv_impl=` (`pixcon_jax.models.conv`).
MODEL_FIXTURES = ("model_eval", "backbone_train")


def fixture_kinds() -> list[str]:
  return sorted(_RUNNERS)


def runner(kind: str) -> Callable[[pathlib.Path], list[dict]]:
  """Returns the parity runner of a fixture kind; ValueError names the known kinds."""
  if kind not in _RUNNERS:
    raise ValueError(f"unknown golden fixture kind {kind!r}; expected one of {fixture_kinds()}")
  module, fn = _RUNNERS[kind].split(":")
  return getattr(importlib.import_module(module), fn)
