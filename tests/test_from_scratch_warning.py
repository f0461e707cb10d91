"""A new run on a real dataset without `init_from` warns once, at start (issue 26 item 3)."""
import importlib
import logging
import types

import pytest

from pixcon_jax import sharding
from pixcon_jax import train

REAL = ("cityscapes_hrnet", "cityscapes_hrnet_ocr", "cityscapes_resnet101_deeplabv3",
        "cityscapes_resnet101_ocr", "pascal_context_hrnet_ocr", "coco_stuff_hrnet_ocr")


def _config(name, arg=None):
  return importlib.import_module(f"configs.{name}").get_config(arg)


@pytest.mark.parametrize("name", REAL)
def test_real_dataset_configs_warn_without_init_from(name):
  c = _config(name)
  message = train.from_scratch_warning(c)
  backbone = "HRNetV2-W48" if c.model.name.startswith("hrnet") else "ResNet-101"
  assert message and "\n" not in message
  assert f"ImageNet {backbone}" in message and train.README_SECTION in message
  assert "config.init_from" in message and c.data.dataset in message
  c.init_from = "/ckpt/hrnet_w48_imagenet"
  assert train.from_scratch_warning(c) is None


def test_the_synthetic_demo_does_not_warn():
  assert train.from_scratch_warning(_config("demo")) is None


class _Stop(Exception):
  pass


def test_train_logs_the_warning_once_before_initialising(monkeypatch, tmp_path, caplog):
  """train_and_evaluate up to the fresh state, with everything it builds stubbed (no compile)."""
  c = _config("cityscapes_hrnet", "runlocal")
  monkeypatch.setattr(train.setup, "for_training", lambda config, mesh=None: types.SimpleNamespace(
      batch_per_process=1, batch_per_device=1, mesh=sharding.make_mesh()))
  monkeypatch.setattr(train.setup, "abstract_state", lambda exp: None)
  monkeypatch.setattr(train.data_lib, "make_train_iterator", lambda *a, **k: None)
  monkeypatch.setattr(train.checkpointing, "make_manager",
                      lambda *a, **k: types.SimpleNamespace(close=lambda: None))
  monkeypatch.setattr(train.checkpointing, "restore_latest_readable", lambda *a, **k: None)

  def initial_state(exp):
    raise _Stop

  monkeypatch.setattr(train.setup, "initial_state", initial_state)
  with caplog.at_level(logging.WARNING), pytest.raises(_Stop):
    train.train_and_evaluate(c, str(tmp_path))
  lines = [r.getMessage() for r in caplog.records if "config.init_from is not set" in r.getMessage()]
  assert lines == [train.from_scratch_warning(c)]
