"""Cityscapes through TFDS: fake official zips -> ArrayRecord -> grain batches with exact counts."""
import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from pixcon_jax import data
from pixcon_jax.data import cityscapes
from pixcon_jax.data import stats
from pixcon_jax.data import tfds_source
from pixcon_jax.data.prepare import prepare_dataset

H, W = 16, 32


def _png(a: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, format="PNG")
  return buf.getvalue()


def write_fake_cityscapes(manual_dir, examples):
  """examples: {split: [(stem, image bytes, label bytes)]} in the official zip layout."""
  manual_dir.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(manual_dir / "leftImg8bit_trainvaltest.zip", "w") as zi, \
       zipfile.ZipFile(manual_dir / "gtFine_trainvaltest.zip", "w") as zl:
    for split, items in examples.items():
      for stem, image, label in items:
        city = stem.split("_")[0]
        zi.writestr(f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png", image)
        zl.writestr(f"gtFine/{split}/{city}/{stem}_gtFine_labelIds.png", label)


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
  rng = np.random.default_rng(0)
  root = tmp_path_factory.mktemp("cityscapes")
  written = {"train": [], "val": []}
  examples = {"train": [], "val": [], "test": []}
  for split, n in (("train", 2), ("val", 1)):
    for i in range(n):
      image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
      label = rng.integers(0, 34, (H, W), dtype=np.uint8)
      written[split].append((image, label))
      examples[split].append((f"aachen_{i:06d}_000019", _png(image), _png(label)))
  good = _png(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
  examples["test"] = [
      ("bonn_000000_000019", b"this is not a png", _png(np.zeros((H, W), np.uint8))),
      ("bonn_000001_000019", good, _png(np.zeros((H // 2, W), np.uint8))),
      ("bonn_000002_000019", good, _png(np.full((H, W), 200, np.uint8))),
  ]
  write_fake_cityscapes(root / "manual", examples)
  counts = prepare_dataset("cityscapes", manual_dir=str(root / "manual"),
                           data_dir=str(root / "data"))
  assert counts == {"train": 2, "validation": 1, "test": 3}
  return str(root / "data"), written


def _data_cfg(data_dir):
  c = data.default_data_config("cityscapes")
  c.data_dir = data_dir
  c.crop_size = (H, W)
  c.eval_pad_size = (H, W)
  c.worker_count = 0
  return c


def _no_augment():
  a = data.default_augment_config()
  a.scale_range = (1.0, 1.0)
  a.flip = False
  a.brightness_shift = 0
  a.normalize = "none"
  return a


def _counts(labels):
  return np.bincount(np.concatenate([l.ravel() for l in labels]).astype(np.int64), minlength=256)


def test_batches_have_the_written_class_counts(fake):
  data_dir, written = fake
  expected = _counts([cityscapes.map_label(l) for _, l in written["train"]])
  batch = next(data.make_train_iterator(_data_cfg(data_dir), _no_augment(),
                                        batch_size_per_process=2, seed=0))
  np.testing.assert_array_equal(_counts(list(batch["label"])), expected)
  assert sorted(batch["image_id"].tolist()) == [0, 1]
  # Images come back pixel-exact (normalisation off), paired with their own labels.
  for img, lab in zip(batch["image"], batch["label"]):
    match = [np.array_equal(img, i.astype(np.float32)) and
             np.array_equal(lab, cityscapes.map_label(l)) for i, l in written["train"]]
    assert sum(match) == 1
  ev = list(data.make_eval_iterator(_data_cfg(data_dir), _no_augment(), batch_size_per_process=1))
  assert len(ev) == 1 and ev[0]["valid"].tolist() == [True]
  np.testing.assert_array_equal(ev[0]["label"][0], cityscapes.map_label(written["val"][0][1]))
  s = stats.compute_stats(_data_cfg(data_dir), "train")
  assert s["num_examples"] == 2 and s["ignored_pixels"] == expected[255]
  assert list(s["pixel_counts"].values()) == expected[:19].tolist()


def _outcomes(source):
  out = {}
  for i in range(len(source)):
    try:
      out[i] = source[i]
    except ValueError as e:
      out[i] = e
  return out


def test_bad_examples_are_named(fake):
  data_dir, _ = fake
  cfg = _data_cfg(data_dir)
  outcomes = list(_outcomes(data.make_source(cfg, "test")).values())
  messages = [str(o) for o in outcomes if isinstance(o, Exception)]
  assert any("corrupt image" in m and "bonn_000000_000019" in m for m in messages), messages
  assert any("bonn_000001_000019" in m and "(16, 32) != label size (8, 32)" in m
             for m in messages), messages
  ok = [o for o in outcomes if isinstance(o, dict)]
  assert len(ok) == 1 and np.all(ok[0]["label"] == 255)  # Unknown id 200 -> ignore.
  cfg.unknown_label = "error"
  errors = [o for o in _outcomes(data.make_source(cfg, "test")).values()
            if isinstance(o, tfds_source.UnknownLabelError)]
  assert len(errors) == 1 and "[200]" in str(errors[0]) and "bonn_000002_000019" in str(errors[0])


def test_missing_manual_files_name_the_expected_files(tmp_path):
  (tmp_path / "leftImg8bit_trainvaltest.zip").write_bytes(b"")
  with pytest.raises(FileNotFoundError) as e:
    prepare_dataset("cityscapes", manual_dir=str(tmp_path), data_dir=str(tmp_path / "d"))
  assert "gtFine_trainvaltest.zip" in str(e.value) and str(tmp_path) in str(e.value)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    prepare_dataset("cityscapes", manual_dir=str(tmp_path / "nope"), data_dir=str(tmp_path))


def test_unprepared_data_dir_names_the_prepare_command(tmp_path):
  cfg = _data_cfg(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="prepare_data.py --dataset cityscapes"):
    len(data.make_source(cfg, "train"))


def test_class_table_and_weights():
  info = data.get_dataset_info("cityscapes")
  assert info.num_classes == 19 and info.palette.shape == (19, 3) and info.palette.dtype == np.uint8
  assert info.class_names[0] == "road" and info.class_names[18] == "bicycle"
  assert tuple(info.palette[0]) == (128, 64, 128)
  lut = cityscapes.ID_TO_TRAIN_ID
  assert lut[7] == 0 and lut[33] == 18 and lut[0] == 255 and lut[34] == 255 and lut[255] == 255
  assert len(info.class_weights) == 19 and info.class_weights[0] == 0.8373
  from pixcon_jax import losses  # pylint: disable=g-import-not-at-top
  np.testing.assert_allclose(np.asarray(losses.CITYSCAPES_CLASS_WEIGHTS), info.class_weights)


def test_class_table_matches_cityscapesscripts():
  """Every entry against the benchmark's own table (cityscapesscripts.helpers.labels)."""
  from cityscapesscripts.helpers import labels as cs  # pylint: disable=g-import-not-at-top
  official = {l.id: l for l in cs.labels if l.id >= 0}
  assert len(official) == 34
  ours = {e.id: e for e in cityscapes.CLASS_TABLE}
  # The license plate (id -1, train id -1) never occurs in the label maps; we leave it out.
  assert sorted(ours) == sorted(official)
  for i, l in official.items():
    e = ours[i]
    # cityscapesscripts marks ignored classes with trainId 255 (or -1 for the plate).
    assert (e.train_id, e.name, e.color, e.ignore_in_eval) == (
        l.trainId, l.name, tuple(l.color), l.ignoreInEval), f"label id {i}"
  lut = cityscapes.ID_TO_TRAIN_ID
  np.testing.assert_array_equal(lut[:34], [official[i].trainId for i in range(34)])
  info = data.get_dataset_info("cityscapes")
  by_train_id = {l.trainId: l for l in cs.labels if 0 <= l.trainId < 255}
  assert info.class_names == tuple(by_train_id[t].name for t in range(19))
  np.testing.assert_array_equal(info.palette, [by_train_id[t].color for t in range(19)])
