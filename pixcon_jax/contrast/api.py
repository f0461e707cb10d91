"""The pixel-contrast loss and its memory bank as a library for your own train step.

Four pure functions and one settings object, re-exported from `pixcon_jax.contrast`:

    settings = contrast.make_settings(num_classes=19)          # the config's defaults, any override
    memory = contrast.create_memory(settings=settings, dim=256, num_images=2975)
    # in the step (jitted; inside shard_map / pmap pass axis_name):
    loss, metrics = contrast.contrast_loss(embedding, label, memory, key, settings=settings,
                                           predict=logits, image_id=image_id)
    # after the step (the loss reads the bank as it was before the step):
    memory = contrast.update_memory(memory, embedding, label, key2, settings=settings,
                                    image_id=image_id)

The state is explicit (a `MemoryBank` pytree the caller keeps, e.g. in its train state) and the
settings are static (a frozen, hashable dataclass: bind it with `functools.partial` or close over
it). Labels and predictions may have any spatial size: they are brought to the embedding grid
with PyTorch's legacy nearest rule (`labels.downsample_labels`), as the official code does.

This module only wires the public entry points of the package (`loss.pixel_contrast_loss`,
`memory.sample_keys[_distributed]`, `memory.push`, `memory.init_memory`, `ContrastSettings`);
`pixcon_jax.objective` and the train step use the same functions.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax import lax

from pixcon_jax.contrast import collectives
from pixcon_jax.contrast import labels as labels_lib
from pixcon_jax.contrast import loss as loss_lib
from pixcon_jax.contrast import memory as memory_lib
from pixcon_jax.contrast.collectives import AxisName
from pixcon_jax.contrast.loss import ContrastSettings
from pixcon_jax.contrast.memory import MemoryBank, MemoryUpdate

Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class MemorySettings:
  """Static settings of the memory bank (paper Sec. 3.2, 4.1).

  Attributes:
    pixels_per_class: V, pixels of each class enqueued per image and step (paper 10).
    pixel_queue_size: T, entries per class of the pixel queue; None = 10 x the number of
      training images (paper).
    region_mode: 'indexed' (the paper's [C, N, D] table, one entry per class and training image,
      written at `image_id`) or 'fifo' (a per-class queue of `region_queue_size`, no image ids).
    region_queue_size: R for region_mode='fifo'.
  """
  pixels_per_class: int = 10
  pixel_queue_size: int | None = None
  region_mode: str = "indexed"
  region_queue_size: int = 0

  def __post_init__(self):
    if self.region_mode not in ("indexed", "fifo"):
      raise ValueError(f"memory.region_mode must be 'indexed' or 'fifo', got {self.region_mode!r}")
    if self.pixels_per_class < 1:
      raise ValueError(f"memory.pixels_per_class must be >= 1, got {self.pixels_per_class}")


@dataclasses.dataclass(frozen=True)
class PixelContrastSettings:
  """Everything static about the loss and its memory. Build it with `make_settings` or
  `settings_from_config`.

  Attributes:
    loss: settings of Eq. 3 and its sampling (`ContrastSettings`; `num_classes` is set).
    memory: settings of the bank (`MemorySettings`), read only when a memory source is used.
  """
  loss: ContrastSettings
  memory: MemorySettings = MemorySettings()

  def __post_init__(self):
    if not self.loss.num_classes or self.loss.num_classes < 1:
      raise ValueError(f"num_classes must be >= 1, got {self.loss.num_classes}")

  @property
  def num_classes(self) -> int:
    return int(self.loss.num_classes)

  @property
  def uses_memory(self) -> bool:
    """Whether a memory source (pixel or region memory) is in the contrast set."""
    return self.loss.uses_memory

  @property
  def needs_image_id(self) -> bool:
    """Whether the memory update needs each image's dataset index (indexed region memory)."""
    return "region_memory" in self.loss.sources and self.memory.region_mode == "indexed"


def _field_names(cls) -> tuple[str, ...]:
  return tuple(f.name for f in dataclasses.fields(cls))


def make_settings(num_classes: int, **overrides: Any) -> PixelContrastSettings:
  """Settings from keyword arguments; every setting not given keeps configs/common.py's default.

  Those are the paper's values except the departures of docs/ABLATIONS.md (random positives and
  negatives; `mining="semi_hard"` is the paper's): one default per knob, in the dataclasses and
  the config alike.

  Args:
    num_classes: C, the classes of the label maps (labels outside [0, C) are ignored).
    **overrides: any field of `ContrastSettings` (temperature, sources, anchor_sampling,
      anchors_per_class, mining, num_positives, num_negatives, ...) or of `MemorySettings`
      (pixels_per_class, pixel_queue_size, region_mode, region_queue_size).
  Returns:
    PixelContrastSettings.
  Raises:
    TypeError: an unknown setting (the message lists the known ones).
  """
  loss_names, memory_names = _field_names(ContrastSettings), _field_names(MemorySettings)
  unknown = sorted(set(overrides) - set(loss_names) - set(memory_names) - {"num_classes"})
  if unknown:
    raise TypeError(f"unknown contrast setting(s) {unknown}; known: "
                    f"{sorted(n for n in loss_names if n != 'num_classes') + list(memory_names)}")
  loss = ContrastSettings(**{k: v for k, v in overrides.items() if k in loss_names},
                          num_classes=int(num_classes))
  memory = MemorySettings(**{k: v for k, v in overrides.items() if k in memory_names})
  return PixelContrastSettings(loss=loss, memory=memory)


def _plain(value: Any) -> Any:
  return tuple(value) if isinstance(value, list) else value


def loss_settings_from_config(config: Mapping[str, Any], *, num_classes: int) -> ContrastSettings:
  """`ContrastSettings` from the keys of `config.contrast` / `config.memory` (matched by name).

  The one way from a config to the loss's settings (the objective uses it too): every setting
  has one home in the config; a settings field missing from the config keeps its default.
  """
  values = {}
  for group in ("memory", "contrast"):
    if group in config:
      for k, v in config[group].items():
        values[k] = _plain(v)
  values["num_classes"] = num_classes
  names = _field_names(ContrastSettings)
  return ContrastSettings(**{k: v for k, v in values.items() if k in names})


def settings_from_config(config: Mapping[str, Any], *,
                         num_classes: int | None = None) -> PixelContrastSettings:
  """Settings from a pixcon_jax config (`configs/*.py`, or a run's `config.json` as a dict).

  Args:
    config: with groups `contrast` and `memory` (and `model.num_classes` unless given).
    num_classes: default `config.model.num_classes`.
  Raises:
    ValueError: `config.contrast.recipe` is not 'paper' (the official recipe is in-batch only:
      `pixcon_jax.contrast.official.official_contrast_loss`).
  """
  recipe = config.get("contrast", {}).get("recipe", "paper")
  if recipe != "paper":
    raise ValueError(f"config.contrast.recipe={recipe!r}: the library loss is the paper's recipe "
                     "(for the official one use contrast.official.official_contrast_loss)")
  if num_classes is None:
    num_classes = int(config["model"]["num_classes"])
  memory_names = _field_names(MemorySettings)
  memory = {k: _plain(v) for k, v in config.get("memory", {}).items() if k in memory_names}
  return PixelContrastSettings(loss=loss_settings_from_config(config, num_classes=num_classes),
                               memory=MemorySettings(**memory))


def create_memory(*, settings: PixelContrastSettings, dim: int, num_images: int | None = None,
                  dtype: Any = jnp.float32) -> MemoryBank | None:
  """An empty memory bank, or None when the settings use no memory source.

  Args:
    settings: the settings.
    dim: D, the embedding size.
    num_images: N, the number of training images; needed for the indexed region memory and
      for the paper's pixel queue size T = 10 N (when `pixel_queue_size` is None).
    dtype: storage dtype of the keys (bfloat16 halves the bank; similarities are float32).
  Returns:
    MemoryBank: pixel queue [C, T, D] and region memory [C, N or R, D], all entries invalid.
  """
  if not settings.uses_memory:
    return None
  m = settings.memory
  queue = m.pixel_queue_size
  if queue is None:
    if not num_images:
      raise ValueError("create_memory: pass num_images (T = 10 N per class, paper) or set "
                       "pixel_queue_size")
    queue = 10 * int(num_images)
  return memory_lib.init_memory(
      num_classes=settings.num_classes, dim=dim, pixel_queue_size=queue,
      region_mode=m.region_mode, num_images=num_images, region_queue_size=m.region_queue_size,
      dtype=dtype)


def align_labels(label: jax.Array, size: tuple[int, int]) -> jax.Array:
  """[B, H, W] labels of any size -> [B, h, w] int32 on the embedding grid (legacy nearest)."""
  label = jnp.asarray(label)
  if label.ndim != 3:
    raise ValueError(f"label must be [B, H, W], got shape {label.shape}")
  if label.shape[1:3] != tuple(size):
    label = labels_lib.downsample_labels(label, size)
  return label.astype(jnp.int32)


def align_predictions(predict: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Predictions on the embedding grid: [B, h, w] int32 class ids.

  Args:
    predict: class ids [B, H, W] (int), or logits / scores [B, H, W, C] (float: their argmax,
      without gradient), of any spatial size.
    size: (h, w) of the embedding grid.
  """
  predict = jnp.asarray(predict)
  if predict.ndim == 4:
    predict = jnp.argmax(lax.stop_gradient(predict), axis=-1)
  elif predict.ndim != 3 or jnp.issubdtype(predict.dtype, jnp.floating):
    raise ValueError(f"predict must be class ids [B, H, W] (int) or logits [B, H, W, C], got "
                     f"{predict.dtype}{list(predict.shape)}")
  return align_labels(predict, size)


def _positions(batch: int, axis_name: AxisName) -> jax.Array:
  """Positions of this device's images in the (global) mini-batch: [b] int32."""
  return collectives.index(axis_name) * batch + jnp.arange(batch, dtype=jnp.int32)


def contrast_loss(embedding: jax.Array, label: jax.Array, memory: MemoryBank | None,
                  rng: jax.Array, *, settings: PixelContrastSettings,
                  predict: jax.Array | None = None, image_id: jax.Array | None = None,
                  hard_fraction: jax.Array | None = None,
                  axis_name: AxisName = None) -> tuple[jax.Array, Metrics]:
  """The pixel-contrast loss (paper Eq. 3) of a mini-batch, against the bank `memory`.

  Args:
    embedding: [B, h, w, D] float, L2-normalised pixel embeddings (gradients flow into them).
    label: [B, H, W] int class ids, any size (255 or any id outside [0, C) = ignore).
    memory: the bank as it was before this step (None when no memory source is used). A bank
      with a pending update must be flushed first (`flush_memory`).
    rng: PRNG key (with axis_name: the same key on every device).
    settings: static settings.
    predict: predictions for seg.-aware hard anchors (`anchor_sampling='seg_aware_hard'`,
      the paper's default): class ids [B, H', W'] or logits [B, H', W', C], any size.
    image_id: [B] int, which pixels share an image (scope='intra'); default: one per row.
    hard_fraction: optional traced scalar replacing `semi_hard_fraction` (a curriculum).
    axis_name: inside `shard_map` / `pmap` over this axis, the devices evaluate one loss of the
      whole mini-batch together (each holds its images); None: these are all the images.
  Returns:
    loss: float32 scalar (0 when no anchor is valid), the same on every device of `axis_name`.
    metrics: float32 scalars: num_valid_anchors, valid_anchor_fraction, num_hard_anchors,
      mean_positives, mean_negatives.
  """
  s = settings.loss
  b, h, w, _ = embedding.shape
  label = align_labels(label, (h, w))
  if predict is not None:
    predict = align_predictions(predict, (h, w))
  elif s.anchor_sampling == "seg_aware_hard":
    raise ValueError("contrast_loss: anchor_sampling='seg_aware_hard' (the paper's) needs "
                     "`predict` (class ids or logits); or use make_settings(..., "
                     "anchor_sampling='random')")
  if settings.uses_memory:
    if memory is None:
      raise ValueError(f"contrast_loss: sources {s.sources} need a memory bank (create_memory)")
    if memory.pending is not None:
      raise ValueError("contrast_loss: the bank has a pending update; flush_memory(memory) first")
  else:
    memory = None
  image_id = _positions(b, axis_name) if image_id is None else jnp.asarray(image_id)
  return loss_lib.pixel_contrast_loss(embedding, label, predict, image_id, memory, rng,
                                      settings=s, hard_fraction=hard_fraction,
                                      axis_name=axis_name)


def memory_keys(embedding: jax.Array, label: jax.Array, rng: jax.Array, *,
                settings: PixelContrastSettings, image_id: jax.Array | None = None,
                axis_name: AxisName = None) -> MemoryUpdate:
  """The keys a step adds to the bank (V random pixels and the mean embedding per class/image).

  Detached. With `axis_name` each device samples its own images and the samples are
  all-gathered: the update is the whole mini-batch's, identical on every device (and equal to
  the single-device update of the gathered batch). `push_memory` writes it; or keep it as the
  bank's `pending` update and `flush_memory` at the start of the next step, which lets XLA
  update a large bank in place (see `contrast/memory.py`, "Deferred writes").

  Args:
    embedding: [B, h, w, D].
    label: [B, H, W] any size.
    rng: PRNG key (the same on every device).
    image_id: [B] int, each image's index in the training set (the row of the indexed region
      memory); required when the region memory is indexed.
  Returns:
    MemoryUpdate of the mini-batch ([B_global, C, V, D] pixel keys).
  """
  b, h, w, _ = embedding.shape
  if image_id is None:
    if settings.needs_image_id:
      raise ValueError("memory update: the indexed region memory needs image_id (each image's "
                       "index in the training set), or use make_settings(..., region_mode='fifo')")
    image_id = jnp.full((b,), -1, jnp.int32)
  kwargs = dict(num_classes=settings.num_classes,
                pixels_per_class=settings.memory.pixels_per_class,
                ignore_label=settings.loss.ignore_label)
  label = align_labels(label, (h, w))
  image_id = jnp.asarray(image_id, jnp.int32)
  if axis_name is None:
    return memory_lib.sample_keys(embedding, label, image_id, rng, **kwargs)
  return memory_lib.sample_keys_distributed(embedding, label, image_id, rng,
                                            axis_name=axis_name, **kwargs)


def update_memory(memory: MemoryBank, embedding: jax.Array, label: jax.Array, rng: jax.Array, *,
                  settings: PixelContrastSettings, image_id: jax.Array | None = None,
                  axis_name: AxisName = None) -> MemoryBank:
  """The bank after a step: `memory` with this step's keys enqueued (FIFO per class).

  Args: as `memory_keys`; `memory` is the bank (replicated over `axis_name`).
  Returns:
    The new bank, identical on every device of `axis_name`.
  """
  return memory_lib.push(memory, memory_keys(embedding, label, rng, settings=settings,
                                             image_id=image_id, axis_name=axis_name))


push_memory = memory_lib.push
flush_memory = memory_lib.flush
