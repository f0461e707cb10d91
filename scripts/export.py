r"""Exports a trained segmenter with `jax.export`: it then runs with JAX alone, without pixcon_jax.

    python scripts/export.py --workdir=/path/to/run --out=/path/to/export \
        [--image_size=512,1024] [--batch=b] [--protocol=single] [--platforms=cpu,cuda] [--saved_model]

`--workdir` is what `pixcon_jax.load_segmenter` takes: a run's workdir (with config.json) or the
--out folder of scripts/convert_checkpoint.py (then pass --model, and --dataset if not
Cityscapes). The export computes exactly `load_segmenter(...)(images)`: uint8 RGB images
[N, H, W, 3] -> int32 train ids [N, H, W], with the run's normalisation and the chosen
inference protocol inside the graph and the weights as constants. `--batch` and each entry of
`--image_size` are an int or a symbolic dimension name (`jax.export.symbolic_shape`); the
defaults `--batch=b --image_size=h,w` accept any batch and any image size. Multi-scale
protocols resize by `int(H * scale)` and need ints; so does a model whose layers need static
sizes (the message says so: export one folder per size then).

Writes into --out (created; an existing folder needs --force):
  segmenter.jax          the serialized `jax.export.Exported` (StableHLO + weights)
  segmenter.json         input / output description, classes, palette, protocol, weights source
  load_segmenter.py      a loader that needs only jax and numpy (also runnable as a check)
  saved_model/           with --saved_model: a TF SavedModel through jax2tf (needs TensorFlow)

Bad input (a missing run, a bad size or flag) prints one `error:` line and exits with 2.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import sys
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging

EXPORT_FILE = "segmenter.jax"
META_FILE = "segmenter.json"
LOADER_FILE = "load_segmenter.py"

# Needs jax and numpy only: it is copied next to every export.
LOADER = '''"""Loads the segmenter exported by pixcon_jax's scripts/export.py; needs only jax and numpy.

    from load_segmenter import load
    segment = load("/path/to/export")
    labels = segment(images)  # uint8 [N, H, W, 3] RGB -> int32 [N, H, W] train ids

`python load_segmenter.py /path/to/export` runs it once on a random image.
"""
import json
import pathlib
import sys

import jax
import numpy as np


def load(folder):
  folder = pathlib.Path(folder)
  exported = jax.export.deserialize(bytearray((folder / "segmenter.jax").read_bytes()))
  def segment(images):
    return np.asarray(exported.call(np.asarray(images, np.uint8)))
  segment.meta = json.loads((folder / "segmenter.json").read_text())
  return segment


if __name__ == "__main__":
  segment = load(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parent)
  # Symbolic dimensions: one image of 64 x 128.
  shape = [d if isinstance(d, int) else s for d, s in zip(segment.meta["input_shape"],
                                                          (1, 64, 128, 3))]
  labels = segment(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
  print("labels", labels.shape, labels.dtype, "classes", sorted(set(labels.ravel().tolist())))
'''


def _dim(value: str, flag: str) -> int | str:
  """An int, or a symbolic dimension name / expression for `jax.export.symbolic_shape`."""
  from pixcon_jax import validation  # pylint: disable=g-import-not-at-top
  value = value.strip()
  if value.isdigit() and int(value) > 0:
    return int(value)
  if value.isidentifier():
    return value
  raise validation.ConfigError(f"{flag}={value!r}: expected a positive int or a symbolic "
                               f"dimension name (e.g. b)")


def input_shape(batch: str, image_size: Sequence[str] | None) -> list[int | str]:
  """[N, H, W, 3] from the flags; InputError naming the flag when one is bad."""
  from pixcon_jax import validation  # pylint: disable=g-import-not-at-top
  if not image_size or len(image_size) != 2:
    raise validation.ConfigError(f"--image_size={','.join(image_size or [])!r}: expected H,W "
                                 f"(e.g. --image_size=512,1024)")
  return [_dim(batch, "--batch"), _dim(image_size[0], "--image_size"),
          _dim(image_size[1], "--image_size"), 3]


def write_export(seg: Any, out: pathlib.Path, shape: Sequence[int | str], *,
                 platforms: Sequence[str] | None = None, saved_model: bool = False) -> dict:
  """Exports `seg` (a `segment.Segmenter`) for input `shape` into `out`; returns the metadata."""
  from pixcon_jax import validation  # pylint: disable=g-import-not-at-top
  try:
    exported = seg.export(shape, platforms=platforms)
  except Exception as e:  # pylint: disable=broad-except
    # jax's shape errors (a symbolic size the model cannot trace) are long; keep the first line.
    hint = (" (this model or protocol needs a static image size: give --image_size as ints; "
            "multi-scale protocols always do)"
            if any(isinstance(d, str) for d in shape[1:3]) else "")
    raise validation.ConfigError(
        f"cannot export for input shape {list(shape)}{hint}: {type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}") from None
  out.mkdir(parents=True, exist_ok=True)
  (out / EXPORT_FILE).write_bytes(exported.serialize())
  meta = {
      "input": "uint8 RGB images [N, H, W, 3] on 0-255",
      "output": "int32 train ids [N, H, W]",
      "input_shape": [d if isinstance(d, int) else str(d) for d in shape],
      "platforms": list(exported.platforms),
      "num_classes": seg.num_classes,
      "class_names": list(seg.class_names),
      "palette": seg.palette.tolist(),
      "dataset": seg.info.name,
      "model": seg.config.model.name,
      "weights": seg.source,
      "protocol": {"mode": seg.settings.mode, "scales": list(seg.settings.scales),
                   "flip": seg.settings.flip, "aggregate": seg.settings.aggregate},
      "normalization": {"normalize": seg.augment.normalize, "bgr": seg.augment.bgr},
  }
  (out / META_FILE).write_text(json.dumps(meta, indent=1))
  (out / LOADER_FILE).write_text(LOADER)
  if saved_model:
    write_saved_model(exported, out / "saved_model")
  return meta


def write_saved_model(exported: Any, path: pathlib.Path) -> None:
  """A TF SavedModel whose serving function calls the exported StableHLO (jax2tf)."""
  from pixcon_jax import validation  # pylint: disable=g-import-not-at-top
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise validation.ConfigError(f"--saved_model needs TensorFlow (pip install tensorflow-cpu): "
                                 f"{e}") from None
  spec = [None if not isinstance(d, int) else d for d in exported.in_avals[0].shape]
  module = tf.Module()
  # The jax function of the deserialisable artifact, so the SavedModel is the same graph.
  module.segment = tf.function(
      jax2tf.convert(exported.call, polymorphic_shapes=[
          "(" + ", ".join(str(d) for d in exported.in_avals[0].shape) + ")"],
                     with_gradient=False),
      autograph=False, input_signature=[tf.TensorSpec(spec, tf.uint8, name="images")])
  tf.saved_model.save(module, str(path), signatures={"serving_default": module.segment})


FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command line (only when run as a script: importing the module defines no flag)."""
  flags.DEFINE_string("workdir", None, "run directory, or a converted checkpoint folder")
  flags.DEFINE_string("out", None, "output folder for the export")
  flags.DEFINE_list("image_size", ["h", "w"], "H,W of the input images: ints, or symbolic "
                    "dimension names (any size)")
  flags.DEFINE_string("batch", "b", "batch size: an int, or a symbolic name (any size)")
  flags.DEFINE_string("protocol", None, "single | paper | official; default: the run's "
                      "config.eval")
  flags.DEFINE_string("model", None, "model name of a converted checkpoint")
  flags.DEFINE_string("dataset", None, "dataset of a converted checkpoint (cityscapes)")
  flags.DEFINE_list("platforms", None, "platforms to lower for (cpu, cuda, rocm, tpu); "
                    "default: the current backend")
  flags.DEFINE_bool("saved_model", False, "also write a TF SavedModel (jax2tf)")
  flags.DEFINE_bool("force", False, "replace an existing --out folder")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr, flush=True)
    sys.exit(2)
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore step at INFO
  from pixcon_jax import validation  # pylint: disable=g-import-not-at-top
  try:
    for name in ("workdir", "out"):
      if not FLAGS[name].value:
        raise validation.ConfigError(f"--{name} is required")
    shape = input_shape(FLAGS.batch, FLAGS.image_size)
    out = pathlib.Path(FLAGS.out).expanduser().resolve()
    if out.exists() and not out.is_dir():
      raise validation.ConfigError(f"--out={FLAGS.out!r} is a file: expected a folder")
    if out.exists() and any(out.iterdir()):
      if not FLAGS.force:
        raise validation.ConfigError(f"--out={FLAGS.out!r} exists and is not empty; pass "
                                     f"--force to replace it")
      shutil.rmtree(out)
    from pixcon_jax import segment  # pylint: disable=g-import-not-at-top
    seg = segment.load_segmenter(FLAGS.workdir, protocol=FLAGS.protocol, model=FLAGS.model,
                                 dataset=FLAGS.dataset)
    meta = write_export(seg, out, shape, platforms=FLAGS.platforms,
                        saved_model=FLAGS.saved_model)
  except validation.InputError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(validation.EXIT_BAD_INPUT)
  print(f"exported {meta['model']} ({meta['weights']}) for input {meta['input_shape']} on "
        f"{meta['platforms']} into {out}; load it with {out / LOADER_FILE}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
