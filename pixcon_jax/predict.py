"""Mode `predict`: segment a folder of images and write colour and label-id PNGs.

    python -m pixcon_jax.main --config=CONFIG --workdir=DIR --config.mode=predict \
        --config.predict.input_dir=IN --config.predict.output_dir=OUT

For every image file `IN/<name>.<ext>` (PNG/JPEG/anything PIL reads, any size) this writes
  OUT/label/<name>.png   the predicted train id per pixel (uint8, 'L'; uint16 if C > 256),
  OUT/color/<name>.png   the same map in the dataset palette (RGB),
both of the image's own size, plus OUT/predict_report.json listing written and skipped
files. A file PIL cannot read is reported (log + report) and skipped; a folder without
files, or without a single readable image, is an error naming it.

Images are normalised by the data pipeline's own function (`data.transforms.normalize`
with `config.augment`: ImageNet statistics, BGR if the config says so), and inference uses
the config's evaluation protocol (`config.eval`: scales, flip, whole / sliding window), at
the image's full resolution. With `--config.predict.label_format=label_id` (default
`train_id`) the label PNGs hold the dataset's raw label ids instead (Cityscapes `labelIds`,
0..33, uint8) and are named for the benchmark: `<city>_<seq>_<frame>_leftImg8bit.png` ->
`OUT/label/<city>_<seq>_<frame>_labelIds.png`, which cityscapesscripts'
`evalPixelLevelSemanticLabeling` finds (it matches `<city>_<seq>_<frame>*.png` under
CITYSCAPES_RESULTS=OUT/label). Weights: the latest checkpoint in the workdir, else
`config.init_from`. On several processes the files are split between them. The images go
through `segment.Segmenter`, the segmenter of the Python API (`pixcon_jax.load_segmenter`).
"""
from __future__ import annotations

import io
import json
import os
from typing import Any

import jax
import numpy as np
from absl import logging
from PIL import Image

from pixcon_jax import paths
from pixcon_jax import segment
from pixcon_jax import validation
from pixcon_jax.data import classes

# `config.predict.label_format`: what the label PNGs hold.
LABEL_FORMATS = ("train_id", "label_id")
_CITYSCAPES_IMAGE_SUFFIX = "_leftImg8bit"
# PIL modes of 16/32-bit integer grayscale images; convert("RGB") would clip them at 255.
WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _predict_config(config: Any) -> tuple[str, str]:
  pred = config.get("predict") or {}
  input_dir = pred.get("input_dir") if hasattr(pred, "get") else None
  output_dir = pred.get("output_dir") if hasattr(pred, "get") else None
  if not input_dir:
    raise validation.ConfigError(
        "mode 'predict' needs --config.predict.input_dir=<folder of images>")
  if not output_dir:
    raise validation.ConfigError(
        "mode 'predict' needs --config.predict.output_dir=<folder for the PNGs>")
  # Local folders or gs:// URLs.
  input_dir, output_dir = paths.resolve_str(input_dir), paths.resolve_str(output_dir)
  if not paths.resolve(input_dir).is_dir():
    raise validation.MissingInputError(
        f"config.predict.input_dir={input_dir!r} is not a directory")
  # Before the model runs: a file in the way would otherwise fail at the first write.
  validation.check_output_dir(output_dir, "config.predict.output_dir")
  return input_dir, output_dir


def _label_format(config: Any) -> str:
  pred = config.get("predict") or {}
  fmt = (pred.get("label_format") if hasattr(pred, "get") else None) or "train_id"
  if fmt not in LABEL_FORMATS:
    raise ValueError(f"config.predict.label_format must be one of {list(LABEL_FORMATS)}, "
                     f"got {fmt!r}")
  return fmt


def label_id_stem(stem: str) -> str:
  """The benchmark's name for the label-id map of image `stem`.

  `<city>_<seq>_<frame>_leftImg8bit` -> `<city>_<seq>_<frame>_labelIds`: cityscapesscripts
  pairs a prediction with its ground truth by the prefix `<city>_<seq>_<frame>`, and the
  test server takes `*_labelIds.png`. Other stems just get the `_labelIds` suffix.
  """
  if stem.endswith(_CITYSCAPES_IMAGE_SUFFIX):
    stem = stem[:-len(_CITYSCAPES_IMAGE_SUFFIX)]
  return stem + "_labelIds"


def list_inputs(input_dir: str) -> list[str]:
  """Sorted regular, non-hidden files of `input_dir` (not recursive).

  Raises:
    ValueError naming the folder when it holds no file.
  """
  names = sorted(p.name for p in paths.resolve(input_dir).iterdir()
                 if not p.name.startswith(".") and p.is_file())
  if not names:
    raise validation.ConfigError(
        f"config.predict.input_dir={input_dir!r} is empty: no image to predict")
  return names


def read_image(path: str) -> np.ndarray:
  """[H, W, 3] uint8 RGB; raises OSError / ValueError when PIL cannot decode the file.

  16-bit grayscale (PIL mode I;16 or I) is scaled to 8 bits (value / 257, the map of
  0..65535 onto 0..255) with a warning; PIL's own conversion would clip it at 255.
  """
  # Whole file first: PIL probes formats by seeking, which a gs:// file object answers with
  # TensorFlow's OutOfRangeError rather than a short read.
  with Image.open(io.BytesIO(paths.resolve(path).read_bytes())) as img:
    img.load()
    if img.mode in WIDE_GRAY_MODES:
      wide = np.asarray(img).astype(np.float64)
      logging.warning("%s is %s grayscale (max %d): scaled to 8 bits as value / 257 and "
                      "repeated to RGB", path, img.mode, int(wide.max(initial=0)))
      gray = np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8)
      return np.repeat(gray[..., None], 3, axis=-1)
    return np.asarray(img.convert("RGB"))


def output_names(names: list[str]) -> dict[str, str]:
  """Input file name -> output stem; the extension is kept when two inputs share a stem."""
  stems: dict[str, int] = {}
  for n in names:
    stem = os.path.splitext(n)[0]
    stems[stem] = stems.get(stem, 0) + 1
  out = {}
  for n in names:
    stem, ext = os.path.splitext(n)
    out[n] = stem if stems[stem] == 1 else f"{stem}_{ext.lstrip('.')}"
  return out


def save_prediction(label: np.ndarray, palette: np.ndarray, output_dir: str, stem: str, *,
                    id_lut: np.ndarray | None = None) -> tuple[str, str]:
  """Writes the label map and `color/<stem>.png` (palette). Returns both paths.

  Args:
    label: [H, W] int train ids.
    palette: [C, 3] uint8.
    output_dir: receives `label/` and `color/` (a local folder or a gs:// URL).
    stem: output name without extension.
    id_lut: [C] raw label id of each train id (`classes.train_id_to_id_lut`), or None. When
      given, `label/<label_id_stem(stem)>.png` holds raw ids; otherwise `label/<stem>.png`
      holds train ids.
  """
  label_dir = paths.resolve(output_dir) / "label"
  color_dir = paths.resolve(output_dir) / "color"
  label_dir.mkdir(parents=True, exist_ok=True)
  color_dir.mkdir(parents=True, exist_ok=True)
  if id_lut is None:
    values, label_stem = label, stem
  else:
    values, label_stem = id_lut[label], label_id_stem(stem)
  top = int(id_lut.max()) if id_lut is not None else len(palette) - 1
  dtype = np.uint8 if top < 256 else np.uint16
  label_path = label_dir / (label_stem + ".png")
  color_path = color_dir / (stem + ".png")
  with label_path.open("wb") as f:
    Image.fromarray(values.astype(dtype)).save(f, format="PNG")
  with color_path.open("wb") as f:
    Image.fromarray(segment.colorize(label, palette)).save(f, format="PNG")
  return os.fspath(label_path), os.fspath(color_path)


def predict_folder(config: Any, workdir: str, mesh: Any = None) -> dict[str, Any]:
  """Segments every image of `config.predict.input_dir` into `config.predict.output_dir`.

  `mesh` holds the devices the weights are loaded onto (default: every device of the run).

  Returns:
    report {"written": [{"input", "label", "color", "size"}], "skipped": [{"input", "reason"}],
    "weights": source description}.
  """
  input_dir, output_dir = _predict_config(config)
  label_format = _label_format(config)
  names = list_inputs(input_dir)
  # The Python API's segmenter (segment.py): the same weights, normalisation and protocol.
  seg = segment.from_config(config, workdir, mesh=mesh)
  id_lut = (classes.train_id_to_id_lut(seg.info.class_table) if label_format == "label_id"
            else None)
  source, settings, palette = seg.source, seg.settings, seg.palette
  stems = output_names(names)
  mine = names[jax.process_index()::jax.process_count()]
  logging.info("predicting %d images of %s with %s (%s)", len(mine), input_dir, source, settings)
  report: dict[str, Any] = {"weights": source, "written": [], "skipped": []}
  for name in mine:
    path = os.fspath(paths.resolve(input_dir) / name)
    try:
      rgb = read_image(path)
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
      logging.warning("skipping %s: not a readable image (%s)", path, e)
      print(f"skipped {path}: not a readable image ({type(e).__name__})", flush=True)
      report["skipped"].append({"input": name, "reason": f"{type(e).__name__}: {e}"})
      continue
    label = seg(rgb)
    label_path, color_path = save_prediction(label, palette, output_dir, stems[name],
                                             id_lut=id_lut)
    report["written"].append({"input": name, "label": label_path, "color": color_path,
                              "size": list(rgb.shape[:2])})
  # A share of only unreadable files fails; an empty share (more processes than files) does not.
  if report["skipped"] and not report["written"]:
    raise validation.ConfigError(
        f"config.predict.input_dir={input_dir!r} holds no readable image "
        f"(skipped {[s['input'] for s in report['skipped']]})")
  paths.resolve(output_dir).mkdir(parents=True, exist_ok=True)
  suffix = "" if jax.process_count() == 1 else f"_{jax.process_index()}"
  (paths.resolve(output_dir) / f"predict_report{suffix}.json").write_text(
      json.dumps(report, indent=1))
  print(f"predicted {len(report['written'])} images into {output_dir}; skipped "
        f"{len(report['skipped'])}", flush=True)
  return report
