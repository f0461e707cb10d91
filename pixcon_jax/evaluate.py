"""Dataset-level evaluation: the sharded `Evaluator` and mode `eval`.

The protocol (scales, flip, whole / sliding window) is `inference.py`'s; this module runs it
over a split on the mesh and turns the predictions into a confusion matrix.

Execution: one jitted, `shard_map`-ped function per scale adds that scale's (flip-)
logits into a full-resolution accumulator (donated); a final jitted function takes the
argmax and builds the batch confusion matrix from valid pixels only (label 255 and
padding examples excluded), `psum`-med over the mesh axis `'data'`. Inputs are global
arrays (`jax.make_array_from_process_local_data`), so the sum spans hosts too. The
dataset-level matrix is accumulated in int64 on the host; metrics come from it
(`pixcon_jax.metrics`).

Mode `eval` (`evaluate_checkpoint`) evaluates the latest checkpoint of a workdir, or
`config.init_from`, on a split and writes the metrics.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

from absl import logging
from clu import metric_writers
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from pixcon_jax import checkpointing
from pixcon_jax import data as data_lib
from pixcon_jax import inference
from pixcon_jax import metrics as metrics_lib
from pixcon_jax import paths
from pixcon_jax import precision as precision_lib
from pixcon_jax import setup
from pixcon_jax import sharding as sharding_lib

DATA_AXIS = sharding_lib.DATA_AXIS


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

  def __init__(self, apply_fn: inference.ApplyFn, mesh: Mesh, *, num_classes: int,
               settings: inference.InferenceSettings, class_names: Sequence[str] | None = None):
    self.mesh = mesh
    self.num_classes = num_classes
    self.settings = settings
    self.class_names = tuple(class_names) if class_names is not None else None
    self._replicated = NamedSharding(mesh, P())
    self._sharded = NamedSharding(mesh, P(DATA_AXIS))
    self._zeros_fns: dict[tuple[int, ...], Callable[[], jax.Array]] = {}

    def add_scale(variables, image, acc, *, scale):
      return acc + inference.scale_scores(apply_fn, variables, image, scale=scale,
                                          settings=settings)

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
    local = _pad_batch(batch, sharding_lib.mesh_local_device_count(self.mesh))
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
    mesh: the data mesh (default: every device of the run, `sharding.make_mesh()`).
    class_names: names for per-class IoU (default: from `config.data.dataset` if known).
  Returns:
    an `Evaluator`; metrics keys `miou`, `pixel_accuracy`, `mean_accuracy`, `fw_iou`,
    `iou/<class>`, `num_pixels`, `num_images`.
  """
  mesh = mesh if mesh is not None else sharding_lib.make_mesh()
  num_classes = int(config.model.num_classes)
  if class_names is None:
    class_names = _dataset_class_names(config, num_classes)
  apply_fn = inference.logits_apply_fn(
      model, matmul_precision=precision_lib.matmul_precision(config))
  return Evaluator(apply_fn, mesh, num_classes=num_classes,
                   settings=inference.settings_from_config(config.eval), class_names=class_names)


def _dataset_class_names(config: Any, num_classes: int) -> Sequence[str] | None:
  try:
    names = tuple(data_lib.get_dataset_info(config.data.dataset).class_names)
    return names if len(names) == num_classes else None
  except Exception:  # pylint: disable=broad-except
    return None


# ------------------------------------------------------------------------------------------
# Mode `eval`: a checkpoint (or converted official weights) on a split.

def _settings_dict(settings: inference.InferenceSettings) -> dict[str, Any]:
  return {k: (list(v) if isinstance(v, tuple) else v)
          for k, v in dataclasses.asdict(settings).items()}


def evaluate_checkpoint(config: Any, workdir: str, mesh: Mesh | None = None) -> dict[str, Any]:
  """Mode `eval`: evaluates the latest checkpoint (or `config.init_from`) on a split.

  `mesh` is the devices to evaluate on (default: every device of the run).

  The split is `config.eval.split` if set, else `config.data.eval_split` / the dataset's
  validation split; the protocol is `config.eval` (see `inference.settings_from_config`). Metrics
  go to CLU writers (TensorBoard + log, under `eval_<split>/`) and, on process 0, to
  `workdir/eval_<split>.json` with the confusion matrix, protocol and weights source.

  Returns:
    the metrics dict (`miou`, `pixel_accuracy`, `iou/<class>`, ...).
  """
  exp = setup.for_inference(config, mesh)
  variables, source, step = checkpointing.load_variables(config, workdir, model=exp.eval_model,
                                                         mesh=exp.mesh)
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
