"""User paths: URLs stay URLs, local paths are `~`-expanded and absolute, from the command line
to where they are used (pixcon_jax.paths)."""
import os

from pixcon_jax import paths
from pixcon_jax.data import config_defaults
from pixcon_jax.data import datasets


def test_gs_url_is_kept_not_joined_to_the_working_directory():
  # os.path.abspath('gs://b/run') would be '<cwd>/gs:/b/run'.
  assert os.fspath(paths.resolve("gs://bucket/runs/a")) == "gs://bucket/runs/a"
  assert os.fspath(paths.resolve("gs://bucket/runs/a") / "checkpoints") == (
      "gs://bucket/runs/a/checkpoints")
  assert paths.is_url("gs://bucket") and paths.is_url("s3://b/k")
  assert not paths.is_url("/tmp/run") and not paths.is_url("gs:/tmp")


def test_local_paths_expand_the_home_directory_and_become_absolute(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.chdir(tmp_path)
  assert paths.resolve_str("~/runs/a") == str(tmp_path / "home" / "runs" / "a")
  assert paths.resolve_str("runs/b") == str(tmp_path / "runs" / "b")
  assert paths.resolve_str(None) is None

def test_data_dir_with_tilde_from_the_command_line_reaches_the_tfds_source(parse_config_flags):
  # The command of the README's Datasets section; it used to fail flag parsing (data_dir = None).
  config = parse_config_flags(["--config=configs/cityscapes_hrnet.py",
                               "--config.data.data_dir=~/tfds", "--config.init_from=~/ckpt/w48",
                               "--config.predict.output_dir=~/out"])
  assert config.data.data_dir == "~/tfds"  # The shell leaves the `~` after `=`.
  paths.expand_config_paths(config)
  home = os.path.expanduser("~")
  assert home != "~"
  assert config.data.data_dir == os.path.join(home, "tfds")
  assert config.init_from == os.path.join(home, "ckpt", "w48")
  assert config.predict.output_dir == os.path.join(home, "out")
  assert config.predict.input_dir == ""  # Unset keys stay unset.
  assert f"data_dir={os.path.join(home, 'tfds')!r}" in repr(
      datasets.make_source(config.data, "train"))


def test_tfds_keys_unset_with_none_or_empty_string_use_the_dataset_defaults():
  c = config_defaults.default_data_config("cityscapes")
  default = repr(datasets.make_source(c, "train"))
  assert "'cityscapes/semantic_segmentation'" in default and "data_dir=None" in default
  c.data_dir, c.tfds_name = "", ""
  assert repr(datasets.make_source(c, "train")) == default
  c.data_dir, c.tfds_name = "~/d", "my_builder"
  assert repr(datasets.make_source(c, "train")) == (
      f"TfdsSource('my_builder', split='train', data_dir={os.path.expanduser('~/d')!r})")
