"""A trained segmenter from Python: numpy images in, numpy label maps out.

    seg = pixcon_jax.load_segmenter("/path/to/workdir", protocol="single")
    label = seg(image)              # [H, W, 3] uint8 RGB -> [H, W] train ids (int32)
    labels = seg(images)            # [N, H, W, 3] -> [N, H, W]; a list -> a list
    ids = seg.label_ids(image)      # the dataset's raw label ids (Cityscapes labelIds)
    rgb = seg.colorize(label)       # [H, W] train ids -> [H, W, 3] uint8 in the palette

`load_segmenter` takes a run's workdir (its `config.json` gives the model, the dataset, the
normalisation and the evaluation protocol; the weights are those mode eval / predict read:
`checkpointing.load_variables`) or the --out folder of scripts/convert_checkpoint.py (no
config.json: the model name comes from the caller, the official recipe's BGR normalisation is
assumed). Mode predict (`predict.predict_folder`) segments through the same `Segmenter`, so
both give the same pixels. `Segmenter.export` gives the same computation as a `jax.export`
artifact that runs without pixcon_jax (scripts/export.py).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pixcon_jax import checkpointing
from pixcon_jax import inference
from pixcon_jax import paths
from pixcon_jax import precision
from pixcon_jax import setup
from pixcon_jax import validation
from pixcon_jax.data import classes
from pixcon_jax.data import datasets
from pixcon_jax.data import transforms

CONFIG_FILE = "config.json"  # Written by train.save_run_config at the start of every run.
# Keys of `config.eval` that `load_segmenter(..., **eval_overrides)` may set.
EVAL_KEYS = ("mode", "scales", "flip", "crop_size", "stride", "aggregate")

Images = np.ndarray | Sequence[np.ndarray]


@dataclasses.dataclass(frozen=True)
class Segmenter:
  """A model, its weights, its input normalisation and its inference protocol.

  Attributes:
    model: the eval model (`setup.Experiment.eval_model`: BN with running statistics).
    variables: {"params", "batch_stats"} on one device.
    settings: the inference protocol (`inference.InferenceSettings`).
    augment: the normalisation the model was trained with (`transforms.AugmentConfig`).
    info: the dataset (class names, palette, raw label ids).
    matmul_precision: of every dot and conv (`precision.matmul_precision`).
    source: where the weights came from (checkpoint and step, or the converted folder).
    config: the experiment config it was built from.
  """
  model: Any
  variables: Any
  settings: inference.InferenceSettings
  augment: transforms.AugmentConfig
  info: datasets.DatasetInfo
  matmul_precision: str | None
  source: str
  config: ml_collections.ConfigDict

  @property
  def num_classes(self) -> int:
    return self.info.num_classes

  @property
  def class_names(self) -> tuple[str, ...]:
    return tuple(self.info.class_names)

  @property
  def palette(self) -> np.ndarray:
    """[C, 3] uint8 colour of each train id."""
    return np.asarray(self.info.palette, np.uint8)

  @functools.cached_property
  def _apply_fn(self) -> inference.ApplyFn:
    return inference.logits_apply_fn(self.model, matmul_precision=self.matmul_precision)

  @functools.cached_property
  def _label_fn(self):
    """Jitted (variables, normalised [N, H, W, 3]) -> [N, H, W] int32 (compiles per shape)."""
    return make_predictor(self._apply_fn, self.settings)

  @functools.cached_property
  def _scores_fn(self):
    return jax.jit(functools.partial(inference.predict_scores, self._apply_fn,
                                     settings=self.settings))

  def normalize(self, images: np.ndarray) -> np.ndarray:
    """[..., H, W, 3] RGB on 0-255 -> float32 as in training (`transforms.normalize`)."""
    return transforms.normalize(_check_images(images), self.augment)

  def _batched(self, fn, images: Images, normalized: bool) -> np.ndarray | list[np.ndarray]:
    if isinstance(images, (list, tuple)):
      return [self._batched(fn, image, normalized) for image in images]
    images = _check_images(images)
    x = np.asarray(images, np.float32) if normalized else self.normalize(images)
    if x.ndim == 3:
      return np.asarray(fn(self.variables, x[None]))[0]
    return np.asarray(fn(self.variables, x))

  def __call__(self, images: Images, *, normalized: bool = False) -> np.ndarray | list[np.ndarray]:
    """Train ids of each pixel.

    Args:
      images: [H, W, 3] or [N, H, W, 3] RGB on 0-255 (uint8, any size), or a list of such
        images (each its own size). With `normalized=True`, already normalised float input.
    Returns:
      [H, W] / [N, H, W] int32 train ids (a list for a list).
    """
    return self._batched(self._label_fn, images, normalized)

  def logits(self, images: Images, *, normalized: bool = False) -> np.ndarray | list[np.ndarray]:
    """The protocol's summed scores: [..., H, W, C] float32 (argmax of them is `self(images)`)."""
    return self._batched(self._scores_fn, images, normalized)

  def label_ids(self, images: Images) -> np.ndarray | list[np.ndarray]:
    """The dataset's raw label ids of each pixel (Cityscapes `labelIds`), as mode predict's
    `label_format='label_id'`: [H, W] / [N, H, W] int64 (a list for a list)."""
    lut = classes.train_id_to_id_lut(self.info.class_table)
    labels = self(images)
    return [lut[x] for x in labels] if isinstance(labels, list) else lut[labels]

  def colorize(self, labels: np.ndarray | Sequence[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """Train ids [..., H, W] -> [..., H, W, 3] uint8 in the dataset palette (255 is black)."""
    if isinstance(labels, (list, tuple)):
      return [self.colorize(x) for x in labels]
    return colorize(np.asarray(labels), self.palette)

  def export(self, image_shape: str | Sequence[int | str], *,
             platforms: Sequence[str] | None = None) -> jax.export.Exported:
    """The segmenter as a `jax.export.Exported`: uint8 images -> int32 train ids, weights inside.

    Args:
      image_shape: shape of the uint8 input [N, H, W, 3]; ints and/or symbolic dimension
        names, e.g. (1, 512, 1024, 3), "b, 512, 1024, 3" or "b, h, w, 3"
        (`jax.export.symbolic_shape`; a symbolic H or W needs a single-scale protocol).
      platforms: to lower for ('cpu', 'cuda', 'rocm', 'tpu'); None: the default backend.
    Returns:
      The `Exported`; `exported.call(image)` (after `jax.export.deserialize` of
      `exported.serialize()`) needs jax only. Normalisation runs inside the graph.
    """
    if isinstance(image_shape, str):
      shape = jax.export.symbolic_shape(image_shape)
    elif any(isinstance(d, str) for d in image_shape):
      shape = jax.export.symbolic_shape(", ".join(str(d) for d in image_shape))
    else:
      shape = tuple(int(d) for d in image_shape)
    mean, std = transforms.mean_std(self.augment)
    variables = jax.tree.map(np.asarray, self.variables)
    # XLA's own convolutions: the CPU algorithms of `models.conv` pick themselves by static
    # sizes, and the artifact may run on any platform. Same variables, same arithmetic.
    config = self.config.copy_and_resolve_references()
    config.model.conv_impl = "xla"
    apply_fn = inference.logits_apply_fn(setup.build_model(config, train=False),
                                         matmul_precision=self.matmul_precision)

    def segment(image):
      x = image.astype(jnp.float32)
      if self.augment.bgr:
        x = x[..., ::-1]
      x = (x - mean) * (1.0 / std)  # transforms.normalize, in the graph.
      scores = inference.predict_scores(apply_fn, variables, x, settings=self.settings)
      return jnp.argmax(scores, axis=-1).astype(jnp.int32)

    return jax.export.export(jax.jit(segment), platforms=platforms)(
        jax.ShapeDtypeStruct(shape, jnp.uint8))


def _check_images(images: Any) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim not in (3, 4) or images.shape[-1] != 3:
    raise validation.InputError(
        f"images must be [H, W, 3] or [N, H, W, 3] RGB arrays (or a list of them), got shape "
        f"{list(images.shape)}")
  return images


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
  """[..., H, W] train ids -> [..., H, W, 3] uint8; ids without a colour (255) are black."""
  lut = np.zeros((max(256, len(palette)), 3), np.uint8)
  lut[:len(palette)] = palette
  return lut[np.clip(labels.astype(np.int64), 0, len(lut) - 1)]


def make_predictor(apply_fn: inference.ApplyFn, settings: inference.InferenceSettings):
  """Jitted `(variables, image [N, H, W, 3]) -> label [N, H, W] int32` (recompiles per size)."""
  @jax.jit
  def predict(variables, image):
    scores = inference.predict_scores(apply_fn, variables, image, settings=settings)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)
  return predict


# ------------------------------------------------------------------------------------------
# Building a Segmenter.

def from_config(config: ml_collections.ConfigDict, workdir: str, *,
                mesh: Any = None) -> Segmenter:
  """The segmenter of `config` with the inference weights of `workdir` (else `config.init_from`).

  The weights are read as by modes eval / predict (`checkpointing.load_variables`), the
  protocol is `config.eval`'s, the normalisation `config.augment`'s; `mesh` holds the devices
  the weights are loaded onto (default: every device of the run).
  """
  exp = setup.for_inference(config, mesh)
  variables, source, _ = checkpointing.load_variables(config, workdir, model=exp.eval_model,
                                                     mesh=exp.mesh)
  # One device per process; the replicated copy already sits there.
  local = jax.tree.map(lambda x: x.addressable_data(0), variables)
  return Segmenter(model=exp.eval_model, variables=local,
                   settings=inference.settings_from_config(config.eval),
                   augment=transforms.AugmentConfig.from_config(config.augment),
                   info=exp.info, matmul_precision=precision.matmul_precision(config),
                   source=source, config=config)


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The `config.json` of a run directory as a ConfigDict (tuples come back as lists)."""
  path = paths.resolve(workdir) / CONFIG_FILE
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except ValueError as e:
    raise validation.ConfigError(f"{path}: not a run's config.json ({e})") from None


def converted_config(checkpoint: str, model: str, dataset: str) -> ml_collections.ConfigDict:
  """The config of a converted official checkpoint: the paper's defaults, the official
  normalisation (BGR, `configs.common.apply_official`), weights from `checkpoint`."""
  from configs import common  # pylint: disable=g-import-not-at-top
  info = datasets.get_dataset_info(dataset)
  config = common.base_config(model=model, dataset=dataset, num_classes=info.num_classes,
                              crop_size=info.crop_size, batch_size=8, lr=0.01, total_steps=1)
  config = common.finalize(config, "official")
  config.data.eval_batch_size = 1
  config.init_from = checkpoint
  config.init_from_scope = "full"
  return config


def _set(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """config[a][b] = value for 'a.b'; ConfigError naming an unknown key."""
  node = config
  *parents, leaf = key.split(".")
  for part in parents:
    if part not in node:
      raise validation.ConfigError(f"load_segmenter: overrides[{key!r}]: the config has no "
                                   f"group {part!r}")
    node = node[part]
  if leaf not in node:
    raise validation.ConfigError(f"load_segmenter: overrides[{key!r}]: the config has no key "
                                 f"{leaf!r}")
  with node.ignore_type():
    node[leaf] = value


def load_segmenter(path: str, *, protocol: str | None = None, model: str | None = None,
                   dataset: str | None = None, overrides: Mapping[str, Any] | None = None,
                   **eval_overrides: Any) -> Segmenter:
  """A trained segmenter from a run's workdir or a converted official checkpoint.

  Args:
    path: a run's workdir (with `config.json`; the latest checkpoint, else the run's
      `init_from`) or the --out folder of scripts/convert_checkpoint.py. Local or gs://.
    protocol: 'single' | 'paper' | 'official' (`inference.PROTOCOLS`: scales and flip), or
      None for the run's own `config.eval` (what mode predict uses).
    model: registry name of a converted checkpoint's model (e.g. 'hrnet_w48_contrast');
      required there, checked against the run's config for a workdir.
    dataset: a converted checkpoint's dataset (default 'cityscapes'); checked for a workdir.
    overrides: dotted config keys to change, e.g. {"eval.mode": "slide",
      "eval.crop_size": (512, 1024), "augment.bgr": False}.
    **eval_overrides: shorthand for `config.eval` keys (`EVAL_KEYS`), e.g. mode='slide'.
  Returns:
    A `Segmenter`.
  Raises:
    validation.InputError (one line naming the path or the argument) when `path` does not
    exist, holds neither a run nor a converted checkpoint, or its weights do not fit.
  """
  root = paths.resolve(path)
  where = f"load_segmenter({path!r})"
  if not root.exists():
    raise validation.MissingInputError(
        f"{where}: no such file or directory; give a run's workdir (with {CONFIG_FILE}) or "
        f"the --out folder of scripts/convert_checkpoint.py")
  if (root / CONFIG_FILE).exists():
    config = read_run_config(path)
    for arg, key, value in (("model", "name", model), ("dataset", "dataset", dataset)):
      have = config.model.name if key == "name" else config.data.dataset
      if value is not None and value != have:
        raise validation.ConfigError(f"{where}: {arg}={value!r} but the run's {CONFIG_FILE} "
                                     f"has {have!r}; leave {arg} out for a run's workdir")
  elif root.is_dir():
    if not model:
      raise validation.ConfigError(
          f"{where} has no {CONFIG_FILE}, so it is not a run's workdir; for a converted "
          f"checkpoint (scripts/convert_checkpoint.py) pass model=..., e.g. "
          f"model='hrnet_w48_contrast'")
    try:
      config = converted_config(path, model, dataset or "cityscapes")
    except ValueError as e:  # an unknown model or dataset name
      raise validation.ConfigError(f"{where}: {e}") from None
  else:
    raise validation.ConfigError(
        f"{where} is a file; give a run's workdir (with {CONFIG_FILE}) or the --out folder "
        f"of scripts/convert_checkpoint.py")
  overrides = dict(overrides or {})
  unknown = sorted(set(eval_overrides) - set(EVAL_KEYS))
  if unknown:
    raise validation.ConfigError(f"load_segmenter: unknown argument(s) {unknown}; eval keys: "
                                 f"{list(EVAL_KEYS)}")
  overrides.update({f"eval.{k}": v for k, v in eval_overrides.items()})
  if protocol is not None:
    if protocol not in inference.PROTOCOLS:
      raise validation.ConfigError(f"load_segmenter: protocol={protocol!r}: expected one of "
                                   f"{sorted(inference.PROTOCOLS)} or None (the run's)")
    overrides["eval.protocol"] = protocol
  for key, value in overrides.items():
    _set(config, key, value)
  try:
    return from_config(config, path)
  except validation.InputError as e:
    raise type(e)(f"{where}: {e}") from None
  except ValueError as e:  # weights that do not fit the model, a bad eval setting
    raise validation.ConfigError(f"{where}: {str(e).splitlines()[0]}") from None
