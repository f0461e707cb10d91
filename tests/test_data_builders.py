"""The project's TFDS builders (PASCAL-Context, COCO-Stuff-10k) over fake manual downloads."""
import numpy as np
import pytest
from PIL import Image

from pixcon_jax import data
from pixcon_jax.data import coco_stuff
from pixcon_jax.data import pascal_context
from pixcon_jax.data.prepare import prepare_dataset

H, W = 12, 20


def _cfg(name, data_dir):
  c = data.default_data_config(name)
  c.data_dir = data_dir
  c.worker_count = 0
  return c


def _labels(source):
  return [source[i]["label"] for i in range(len(source))]


def _write_pascal(root, labels_by_split, bad=None):
  voc = root / "VOCdevkit" / "VOC2010"
  for d in ("JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext"):
    (voc / d).mkdir(parents=True, exist_ok=True)
  for split, labels in labels_by_split.items():
    stems = []
    for i, label in enumerate(labels):
      stem = f"2008_{split}_{i:04d}"
      stems.append(stem)
      Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(voc / "JPEGImages" / f"{stem}.jpg")
      Image.fromarray(label).save(voc / "SegmentationClassContext" / f"{stem}.png")
    (voc / "ImageSets/SegmentationContext" / f"{split}.txt").write_text("\n".join(stems) + "\n")
  return voc


def test_pascal_context_counts_and_mapping(tmp_path):
  rng = np.random.default_rng(0)
  labels = {"train": [rng.integers(0, 60, (H, W), dtype=np.uint8) for _ in range(2)],
            "val": [rng.integers(0, 60, (H, W), dtype=np.uint8)]}
  labels["val"][0][0, :3] = 77  # Unknown id -> ignore with a counted warning.
  _write_pascal(tmp_path / "manual", labels)
  counts = prepare_dataset("pascal_context", manual_dir=str(tmp_path / "manual"),
                           data_dir=str(tmp_path / "data"))
  assert counts == {"train": 2, "validation": 1}
  info = data.get_dataset_info("pascal_context")
  assert info.num_classes == 59 and info.class_names[0] == "aeroplane"
  for split, tfds_split in (("train", "train"), ("val", "validation")):
    src = data.make_source(_cfg("pascal_context", str(tmp_path / "data")), tfds_split)
    got = np.bincount(np.concatenate([l.ravel() for l in _labels(src)]), minlength=256)
    raw = np.concatenate([l.ravel() for l in labels[split]]).astype(np.int64)
    want = np.bincount(np.where((raw == 0) | (raw > 59), 255, raw - 1), minlength=256)
    np.testing.assert_array_equal(got, want)


def test_pascal_context_missing_and_mismatched_files(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    prepare_dataset("pascal_context", manual_dir=str(tmp_path), data_dir=str(tmp_path / "d"))
  assert "SegmentationClassContext" in str(e.value) and "JPEGImages" in str(e.value)
  voc = _write_pascal(tmp_path / "m", {"train": [np.zeros((H, W), np.uint8)],
                                       "val": [np.zeros((H, W), np.uint8)]})
  Image.fromarray(np.zeros((H + 1, W), np.uint8)).save(
      voc / "SegmentationClassContext" / "2008_val_0000.png")
  with pytest.raises(ValueError, match="2008_val_0000.*image size"):
    prepare_dataset("pascal_context", manual_dir=str(tmp_path / "m"), data_dir=str(tmp_path / "d"))


def test_coco_stuff_table_and_builder(tmp_path):
  info = data.get_dataset_info("coco_stuff")
  assert info.num_classes == 171
  lut = coco_stuff.ID_TO_TRAIN_ID
  assert lut[0] == 255 and lut[1] == 0 and lut[12] == 255 and lut[13] == 11 and lut[182] == 170
  root = tmp_path / "cocostuff-10k-v1.1"
  for d in ("images", "annotations", "imageLists"):
    (root / d).mkdir(parents=True)
  rng = np.random.default_rng(1)
  written = {}
  for split, n in (("train", 2), ("test", 1)):
    names = [f"COCO_train2014_{split}{i}" for i in range(n)]
    for name in names:
      label = rng.integers(0, 183, (H, W), dtype=np.uint8)
      written[name] = label
      Image.fromarray(np.full((H, W, 3), 50, np.uint8)).save(root / "images" / f"{name}.jpg")
      Image.fromarray(label).save(root / "annotations" / f"{name}.png")
    (root / "imageLists" / f"{split}.txt").write_text("\n".join(names))
  # One official-style .mat annotation instead of a PNG.
  import scipy.io  # pylint: disable=g-import-not-at-top
  name = "COCO_train2014_train0"
  scipy.io.savemat(root / "annotations" / f"{name}.mat", {"S": written[name].astype(np.uint16)})
  (root / "annotations" / f"{name}.png").unlink()
  # Corrupt image: preparation fails naming the example.
  (root / "images" / "COCO_train2014_test0.jpg").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="COCO_train2014_test0"):
    prepare_dataset("coco_stuff", manual_dir=str(tmp_path), data_dir=str(tmp_path / "d1"))
  Image.fromarray(np.full((H, W, 3), 50, np.uint8)).save(root / "images" / "COCO_train2014_test0.jpg")
  counts = prepare_dataset("coco_stuff", manual_dir=str(tmp_path), data_dir=str(tmp_path / "d"))
  assert counts == {"train": 2, "validation": 1}
  src = data.make_source(_cfg("coco_stuff", str(tmp_path / "d")), "train")
  got = np.bincount(np.concatenate([l.ravel() for l in _labels(src)]), minlength=256)
  raw = np.concatenate([written[f"COCO_train2014_train{i}"].ravel() for i in range(2)])
  np.testing.assert_array_equal(got, np.bincount(lut[raw], minlength=256))
