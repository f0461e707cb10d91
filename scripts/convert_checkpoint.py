"""Converts a PyTorch checkpoint of the official code (or an ImageNet backbone) to an orbax checkpoint.

Usage:
  python scripts/convert_checkpoint.py --model hrnet_w48_contrast --torch ckpt.pth --out /abs/dir
  python scripts/convert_checkpoint.py --model hrnet_w48_contrast \
      --torch hrnetv2_w48_imagenet_pretrained.pth --out /abs/dir --backbone_only

The input is a `.pth` (read with torch, imported only here) or an `.npz` of
name -> array. A `.pth` holding `{"state_dict": ...}` (the official trainer's
format) is unwrapped; when it also holds the trainer's `config_dict` (`save_net`), the model
is the one it records (`network.model_name`), `--model` may be omitted, and a different
`--model` is an error naming the checkpoint's model. The output is a StandardCheckpointer checkpoint of
`{"params", "batch_stats"}` (float32 numpy trees). With `--backbone_only` it
holds only the "backbone" subtrees; training overlays them on its freshly
initialised variables with `pixcon_jax.convert.merge_variables`.
"""
from __future__ import annotations

import pathlib
import sys
import zipfile
from typing import Any

from absl import app
from absl import flags
from absl import logging
import numpy as np

from pixcon_jax import convert

_MODEL = flags.DEFINE_string(
    "model", None, "registered model name, e.g. hrnet_w48_contrast; optional when the checkpoint "
    "records it (the official trainer's config_dict)")
_TORCH = flags.DEFINE_string("torch", None, "input .pth or .npz state_dict")
_OUT = flags.DEFINE_string("out", None, "output checkpoint directory (created; must not exist)")
_BACKBONE_ONLY = flags.DEFINE_bool(
    "backbone_only", False, "the input is a bare backbone (ImageNet); keys have no 'backbone.'")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 19, "classes of the segmentation head")
_ALLOW_PICKLE = flags.DEFINE_bool(
    "allow_pickle", False, "let torch.load unpickle arbitrary objects (trusted files only)")
_FORCE = flags.DEFINE_bool("force", False, "overwrite an existing --out directory")


def _unwrap(obj: Any) -> dict[str, Any]:
  """The state_dict inside a checkpoint object (`state_dict`, `model` or the dict itself)."""
  for key in ("state_dict", "model", "net"):
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      return obj[key]
  if not isinstance(obj, dict):
    raise ValueError(f"expected a state_dict (dict of tensors), got {type(obj).__name__}")
  return obj


def _config_dict(obj: Any) -> dict[str, Any] | None:
  """The official trainer's `config_dict` of a checkpoint object, or None."""
  config_dict = obj.get("config_dict") if isinstance(obj, dict) else None
  return config_dict if isinstance(config_dict, dict) else None


def load_checkpoint(path: pathlib.Path, allow_pickle: bool = False
                    ) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
  """(name -> numpy array, the checkpoint's `config_dict` or None) from a .npz or a .pth."""
  if not path.is_file():
    raise SystemExit(f"error: --torch={path}: no such file")
  if path.suffix == ".npz":
    # np.load reads a non-zip file as a pickle and then blames allow_pickle; say what it is.
    if not zipfile.is_zipfile(path):
      raise SystemExit(f"error: --torch={path} is not an .npz archive (not a zip file); give "
                       f"the state_dict saved with numpy.savez, or the .pth itself")
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}, None
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SystemExit(f"reading {path} needs PyTorch (pip install torch), or pass an .npz of the "
                     f"state_dict instead: {e}") from e
  obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
  state_dict = {k: v.detach().cpu().numpy() for k, v in _unwrap(obj).items()
                if hasattr(v, "detach")}
  return state_dict, _config_dict(obj)


def main(argv: list[str]) -> None:
  del argv
  for flag in (_TORCH, _OUT):
    if flag.value is None:
      raise app.UsageError(f"--{flag.name} is required")
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO

  path = pathlib.Path(_TORCH.value)
  state_dict, config_dict = load_checkpoint(path, _ALLOW_PICKLE.value)
  try:
    model = convert.resolve_model_name(_MODEL.value, config_dict, source=path.name)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  variables, report = convert.convert_for_model(
      model, state_dict, num_classes=_NUM_CLASSES.value,
      backbone_only=_BACKBONE_ONLY.value)
  print(report.summary())
  out = pathlib.Path(_OUT.value).resolve()
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(out, variables, force=_FORCE.value)
  checkpointer.wait_until_finished()
  print(f"wrote {out}")


if __name__ == "__main__":
  sys.exit(app.run(main))
