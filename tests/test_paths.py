"""User paths: URLs stay URLs, local paths are `~`-expanded and absolute (pixcon_jax.paths)."""
import os

from pixcon_jax import paths


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
