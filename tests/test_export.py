"""scripts/export.py: a jax.export artifact that runs where pixcon_jax cannot be imported.

The export of the tiny run (conftest `tiny_run_dir`) is reloaded in a fresh interpreter with a
clean environment, its working directory outside the repository and an import hook that
refuses pixcon_jax and configs; its labels must equal `load_segmenter`'s.
"""
import functools
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import pixcon_jax
from pixcon_jax import validation

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "export.py"

# Runs in the fresh process: only jax, numpy and the export's own load_segmenter.py.
_RELOAD = textwrap.dedent("""
    import importlib.abc, importlib.util, sys
    class Refuse(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pixcon_jax", "configs"):
          raise ImportError("refused " + name)
    sys.meta_path.insert(0, Refuse())
    try:
      import pixcon_jax
    except ImportError:
      pass
    else:
      raise SystemExit("pixcon_jax was importable")
    import numpy as np
    export_dir, images, out = sys.argv[1:4]
    sys.path.insert(0, export_dir)
    from load_segmenter import load
    segment = load(export_dir)
    batch = np.load(images)
    np.save(out, np.stack([segment(batch), segment(batch[::-1])]))
    print("modules", sorted(m for m in sys.modules if m.startswith(("pixcon", "configs"))))
""")


def _export(args, cwd):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300, check=False)


def test_export_reloads_without_pixcon_jax_and_equals_load_segmenter(tiny_run_dir, tmp_path):
  out = tmp_path / "export"
  res = _export([f"--workdir={tiny_run_dir}", f"--out={out}", "--image_size=24,40"], tmp_path)
  assert res.returncode == 0, res.stderr[-2000:]
  meta = json.loads((out / "segmenter.json").read_text())
  assert meta["input_shape"] == ["b", 24, 40, 3]  # any batch size
  assert meta["platforms"] == ["cpu"] and len(meta["palette"]) == meta["num_classes"]

  images = np.random.default_rng(3).integers(0, 256, (2, 24, 40, 3), dtype=np.uint8)
  np.save(tmp_path / "images.npy", images)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "JAX_PLATFORMS": "cpu",
         "HOME": str(elsewhere)}  # no PYTHONPATH: the repository is not on the path
  res = subprocess.run(
      [sys.executable, "-c", _RELOAD, str(out), str(tmp_path / "images.npy"),
       str(tmp_path / "labels.npy")],
      cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert res.returncode == 0, res.stderr[-2000:]
  assert "modules []" in res.stdout
  exported = np.load(tmp_path / "labels.npy")

  seg = pixcon_jax.load_segmenter(str(tiny_run_dir))
  ours = seg(images)
  assert exported.shape == (2, 2, 24, 40) and exported.dtype == np.int32
  np.testing.assert_array_equal(exported[0], ours)
  np.testing.assert_array_equal(exported[1], ours[::-1])
  assert len(np.unique(ours)) > 1


def test_bad_input_is_one_error_line_and_exit_2(tmp_path):
  res = _export([f"--workdir={tmp_path / 'missing_run'}", f"--out={tmp_path / 'x'}",
                 "--image_size=24,40"], tmp_path)
  assert res.returncode == validation.EXIT_BAD_INPUT, res.stderr[-2000:]
  errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
  assert errors == [res.stderr.strip().splitlines()[-1]]
  assert "missing_run" in errors[0] and "no such file or directory" in errors[0]
  assert "Traceback" not in res.stderr
  assert not (tmp_path / "x").exists()


@functools.cache  # the script defines absl flags: load it once
def _script():
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("export_script", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("batch, size, message", [
    ("b", ["24"], r"--image_size='24': expected H,W"),
    ("0", ["24", "40"], r"--batch='0': expected a positive int or a symbolic"),
    ("b", ["24", "4.5"], r"--image_size='4.5'"),
])
def test_bad_shapes_name_the_flag(batch, size, message):
  with pytest.raises(validation.InputError, match=message):
    _script().input_shape(batch, size)


def test_symbolic_image_size_runs_any_size_and_multi_scale_is_refused(tiny_run_dir, tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  seg = pixcon_jax.load_segmenter(str(tiny_run_dir))
  meta = _script().write_export(seg, tmp_path / "e", ["b", "h", "w", 3])
  assert meta["input_shape"] == ["b", "h", "w", 3]
  exported = jax.export.deserialize(bytearray((tmp_path / "e" / "segmenter.jax").read_bytes()))
  rng = np.random.default_rng(5)
  for shape in ((2, 24, 40, 3), (1, 19, 33, 3)):  # odd sizes too
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(exported.call(images)), seg(images))
  # Multi-scale resizes to int(H * scale): a symbolic H cannot be scaled.
  multi = pixcon_jax.load_segmenter(str(tiny_run_dir), protocol="paper")
  with pytest.raises(validation.InputError, match=r"needs a static image size: give "
                                                   r"--image_size as ints"):
    _script().write_export(multi, tmp_path / "m", ["b", "h", "w", 3])
  assert not (tmp_path / "m").exists()


@pytest.mark.slow  # TensorFlow's import and the SavedModel write take ~30 s
def test_saved_model_gives_the_same_labels(tiny_run_dir, tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  seg = pixcon_jax.load_segmenter(str(tiny_run_dir))
  _script().write_export(seg, tmp_path / "e", ["b", 24, 40, 3], saved_model=True)
  images = np.random.default_rng(4).integers(0, 256, (3, 24, 40, 3), dtype=np.uint8)
  loaded = tf.saved_model.load(str(tmp_path / "e" / "saved_model"))
  np.testing.assert_array_equal(loaded.segment(tf.constant(images)).numpy(), seg(images))
