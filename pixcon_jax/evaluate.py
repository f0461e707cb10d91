"""Inference (whole-image / sliding-window, multi-scale + flip) and dataset-level evaluation.

Inference protocol (matches the official `segmentor/tester.py`, `ss_test` / `ms_test` /
`sscrop_test`, of ContrastiveSeg / openseg.pytorch):

- For every scale s the full-resolution image [H, W] is resized with bilinear
  `align_corners=True` to `(int(H * s), int(W * s))` (truncation, as `int()` in the
  official code), run through the network, and the logits are resized back to [H, W]
  with bilinear `align_corners=True`.
- With flip, the horizontally flipped full-resolution image goes through the same path
  and its full-resolution logits are flipped back.
- The per-scale (and flipped) full-resolution maps are SUMMED and the prediction is the
  argmax of the sum at full resolution. By default the raw logits are summed: that is
  what the official `ms_test` does (its `probs` are the upsampled logits, no softmax).
  `config.eval.aggregate = 'softmax'` sums per-pass softmax probabilities instead.
- Sliding window (`mode='slide'`): at each scale, windows of `crop_size` are placed every
  `stride` pixels plus one flush with the far border (the official `_decide_intersection`
  with a configurable stride; official stride = crop), each window's logits are resized
  to the window size, overlapping logits are averaged, and the averaged map is resized to
  [H, W]. A dimension shorter than the crop uses one window of the whole dimension (no
  padding), so an image that fits in one window gives exactly whole-image inference.

Only `logits` of the model output is used: the projection head (`embedding`) and the
memory bank play no part at inference (paper Sec. 3.4).

Execution: one jitted, `shard_map`-ped function per scale adds that scale's (flip-)
logits into a full-resolution accumulator (donated); a final jitted function takes the
argmax and builds the batch confusion matrix from valid pixels only (label 255 and
padding examples excluded), `psum`-med over the mesh axis `'data'`. Inputs are global
arrays (`jax.make_array_from_process_local_data`), so the sum spans hosts too. The
dataset-level matrix is accumulated in int64 on the host; metrics come from it
(`pixcon_jax.metrics`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pixcon_jax import metrics as metrics_lib
from pixcon_jax import paths
from pixcon_jax import precision as precision_lib
from pixcon_jax import sharding as sharding_lib
from pixcon_jax.models import layers

DATA_AXIS = sharding_lib.DATA_AXIS

# Named protocols for `config.eval.protocol`. None/'' means: use the explicit keys.
PROTOCOLS: dict[str, dict[str, Any]] = {
    # One pass at the original size.
    "single": dict(scales=(1.0,), flip=False),
    # Paper Sec. 4.1 "Testing": scales 0.75 to 2.0 step 0.25, with flipping.
    "paper": dict(scales=(0.75, 1.0, 1.25, 1.5, 1.75, 2.0), flip=True),
    # Official H_48_D_4_TEST.json: `ms_test`, scale_search 0.5 to 2.0 step 0.25, flipping.
    "official": dict(scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0), flip=True),
}

ApplyFn = Callable[[Any, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
  """Static settings of the inference protocol (hashable, bound once).

  Attributes:
    mode: 'whole' or 'slide'.
    scales: scale factors of the input image.
    flip: also run the horizontally flipped image.
    crop_size: (h, w) sliding window (mode 'slide').
    stride: (h, w) window step (mode 'slide'); defaults to crop_size (official).
    aggregate: 'logits' (official: sum raw upsampled logits) or 'softmax'.
  """
  mode: str = "whole"
  scales: tuple[float, ...] = (1.0,)
  flip: bool = False
  crop_size: tuple[int, int] | None = None
  stride: tuple[int, int] | None = None
  aggregate: str = "logits"

  def __post_init__(self):
    if self.mode not in ("whole", "slide"):
      raise ValueError(f"config.eval.mode must be 'whole' or 'slide', got {self.mode!r}")
    if self.aggregate not in ("logits", "softmax"):
      raise ValueError(f"config.eval.aggregate must be 'logits' or 'softmax', got {self.aggregate!r}")
    if not self.scales or any(s <= 0 for s in self.scales):
      raise ValueError(f"config.eval.scales must be positive, got {self.scales!r}")
    if self.mode == "slide":
      if self.crop_size is None or len(self.crop_size) != 2 or min(self.crop_size) <= 0:
        raise ValueError(f"config.eval.crop_size must be (h, w) > 0 for mode 'slide', "
                         f"got {self.crop_size!r}")
      if self.stride is not None and (len(self.stride) != 2 or min(self.stride) <= 0 or
                                      any(s > c for s, c in zip(self.stride, self.crop_size))):
        # A stride above the crop would leave pixels no window covers.
        raise ValueError(f"config.eval.stride must be (h, w) with 0 < stride <= crop_size "
                         f"{self.crop_size}, got {self.stride!r}")


def _pair(value: Any) -> tuple[int, int] | None:
  if value is None:
    return None
  if isinstance(value, (int, np.integer)):
    return (int(value), int(value))
  value = tuple(int(v) for v in value)
  if not value or min(value) <= 0:  # () or (0, 0) means "not set"
    return None
  return value if len(value) == 2 else (value[0], value[0])


def settings_from_config(eval_config: Any) -> InferenceSettings:
  """Builds `InferenceSettings` from `config.eval`.

  Keys (all optional): `protocol` ('single' | 'paper' | 'official' | None: named scales
  and flip, overriding `scales`/`flip`), `mode`, `scales`, `flip`, `crop_size`, `stride`,
  `aggregate`.
  """
  get = (lambda k, d=None: eval_config.get(k, d)) if hasattr(eval_config, "get") else (
      lambda k, d=None: getattr(eval_config, k, d))
  scales = tuple(float(s) for s in (get("scales") or (1.0,)))
  flip = bool(get("flip", False))
  protocol = get("protocol")
  if protocol:
    if protocol not in PROTOCOLS:
      raise ValueError(f"config.eval.protocol must be one of {sorted(PROTOCOLS)} or None, "
                       f"got {protocol!r}")
    scales = tuple(PROTOCOLS[protocol]["scales"])
    flip = bool(PROTOCOLS[protocol]["flip"])
  return InferenceSettings(mode=get("mode", "whole") or "whole", scales=scales, flip=flip,
                           crop_size=_pair(get("crop_size")), stride=_pair(get("stride")),
                           aggregate=get("aggregate", "logits") or "logits")


# ------------------------------------------------------------------------------------------
# Pure inference functions (per device; jit / shard_map safe; shapes static).

def window_starts(length: int, crop: int, stride: int) -> list[int]:
  """Start offsets of sliding windows along one axis, the last flush with the border.

  `length <= crop` gives one window [0, length). Otherwise windows every `stride` and
  one more ending at `length` if the grid does not reach it.
  """
  if length <= crop:
    return [0]
  starts = list(range(0, length - crop + 1, stride))
  if starts[-1] + crop < length:
    starts.append(length - crop)
  return starts


def _whole_logits(apply_fn: ApplyFn, variables: Any, image: jax.Array) -> jax.Array:
  """image [B, h, w, 3] -> head logits [B, h', w', C] (head stride)."""
  return apply_fn(variables, image)


def _slide_logits(apply_fn: ApplyFn, variables: Any, image: jax.Array,
                  crop_size: tuple[int, int], stride: tuple[int, int]) -> jax.Array:
  """Sliding-window logits averaged over overlaps.

  Args:
    image: [B, h, w, 3].
  Returns:
    [B, h, w, C] float32: each window's logits resized (align_corners) to the window
    size, summed into the canvas and divided by the per-pixel window count.
  """
  _, h, w, _ = image.shape
  ch, cw = min(crop_size[0], h), min(crop_size[1], w)
  ys = window_starts(h, ch, stride[0])
  xs = window_starts(w, cw, stride[1])
  if len(ys) == 1 and len(xs) == 1:
    return layers.resize_bilinear(apply_fn(variables, image), (h, w))
  windows = [(y, x) for y in ys for x in xs]
  crops = jnp.stack([image[:, y:y + ch, x:x + cw] for y, x in windows])  # [N, B, ch, cw, 3]
  # lax.map runs the network once per window inside one compiled loop: the graph holds one
  # copy of the network and peak memory is that of a single window.
  logits = jax.lax.map(
      lambda crop: layers.resize_bilinear(apply_fn(variables, crop), (ch, cw)), crops)
  count = np.zeros((h, w), np.float32)
  canvas = None
  for i, (y, x) in enumerate(windows):
    count[y:y + ch, x:x + cw] += 1.0
    padded = jnp.pad(logits[i], ((0, 0), (y, h - y - ch), (x, w - x - cw), (0, 0)))
    canvas = padded if canvas is None else canvas + padded
  return canvas / jnp.asarray(count)[None, :, :, None]


def single_pass_logits(apply_fn: ApplyFn, variables: Any, image: jax.Array, *, scale: float,
                       settings: InferenceSettings) -> jax.Array:
  """Logits of one scale (no flip), resized back to the input size.

  Args:
    image: [B, H, W, 3] normalised, full resolution.
  Returns:
    [B, H, W, C] float32 raw logits (official `ss_test` / `sscrop_test`).
  """
  _, height, width, _ = image.shape
  size = (int(height * scale), int(width * scale))
  x = image if size == (height, width) else layers.resize_bilinear(image, size)
  if settings.mode == "whole":
    logits = _whole_logits(apply_fn, variables, x)
  else:
    logits = _slide_logits(apply_fn, variables, x, settings.crop_size,
                           settings.stride or settings.crop_size)
  return layers.resize_bilinear(logits.astype(jnp.float32), (height, width))


def scale_scores(apply_fn: ApplyFn, variables: Any, image: jax.Array, *, scale: float,
                 settings: InferenceSettings) -> jax.Array:
  """Scores of one scale, plus its flipped pass when `settings.flip`.

  Returns:
    [B, H, W, C] float32: logits (or softmax if `aggregate == 'softmax'`) summed over
    the plain and the flipped-back flipped pass.
  """
  def one(x):
    out = single_pass_logits(apply_fn, variables, x, scale=scale, settings=settings)
    return jax.nn.softmax(out, axis=-1) if settings.aggregate == "softmax" else out

  if not settings.flip:
    return one(image)
  # The flipped copy rides along the batch axis: one network call, so the compiled graph holds
  # one copy of the network (inference BN is per example, so results are unchanged).
  b = image.shape[0]
  both = one(jnp.concatenate([image, jnp.flip(image, axis=2)], axis=0))
  return both[:b] + jnp.flip(both[b:], axis=2)


def predict_scores(apply_fn: ApplyFn, variables: Any, image: jax.Array, *,
                   settings: InferenceSettings) -> jax.Array:
  """Full protocol in one function (all scales + flip summed): [B, H, W, 3] -> [B, H, W, C]."""
  total = None
  for scale in settings.scales:
    s = scale_scores(apply_fn, variables, image, scale=scale, settings=settings)
    total = s if total is None else total + s
  return total


def logits_apply_fn(model: Any, *, matmul_precision: str | None = None) -> ApplyFn:
  """`(variables, image) -> logits` of a segmentation model in inference mode.

  Only the segmentation logits are kept; XLA removes the unused projection head.
  `matmul_precision` (`precision.matmul_precision(config)`; None: JAX's default) is that of
  every dot and conv of the model.
  """
  def apply_fn(variables, image):
    variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
    return model.apply(variables, image, train=False)["logits"]
  if matmul_precision is None:
    return apply_fn
  return precision_lib.with_matmul_precision(apply_fn, matmul_precision)


# ------------------------------------------------------------------------------------------
# Sharded evaluator.

def _pad_batch(batch: Mapping[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
  """Pads a host-local batch with invalid examples to a multiple of `multiple` images."""
  batch = {k: np.asarray(v) for k, v in batch.items()}
  n = batch["image"].shape[0]
  if "valid" not in batch:
    batch["valid"] = np.ones((n,), bool)
  extra = (-n) % multiple
  if not extra:
    return batch
  out = {}
  for k, v in batch.items():
    fill = 255 if k == "label" else 0
    out[k] = np.concatenate([v, np.full((extra,) + v.shape[1:], fill, v.dtype)])
  return out


class Evaluator:
  """Sharded multi-scale / flip / sliding-window evaluation to a dataset-level confusion matrix.

  `evaluator(variables, batches)` -> metrics dict (see `metrics_from_confusion_matrix`),
  plus `num_images` (valid examples counted). `batches` yields host-local dicts with
  `image [B, H, W, 3]`, `label [B, H, W]` (255 ignore) and optional `valid [B]`; every host
  must yield the same number of batches of the same shape (the eval pipeline pads).
  """

  def __init__(self, apply_fn: ApplyFn, mesh: Mesh, *, num_classes: int,
               settings: InferenceSettings, class_names: Sequence[str] | None = None):
    self.mesh = mesh
    self.num_classes = num_classes
    self.settings = settings
    self.class_names = tuple(class_names) if class_names is not None else None
    self._replicated = NamedSharding(mesh, P())
    self._sharded = NamedSharding(mesh, P(DATA_AXIS))
    self._zeros_fns: dict[tuple[int, ...], Callable[[], jax.Array]] = {}

    def add_scale(variables, image, acc, *, scale):
      return acc + scale_scores(apply_fn, variables, image, scale=scale, settings=settings)

    # One compiled function per scale (static output size); the accumulator is donated so
    # only one full-resolution score map lives per device.
    self._scale_steps = {
        scale: jax.jit(
            jax.shard_map(functools.partial(add_scale, scale=scale), mesh=mesh,
                          in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS)), out_specs=P(DATA_AXIS)),
            donate_argnums=(2,))
        for scale in dict.fromkeys(settings.scales)}

    def finish(scores, label, valid):
      prediction = jnp.argmax(scores, axis=-1)
      cm = metrics_lib.confusion_matrix(prediction, label, num_classes, valid[:, None, None])
      return (jax.lax.psum(cm, DATA_AXIS),
              jax.lax.psum(jnp.sum(valid.astype(jnp.int32)), DATA_AXIS))

    self._finish = jax.jit(jax.shard_map(
        finish, mesh=mesh, in_specs=(P(DATA_AXIS),) * 3, out_specs=(P(), P())))

  def _zeros(self, shape: tuple[int, ...]) -> jax.Array:
    if shape not in self._zeros_fns:
      self._zeros_fns[shape] = jax.jit(lambda: jnp.zeros(shape, jnp.float32),
                                       out_shardings=self._sharded)
    return self._zeros_fns[shape]()

  def batch_confusion(self, variables: Any, batch: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
    """Confusion matrix [C, C] int32 and valid-image count of one batch, psum-med, on device."""
    local = _pad_batch(batch, jax.local_device_count())
    arrays = sharding_lib.host_local_to_global(
        {"image": local["image"].astype(np.float32), "label": local["label"].astype(np.int32),
         "valid": local["valid"].astype(bool)}, self.mesh)
    b, h, w = arrays["label"].shape
    scores = self._zeros((b, h, w, self.num_classes))
    for scale in self.settings.scales:
      scores = self._scale_steps[scale](variables, arrays["image"], scores)
    return self._finish(scores, arrays["label"], arrays["valid"])

  def confusion_matrix(self, variables: Any, batches: Iterable[Mapping[str, Any]], *,
                       max_batches: int | None = None) -> tuple[np.ndarray, int]:
    """Dataset-level confusion matrix [C, C] int64 and the number of valid images."""
    variables = jax.device_put(
        {k: v for k, v in variables.items() if k in ("params", "batch_stats")}, self._replicated)
    total = np.zeros((self.num_classes, self.num_classes), np.int64)
    images = 0
    pending: list[tuple[jax.Array, jax.Array]] = []

    def drain(keep: int):
      nonlocal total, images
      while len(pending) > keep:
        cm, n = pending.pop(0)
        # int32 per batch on device, int64 across batches on the host: no overflow on a
        # full split (Cityscapes val is ~1e9 pixels).
        # The psum-med results are replicated: read this host's copy, no cross-host gather.
        total += np.asarray(cm.addressable_data(0)).astype(np.int64)
        images += int(np.asarray(n.addressable_data(0)))

    for i, batch in enumerate(batches):
      if max_batches is not None and i >= max_batches:
        break
      cm, n = self.batch_confusion(variables, batch)
      cm.copy_to_host_async()
      pending.append((cm, n))
      drain(keep=2)  # a short queue keeps dispatch ahead of the device without a sync per batch
    drain(keep=0)
    return total, images

  def __call__(self, variables: Any, batches: Iterable[Mapping[str, Any]], *,
               max_batches: int | None = None) -> dict[str, Any]:
    cm, images = self.confusion_matrix(variables, batches, max_batches=max_batches)
    out = metrics_lib.metrics_from_confusion_matrix(cm, self.class_names)
    out["num_images"] = float(images)
    return out


def make_evaluator(config: Any, model: Any, mesh: Mesh | None = None, *,
                   class_names: Sequence[str] | None = None) -> Evaluator:
  """The evaluator for a config: `evaluator(variables, eval_batches) -> metrics dict`.

  Args:
    config: the experiment ConfigDict (`config.eval`, `config.model.num_classes`).
    model: a segmentation model (linen module); only its `logits` are used.
    mesh: the data mesh (default: all devices).
    class_names: names for per-class IoU (default: from `config.data.dataset` if known).
  Returns:
    an `Evaluator`; metrics keys `miou`, `pixel_accuracy`, `mean_accuracy`, `fw_iou`,
    `iou/<class>`, `num_pixels`, `num_images`.
  """
  mesh = mesh if mesh is not None else sharding_lib.make_mesh()
  num_classes = int(config.model.num_classes)
  if class_names is None:
    class_names = _dataset_class_names(config, num_classes)
  apply_fn = logits_apply_fn(model, matmul_precision=precision_lib.matmul_precision(config))
  return Evaluator(apply_fn, mesh, num_classes=num_classes,
                   settings=settings_from_config(config.eval), class_names=class_names)


def _dataset_class_names(config: Any, num_classes: int) -> Sequence[str] | None:
  try:
    from pixcon_jax import data  # pylint: disable=g-import-not-at-top
    names = tuple(data.get_dataset_info(config.data.dataset).class_names)
    return names if len(names) == num_classes else None
  except Exception:  # pylint: disable=broad-except
    return None


# ------------------------------------------------------------------------------------------
# Mode `eval`: a checkpoint (or converted official weights) on a split.

def _check_complete(variables: Mapping[str, Any], model: Any, name: str) -> None:
  """Raises naming every missing or mis-shaped variable of `model` in `variables`."""
  import flax  # pylint: disable=g-import-not-at-top
  from pixcon_jax import convert  # pylint: disable=g-import-not-at-top
  want = flax.traverse_util.flatten_dict(
      {k: v for k, v in flax.core.unfreeze(checkpointing.variable_shapes(model)).items()
       if k in ("params", "batch_stats")})
  have = flax.traverse_util.flatten_dict(
      {k: dict(v) for k, v in variables.items() if k in ("params", "batch_stats")})
  missing = ["/".join(p) for p in want if p not in have]
  bad = [f"{'/'.join(p)} {tuple(np.shape(have[p]))} != {tuple(want[p].shape)}"
         for p in want if p in have and tuple(np.shape(have[p])) != tuple(want[p].shape)]
  if missing or bad:
    raise ValueError(f"{name} does not fit the model: {len(missing)} missing "
                     f"{missing[:10]}, {len(bad)} shape mismatches {bad[:10]}")


def load_variables(config: Any, workdir: str, exp: Any = None) -> tuple[dict[str, Any], str, int]:
  """Inference variables: the latest checkpoint in `workdir`, else `config.init_from`.

  Args:
    config: the experiment config.
    workdir: run directory (checkpoints under `workdir/checkpoints`).
    exp: a `train.Experiment` (built from config if None).
  Returns:
    ({"params", "batch_stats"} replicated on the mesh, description of the source, step).
  Raises:
    FileNotFoundError naming both places when neither has weights.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from pixcon_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from pixcon_jax import convert  # pylint: disable=g-import-not-at-top
  from pixcon_jax import train  # pylint: disable=g-import-not-at-top
  exp = exp if exp is not None else train.setup(config)
  ckpt_dir = paths.resolve(workdir) / "checkpoints"  # A local directory or a gs:// URL.
  latest = None
  if ckpt_dir.is_dir():
    with ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
        read_only=True)) as mngr:
      latest = mngr.latest_step()
  rep = NamedSharding(exp.mesh, P())
  if latest is not None:
    # Only {params, batch_stats} of the saved TrainState, restored partially and straight onto
    # the mesh: the optimizer state and the memory bank are never read, so a checkpoint of any
    # contrast / memory setting (e.g. an ablation's baseline) evaluates with any config.
    shapes = checkpointing.variable_shapes(exp.eval_model)
    target = {k: jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep),
                              shapes.get(k, {})) for k in ("params", "batch_stats")}
    path = ckpt_dir / str(latest) / checkpointing.STATE
    variables = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
    variables = {k: variables.get(k, {}) for k in ("params", "batch_stats")}
    _check_complete(variables, exp.eval_model, f"checkpoint {path}")
    return variables, f"checkpoint {ckpt_dir} step {latest}", int(latest)
  if config.get("init_from"):
    variables = checkpointing.load_pretrained(config.init_from)
    variables = {k: variables.get(k, {}) for k in ("params", "batch_stats")}
    _check_complete(variables, exp.eval_model, f"config.init_from={config.init_from!r}")
    return jax.device_put(variables, rep), f"init_from {config.init_from}", 0
  from pixcon_jax import validation  # pylint: disable=g-import-not-at-top
  raise validation.MissingInputError(
      f"no checkpoint under {ckpt_dir} and config.init_from is not set: nothing to evaluate")


def _settings_dict(settings: InferenceSettings) -> dict[str, Any]:
  return {k: (list(v) if isinstance(v, tuple) else v)
          for k, v in dataclasses.asdict(settings).items()}


def evaluate_checkpoint(config: Any, workdir: str) -> dict[str, Any]:
  """Mode `eval`: evaluates the latest checkpoint (or `config.init_from`) on a split.

  The split is `config.eval.split` if set, else `config.data.eval_split` / the dataset's
  validation split; the protocol is `config.eval` (see `settings_from_config`). Metrics
  go to CLU writers (TensorBoard + log, under `eval_<split>/`) and, on process 0, to
  `workdir/eval_<split>.json` with the confusion matrix, protocol and weights source.

  Returns:
    the metrics dict (`miou`, `pixel_accuracy`, `iou/<class>`, ...).
  """
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from pixcon_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from pixcon_jax import train  # pylint: disable=g-import-not-at-top
  exp = train.setup(config)
  variables, source, step = load_variables(config, workdir, exp)
  split = (config.eval.get("split") or config.data.get("eval_split") or exp.info.val_split)
  evaluator = make_evaluator(config, exp.eval_model, exp.mesh, class_names=exp.info.class_names)
  logging.info("evaluating %s on split %r with %s", source, split, evaluator.settings)
  batches = data_lib.make_eval_iterator(
      config.data, config.augment,
      batch_size_per_process=config.data.eval_batch_size // jax.process_count(),
      process_index=jax.process_index(), process_count=jax.process_count(), split=split)
  t0 = time.time()
  cm, images = evaluator.confusion_matrix(variables, batches,
                                          max_batches=config.eval.get("max_batches"))
  seconds = time.time() - t0
  metrics = metrics_lib.metrics_from_confusion_matrix(cm, exp.info.class_names)
  metrics["num_images"] = float(images)
  tag = str(split).replace("/", "_")
  workdir = paths.resolve(workdir)  # A local directory or a gs:// URL.
  workdir.mkdir(parents=True, exist_ok=True)
  writer = metric_writers.create_default_writer(os.fspath(workdir),
                                                just_logging=jax.process_index() > 0,
                                                asynchronous=False)
  writer.write_scalars(step, metrics_lib.scalars_for_writer(metrics, prefix=f"eval_{tag}/"))
  writer.flush()
  writer.close()
  if jax.process_index() == 0:
    record = {"split": split, "step": step, "weights": source, "seconds": seconds,
              "protocol": _settings_dict(evaluator.settings),
              "metrics": metrics_lib.json_safe(metrics), "confusion_matrix": cm.tolist(),
              "class_names": list(exp.info.class_names)}
    path = workdir / f"eval_{tag}.json"
    tmp = workdir / f"eval_{tag}.json.tmp"
    tmp.write_text(json.dumps(record, indent=1, allow_nan=False))
    tmp.replace(path)  # never leave a half-written file
    logging.info("wrote %s", path)
  lines = [f"{name:>16s} {metrics[f'iou/{name}']:.4f}" for name in exp.info.class_names]
  logging.info("mIoU %.4f on %d images of %r (%.1fs)\n%s", metrics["miou"], images, split,
               seconds, "\n".join(lines))
  print(f"eval {split}: mIoU {metrics['miou']:.4f} pixel accuracy "
        f"{metrics['pixel_accuracy']:.4f} ({images} images)", flush=True)
  return metrics


def predict_folder(config: Any, workdir: str) -> dict[str, Any]:
  """Mode `predict`; see `pixcon_jax.predict.predict_folder`."""
  from pixcon_jax import predict  # pylint: disable=g-import-not-at-top
  return predict.predict_folder(config, workdir)
