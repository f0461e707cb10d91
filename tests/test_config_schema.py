"""The config schema covers every key, and each wrong value ends `main` in one line naming its key.

The cases are generated from the schema (`config_schema.KEYS` and `CROSS`): every key's rule
carries command-line values it must refuse, and each goes through `main.run` in this process
(no subprocess, no compile: the check runs before any tracing), which must exit 2 with a last
line `error: ... config.<key> ...` and leave no workdir behind. A config key without a rule
fails `test_every_config_key_has_a_rule`, listing it.
"""
import importlib
import os
import pathlib
import subprocess
import sys

import pytest

import helpers

from configs import common
from pixcon_jax import config_schema
from pixcon_jax import validation

REPO = pathlib.Path(__file__).resolve().parents[1]
# Every experiment file of configs/.
EXPERIMENTS = sorted(p.stem for p in (REPO / "configs").glob("*.py")
                     if p.stem not in ("__init__", "common"))
# Every config and every arg word (keys a variant adds need rules too).
VARIANTS = (None, *common.KNOWN_ARGS)


def _config(name, arg):
  return importlib.import_module(f"configs.{name}").get_config(arg)


def _configs():
  for name in EXPERIMENTS:
    for arg in VARIANTS:
      yield f"{name}:{arg}", _config(name, arg)


def test_every_config_key_has_a_rule():
  keys = {key for _, config in _configs() for key in config_schema.leaf_keys(config)}
  without = sorted(keys - set(config_schema.KEYS))
  assert not without, f"config keys without a rule in config_schema.KEYS: {without}"


def test_every_rule_has_a_wrong_value_and_names_a_config_key():
  keys = {key for _, config in _configs() for key in config_schema.leaf_keys(config)}
  crossed = {rule.key for rule in config_schema.CROSS}
  untested = sorted(k for k, rule in config_schema.KEYS.items()
                    if not rule.wrong and k not in crossed)
  assert not untested, f"keys with no wrong value in their rule or a cross rule: {untested}"
  stale = sorted((set(config_schema.KEYS) | crossed) - keys)
  assert not stale, f"rules for keys no config has: {stale}"


@pytest.mark.parametrize("name", EXPERIMENTS)
@pytest.mark.parametrize("arg", VARIANTS)
def test_shipped_configs_pass(name, arg):
  config_schema.check_config(_config(name, arg))


def _cases():
  for key, rule in config_schema.KEYS.items():
    for value in rule.wrong:
      yield pytest.param(key, (f"--config.{key}={value}",), id=f"{key}={value}")
  for rule in config_schema.CROSS:
    yield pytest.param(rule.key, rule.wrong, id=f"cross:{rule.key}:{' '.join(rule.wrong)}")


@pytest.fixture
def run_main(tmp_path, monkeypatch):
  """`run(*overrides) -> (exit code, stderr lines)` of main on configs/demo.py:runlocal."""
  monkeypatch.chdir(REPO)  # main's config path and the cases' folders are relative to it.
  workdir = tmp_path / "run"

  def run(*overrides):
    return helpers.run_main("--config=configs/demo.py:runlocal", f"--workdir={workdir}",
                            *overrides)

  run.workdir = workdir
  return run


@pytest.mark.parametrize("key, overrides", list(_cases()))
def test_a_wrong_value_ends_main_in_one_line_naming_the_key(key, overrides, run_main):
  code, lines = run_main(*overrides)
  assert code == validation.EXIT_BAD_INPUT, lines[-5:]
  assert lines and lines[-1].startswith(("error: config.", "error: --config.",
                                         "error: flag --config.")), lines[-5:]
  assert f"config.{key}=" in lines[-1], lines[-5:]
  assert not any("Traceback" in line for line in lines)
  assert not run_main.workdir.exists()  # Checked before anything was written.


def test_a_near_miss_name_is_answered_with_the_registered_names(run_main):
  code, lines = run_main("--config.model.name=hrnet_w18_contrst")
  assert code == validation.EXIT_BAD_INPUT
  assert lines[-1].startswith("error: config.model.name='hrnet_w18_contrst': expected one of ")
  assert "hrnet_w48_ocr_contrast" in lines[-1]  # The registry's names, not a copy.
  assert lines[-1].endswith("(did you mean 'hrnet_w18_contrast'?)")


def test_a_registered_name_is_accepted_without_a_schema_change(monkeypatch):
  """Names are read from the registries at check time: a new model needs no schema edit."""
  from pixcon_jax.models import registry  # pylint: disable=g-import-not-at-top
  config = importlib.import_module("configs.demo").get_config("runlocal")
  config.model.name = "hrnet_w18_contrast_v2"
  with pytest.raises(validation.ConfigError, match=r"^config\.model\.name="):
    config_schema.check_config(config)
  monkeypatch.setitem(registry._MODELS, "hrnet_w18_contrast_v2",  # pylint: disable=protected-access
                      registry._MODELS["hrnet_w18_contrast"])  # pylint: disable=protected-access
  config_schema.check_config(config)


def test_batch_sizes_are_checked_against_the_devices():
  config = importlib.import_module("configs.demo").get_config("runlocal")
  config.data.batch_size = 6
  with pytest.raises(validation.ConfigError, match=r"^config\.data\.batch_size=6 must be a "
                     r"positive multiple of the number of devices \(4"):
    config_schema.check_devices(config, num_processes=2, num_devices=4)
  config.mode = "eval"  # Only training splits data.batch_size.
  config_schema.check_devices(config, num_processes=2, num_devices=4)
  config.data.eval_batch_size = 3
  with pytest.raises(validation.ConfigError, match=r"^config\.data\.eval_batch_size=3: expected "
                     r"a multiple of the process count \(2\)$"):
    config_schema.check_devices(config, num_processes=2, num_devices=4)


def test_a_value_of_the_wrong_type_is_one_line_naming_the_flag(run_main):
  code, lines = run_main("--config.loss.ohem=maybe")
  assert (code, lines[-1]) == (2, "error: --config.loss.ohem=maybe: Non-boolean argument to "
                                  "boolean flag")
  code, lines = run_main("--config.schedule.total_steps=ten")
  assert code == 2 and lines[-1].startswith("error: flag --config.schedule.total_steps=ten: ")


def test_main_imports_nothing_heavy_before_the_check():
  """The modules the schema reads its names from load no TensorFlow (CLU, TFDS) before it runs."""
  code = ("import sys\nfrom pixcon_jax import config_schema, main\n"
          "heavy = ('tensorflow', 'clu', 'tensorflow_datasets')\n"
          "print(sorted(m for m in heavy if m in sys.modules))")
  p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                     timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert p.returncode == 0, p.stderr[-2000:]
  assert p.stdout.strip() == "[]", p.stdout
