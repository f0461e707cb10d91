"""Full-width networks against the official PyTorch outputs (every model case in tests/golden).

These run the real HRNet-W48 / ResNet-101 sizes at the fixtures' small inputs;
on CPU each case takes roughly 20-40 s, most of it XLA compilation.
"""
import json
import pathlib

import pytest

import golden_parity as parity  # scripts/golden_parity/
from pixcon_jax import models

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"


def _model_cases() -> list[pathlib.Path]:
  cases = []
  for path in sorted(GOLDEN.glob("*.json")):
    try:
      kind = json.loads(path.read_text()).get("fixture")
    except (json.JSONDecodeError, OSError):
      continue
    if kind in parity.MODEL_FIXTURES:
      cases.append(path)
  return cases


def test_golden_folder_has_the_model_cases(golden_dir):
  names = {p.stem for p in _model_cases()}
  assert {"hrnet_w48_contrast", "hrnet_w48_ocr_contrast", "hrnet_w48_backbone_train"} <= names


@pytest.mark.parametrize("case", _model_cases(), ids=lambda p: p.stem)
def test_model_matches_official_outputs(case, golden_dir):
  meta = json.loads(case.read_text())
  if meta["fixture"] == "model_eval":
    assert meta["model"] in models.model_names(), f"model {meta['model']!r} is not registered"
  rows = parity.runner(meta["fixture"])(case)
  bad = [r for r in rows if not r["ok"]]
  assert rows and not bad, bad[:5]
  outputs = {r["output"] for r in rows}
  assert "backbone.0" in outputs
  if meta["fixture"] == "model_eval":
    assert set(meta["outputs"]) <= outputs


# At the fixtures' small inputs "auto" keeps most convs native (`conv.MATMUL_MIN_FLOPS`); these
# run the CPU algorithms of full-size training against the same official outputs: im2col in
# inference and in training mode (batch statistics and updated BN buffers), and Winograd
# wherever it applies. Training mode and Winograd are opt-in (`-m slow`: 2 minutes of
# compilation; tests/test_conv.py checks every algorithm against the native op in the suite).
@pytest.mark.parametrize("case_name,conv_impl", [
    ("hrnet_w48_contrast", "matmul"),
    pytest.param("hrnet_w48_backbone_train", "matmul", marks=pytest.mark.slow),
    pytest.param("hrnet_w48_contrast", "winograd", marks=pytest.mark.slow)])
def test_conv_algorithms_match_official_outputs(case_name, conv_impl, golden_dir):
  case = golden_dir / f"{case_name}.json"
  meta = json.loads(case.read_text())
  rows = parity.runner(meta["fixture"])(case, conv_impl=conv_impl)
  bad = [r for r in rows if not r["ok"]]
  assert rows and not bad, bad[:5]
