"""Mode predict: PNGs of each image's own size, non-image files skipped with a report,
an empty folder is an error naming it."""
import importlib.util
import json
import pathlib

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from pixcon_jax import predict

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(widths=(8, 16, 32, 64), stage_modules=(1, 1, 1), num_blocks=1, stem_width=16,
            layer1_planes=8, layer1_blocks=1)


def random_variables(model, seed: int = 0) -> dict:
  """He-normal kernels, unit BN: no `model.init` run, so no compile (seconds saved per test)."""
  import flax
  from pixcon_jax import checkpointing
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(checkpointing.variable_shapes(model)))
  out = {}
  for path, leaf in flat.items():
    if path[-1] == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      out[path] = (rng.standard_normal(leaf.shape) * np.sqrt(1.0 / fan_in)).astype(np.float32)
    elif path[-1] in ("scale", "var"):
      out[path] = np.ones(leaf.shape, np.float32)
    else:
      out[path] = np.zeros(leaf.shape, np.float32)
  return flax.traverse_util.unflatten_dict(out)


def demo_config(tmp_path: pathlib.Path, **eval_overrides) -> ml_collections.ConfigDict:
  """configs/demo.py:runlocal with tiny widths and converted-style weights in `init_from`."""
  spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("runlocal")
  config.model.overrides = ml_collections.ConfigDict(TINY)
  config.model.proj_dim = 16
  config.data.batch_size = 2
  config.data.eval_batch_size = 2
  config.data.worker_count = 0
  for k, v in eval_overrides.items():
    config.eval[k] = v
  from pixcon_jax import setup
  model = setup.build_model(config, train=False)
  variables = random_variables(model)
  path = tmp_path / "converted"
  ocp.PyTreeCheckpointer().save(str(path), jax.tree.map(np.asarray, dict(variables)))
  config.init_from = str(path)
  config.init_from_scope = "full"
  return config


def test_empty_folder_is_an_error_naming_it(tmp_path):
  empty = tmp_path / "empty_inputs"
  empty.mkdir()
  config = ml_collections.ConfigDict(dict(predict=dict(input_dir=str(empty),
                                                       output_dir=str(tmp_path / "out"))))
  with pytest.raises(ValueError, match="empty_inputs"):
    predict.predict_folder(config, str(tmp_path / "work"))


def test_missing_input_dir_flag_is_an_error(tmp_path):
  config = ml_collections.ConfigDict(dict(predict=dict(input_dir="", output_dir="x")))
  with pytest.raises(ValueError, match="predict.input_dir"):
    predict.predict_folder(config, str(tmp_path))


def test_predict_writes_pngs_of_image_size_and_skips_non_images(tmp_path):
  inputs = tmp_path / "inputs"
  inputs.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(inputs / "a.png")
  Image.fromarray(rng.integers(0, 255, (33, 41, 3), dtype=np.uint8)).save(inputs / "b.jpg")
  Image.fromarray(rng.integers(0, 255, (50, 70), dtype=np.uint8)).save(inputs / "gray.png")
  (inputs / "notes.txt").write_text("not an image")
  out = tmp_path / "out"
  config = demo_config(tmp_path)
  config.predict = ml_collections.ConfigDict(dict(input_dir=str(inputs), output_dir=str(out)))
  report = predict.predict_folder(config, str(tmp_path / "work"))

  assert [s["input"] for s in report["skipped"]] == ["notes.txt"]
  sizes = {"a": (70, 50), "b": (41, 33), "gray": (70, 50)}  # PIL sizes are (W, H)
  num_classes = config.model.num_classes
  for stem, size in sizes.items():
    label = Image.open(out / "label" / f"{stem}.png")
    color = Image.open(out / "color" / f"{stem}.png")
    assert label.size == size and color.size == size
    assert label.mode == "L" and color.mode == "RGB"
    assert np.asarray(label).max() < num_classes
  on_disk = json.loads((out / "predict_report.json").read_text())
  assert len(on_disk["written"]) == 3 and on_disk["skipped"][0]["input"] == "notes.txt"


def test_output_names_keep_extension_on_stem_clash():
  assert predict.output_names(["a.png", "a.jpg", "b.png"]) == {
      "a.png": "a_png", "a.jpg": "a_jpg", "b.png": "b"}


def test_main_predict_mode_command_line(tmp_path):
  """`python -m pixcon_jax.main ... --config.mode=predict --config.predict.input_dir=...`."""
  import os
  import subprocess
  import sys
  import textwrap
  config = demo_config(tmp_path)  # writes the converted-style weights
  cfg_file = tmp_path / "predict_config.py"
  cfg_file.write_text(textwrap.dedent(f"""
      import importlib.util, ml_collections
      def get_config(arg=None):
        spec = importlib.util.spec_from_file_location("demo", {str(REPO / "configs" / "demo.py")!r})
        m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
        c = m.get_config("runlocal")
        c.model.overrides = ml_collections.ConfigDict({TINY!r})
        c.model.proj_dim = 16
        c.data.batch_size = 2
        c.data.eval_batch_size = 2
        c.init_from = {config.init_from!r}
        c.init_from_scope = "full"
        if "predict" not in c:  # until configs/common.py has the group
          c.predict = ml_collections.ConfigDict(dict(input_dir="", output_dir=""))
        return c
  """))
  inputs = tmp_path / "in"
  inputs.mkdir()
  Image.fromarray(np.zeros((30, 45, 3), np.uint8)).save(inputs / "x.jpg")
  (inputs / "readme.md").write_text("# not an image")
  out = tmp_path / "out"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "pixcon_jax.main", f"--config={cfg_file}",
       f"--workdir={tmp_path / 'work'}", "--config.mode=predict",
       f"--config.predict.input_dir={inputs}", f"--config.predict.output_dir={out}"],
      env=env, capture_output=True, text=True, timeout=600, cwd=str(REPO))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "readme.md" in proc.stdout + proc.stderr
  assert Image.open(out / "label" / "x.png").size == (45, 30)
  assert Image.open(out / "color" / "x.png").size == (45, 30)


def test_label_id_maps_are_found_and_read_by_cityscapesscripts(tmp_path):
  """label_format=label_id: raw ids 0..33 (uint8) under a name the benchmark's evaluator pairs
  with its ground truth (`getPrediction` matches `<city>_<seq>_<frame>*.png`)."""
  from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs_eval
  from cityscapesscripts.helpers import labels as cs_labels
  from pixcon_jax.data import cityscapes, classes
  id_lut = classes.train_id_to_id_lut(cityscapes.CLASS_TABLE)
  train_ids = np.arange(19, dtype=np.int32).reshape(1, 19).repeat(3, axis=0)
  palette = np.zeros((19, 3), np.uint8)
  stems = ["frankfurt_000000_000294_leftImg8bit", "frankfurt_000000_000576_leftImg8bit"]
  for stem in stems:
    predict.save_prediction(train_ids, palette, str(tmp_path / "out"), stem,
                            id_lut=id_lut)
  args = cs_eval.CArgs()
  args.predictionPath, args.predictionWalk = str(tmp_path / "out" / "label"), None
  gt = "/any/gtFine/val/frankfurt/frankfurt_000000_000576_gtFine_labelIds.png"
  found = pathlib.Path(cs_eval.getPrediction(args, gt))
  assert found.name == "frankfurt_000000_000576_labelIds.png"
  ids = np.asarray(Image.open(found))
  assert ids.dtype == np.uint8
  by_train_id = {l.trainId: l.id for l in cs_labels.labels if 0 <= l.trainId < 255}
  np.testing.assert_array_equal(ids[0], [by_train_id[t] for t in range(19)])
  # The colour map keeps the input's stem and the train-id palette.
  assert (tmp_path / "out" / "color" / f"{stems[1]}.png").is_file()


def test_unknown_label_format_is_an_error_naming_the_key(tmp_path):
  inputs = tmp_path / "in"
  inputs.mkdir()
  config = ml_collections.ConfigDict(dict(predict=dict(
      input_dir=str(inputs), output_dir=str(tmp_path / "out"), label_format="labelIds")))
  with pytest.raises(ValueError, match=r"config.predict.label_format must be one of "
                                       r"\['train_id', 'label_id'\], got 'labelIds'"):
    predict.predict_folder(config, str(tmp_path / "work"))


def _load_module(path: pathlib.Path, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_cityscapesscripts_evaluator_agrees_with_our_eval(tmp_path):
  """Fake official zips -> our mode eval, and mode predict with label ids -> cityscapesscripts'
  pixel-level evaluation of those files against the ground truth: same mIoU and per-class IoU.

  The ground truth holds ignored ids (0, 4, 9) and lacks train, motorcycle and bus: a class
  absent from both GT and prediction is NaN on both sides and left out of both means.
  """
  import zipfile
  from pixcon_jax import data, evaluate, setup
  from pixcon_jax.data import cityscapes, classes
  from pixcon_jax.data.prepare import prepare_dataset
  fake = _load_module(REPO / "tests" / "test_data_cityscapes.py", "fake_cityscapes_zips")
  h, w = 64, 128
  rng = np.random.default_rng(0)
  ids = np.array([0, 4, 9, 7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 33])

  def example(stem):
    blocks = rng.choice(ids, size=(h // 8, w // 8))
    label = np.kron(blocks, np.ones((8, 8), np.int64)).astype(np.uint8)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return stem, fake._png(image), fake._png(label)

  val = [example(s) for s in ("frankfurt_000000_000294", "frankfurt_000001_000058",
                              "lindau_000000_000019")]
  fake.write_fake_cityscapes(tmp_path / "manual", {
      "train": [example("aachen_000000_000019")], "val": val,
      "test": [example("berlin_000000_000019")]})
  prepare_dataset("cityscapes", manual_dir=str(tmp_path / "manual"),
                  data_dir=str(tmp_path / "tfds"))
  root = tmp_path / "cityscapes"
  with zipfile.ZipFile(tmp_path / "manual" / "gtFine_trainvaltest.zip") as z:
    z.extractall(root)
  images = tmp_path / "images"  # mode predict reads one flat folder
  images.mkdir()
  with zipfile.ZipFile(tmp_path / "manual" / "leftImg8bit_trainvaltest.zip") as z:
    for name in z.namelist():
      if name.startswith("leftImg8bit/val/"):
        (images / pathlib.Path(name).name).write_bytes(z.read(name))

  config = _load_module(REPO / "configs" / "cityscapes_hrnet.py", "cs_hrnet_config").get_config(
      "runlocal")
  config.model.overrides = ml_collections.ConfigDict(TINY)
  config.model.proj_dim = 16
  config.data.data_dir = str(tmp_path / "tfds")
  config.data.eval_pad_size = (h, w)
  config.data.eval_batch_size = 2
  config.eval.max_batches = None
  variables = random_variables(setup.build_model(config, train=False), seed=1)
  ocp.PyTreeCheckpointer().save(str(tmp_path / "weights"), jax.tree.map(np.asarray, variables))
  config.init_from = str(tmp_path / "weights")
  config.init_from_scope = "full"
  ours = evaluate.evaluate_checkpoint(config, str(tmp_path / "work"))
  assert ours["num_images"] == 3

  config.predict = ml_collections.ConfigDict(dict(
      input_dir=str(images), output_dir=str(tmp_path / "pred"), label_format="label_id"))
  predict.predict_folder(config, str(tmp_path / "work"))

  # The benchmark's evaluator through scripts/cityscapes_eval.py (instance scores off).
  import cityscapes_eval  # pylint: disable=g-import-not-at-top
  result = cityscapes_eval.evaluate(str(root), str(tmp_path / "pred" / "label"))
  assert result["num_images"] == 3
  (tmp_path / "no_predictions").mkdir()
  with pytest.raises(FileNotFoundError, match="no prediction for frankfurt_000000_000294"):
    cityscapes_eval.evaluate(str(root), str(tmp_path / "no_predictions"))
  with pytest.raises(ValueError, match="Predicted image has multiple channels"):
    cityscapes_eval.evaluate(str(root), str(images))  # RGB images, not label-id maps

  # Their confusion matrix over label ids, on the evaluated classes, is ours over train ids.
  record = json.loads((tmp_path / "work" / "eval_validation.json").read_text())
  eval_ids = classes.train_id_to_id_lut(cityscapes.CLASS_TABLE)
  their_cm = np.asarray(result["confMatrix"], np.int64)[np.ix_(eval_ids, eval_ids)]
  np.testing.assert_array_equal(their_cm, np.asarray(record["confusion_matrix"]))
  theirs = result["classScores"]  # by name; NaN for ignored classes and absent ones
  names = data.get_dataset_info("cityscapes").class_names
  for name in names:
    a, b = ours[f"iou/{name}"], theirs[name]
    assert np.isnan(a) == np.isnan(b), (name, a, b)
    if not np.isnan(a):
      assert abs(a - b) < 1e-6, (name, a, b)
  assert abs(ours["miou"] - result["averageScoreClasses"]) < 1e-6
  # The cases that need care occur: a class absent from both (NaN) and IoUs strictly in (0, 1).
  ious = np.array([ours[f"iou/{n}"] for n in names])
  assert np.isnan(ious).any() and ((ious > 0) & (ious < 1)).any()
