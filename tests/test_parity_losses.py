"""Every loss/op golden fixture (tests/golden) passes its parity runner."""
import jax
import pytest

import golden_parity as parity  # scripts/golden_parity/

FIXTURES = ["contrastive_core", "anchor_sampling", "contrast_loss_e2e", "ce_weighted",
            "resize_ops"]


@pytest.mark.parametrize("name", FIXTURES)
def test_loss_fixture_parity(golden_dir, name):
  path = golden_dir / f"{name}.json"
  with jax.default_matmul_precision("highest"):
    rows = parity.runner(name)(path)
  assert rows, f"{name}: the runner returned no rows"
  bad = [row for row in rows if not row["ok"]]
  assert not bad, bad
