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
import zipfile
from typing import Any

from absl import app
from absl import flags
from absl import logging
import numpy as np

from pixcon_jax import cli
from pixcon_jax import validation

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


def _looks_like_torch_file(path: pathlib.Path) -> bool:
  """A `torch.save` file is a zip (PyTorch >= 1.6) or a pickle (protocol 2+ starts with 0x80)."""
  with open(path, "rb") as f:
    head = f.read(1)
  return zipfile.is_zipfile(path) or head == b"\x80"


def load_checkpoint(path: pathlib.Path, allow_pickle: bool = False
                    ) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
  """(name -> numpy array, the checkpoint's `config_dict` or None) from a .npz or a .pth.

  Raises:
    validation.InputError naming `--torch` when the file is missing, is not what its suffix
    says, or needs PyTorch where it is not installed.
  """
  if not path.is_file():
    raise validation.MissingInputError(f"--torch={path}: no such file")
  if path.suffix == ".npz":
    # np.load reads a non-zip file as a pickle and then blames allow_pickle; say what it is.
    if not zipfile.is_zipfile(path):
      raise validation.ConfigError(
          f"--torch={path} is not an .npz archive (not a zip file); give the state_dict saved "
          f"with numpy.savez, or the .pth itself")
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}, None
  if not _looks_like_torch_file(path):
    raise validation.ConfigError(
        f"--torch={path} is not a PyTorch checkpoint (neither a zip nor a pickle written by "
        f"torch.save); give the official .pth, or an .npz of its state_dict")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise validation.ConfigError(
        f"--torch={path}: reading a .pth needs PyTorch, which is not installed (pip install "
        f"torch); or give an .npz of the state_dict (numpy.savez)") from None
  obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
  state_dict = {k: v.detach().cpu().numpy() for k, v in _unwrap(obj).items()
                if hasattr(v, "detach")}
  return state_dict, _config_dict(obj)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for flag in (_TORCH, _OUT):
    if flag.value is None:
      raise app.UsageError(f"--{flag.name} is required")
  out = pathlib.Path(_OUT.value).resolve()
  if out.exists() and not _FORCE.value:
    raise validation.ConfigError(f"--out={out} exists; give a new folder or pass --force")
  path = pathlib.Path(_TORCH.value)
  state_dict, config_dict = load_checkpoint(path, _ALLOW_PICKLE.value)
  # JAX, flax and orbax only now: a bad file is reported without waiting for them.
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from pixcon_jax import convert  # pylint: disable=g-import-not-at-top
  from pixcon_jax import models  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  if _MODEL.value is not None and _MODEL.value not in models.model_names():
    raise validation.ConfigError(f"--model={_MODEL.value}: not a registered model; one of "
                                 f"{', '.join(models.model_names())}")
  model = convert.resolve_model_name(_MODEL.value, config_dict, source=path.name)
  try:
    variables, report = convert.convert_for_model(
        model, state_dict, num_classes=_NUM_CLASSES.value,
        backbone_only=_BACKBONE_ONLY.value)
  except convert.StateDictMismatch as e:
    raise validation.ConfigError(e.summary(model, f"--torch={path}")) from None
  print(report.summary())
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(out, variables, force=_FORCE.value)
  checkpointer.wait_until_finished()
  print(f"wrote {out}")


if __name__ == "__main__":
  cli.run(main)
