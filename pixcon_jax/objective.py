"""The training objective (paper Eq. 4): CE (+ 0.4 aux CE) + lambda * pixel-contrast NCE.

`make_objective` binds the static configuration once and returns a function that
runs *inside* the train step's `shard_map` over axis 'data'. It returns this
device's *share* of the global-batch objective: the shares sum over devices to
the loss of the whole global batch. The train step differentiates N x share
(this device's estimate of the global loss, the per-GPU mean of DDP) and
`pmean`s the gradients, which gives the gradient of the global-batch loss:
identical to a single device holding the same batch (tests/test_train_step.py),
and equal to plain DDP averaging whenever every device has the same number of
weighted pixels.

- CE: `sum_i w[y_i] nll_i / sum_i w[y_i]` over the *global* batch: each device
  contributes its weighted sum divided by the psum'd weight total.
- Contrast: by default (`contrast.global_batch=True`) the devices evaluate the
  loss of the global batch together with the same key (anchors are sampled per
  mini-batch as in the paper, independent of the device count): the paper recipe
  splits its work over them (`contrast/loss.py`, "Work split over devices") and
  only anchors and per-anchor reductions cross devices; the official recipe,
  whose contrast set is the sampled pixels themselves, all-gathers the maps.
  Every device holds the loss's value; its share is loss / N. With
  `global_batch=False` each device samples from its own images with its own
  key, as the official DDP code does (shares: loss_d / N).
- lambda is 0 before `contrast.warmup_steps` (official recipe: 5000) through a
  `jnp.where` on the traced step, so resumes never change the compiled program.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

from pixcon_jax import losses
from pixcon_jax.contrast import api as contrast_api
from pixcon_jax.contrast import choices
from pixcon_jax.contrast import health as contrast_health
from pixcon_jax.contrast import labels as contrast_labels
from pixcon_jax.contrast import loss as contrast_loss
from pixcon_jax.contrast import official
from pixcon_jax.contrast import official_mem

IGNORE_LABEL = 255

Objective = Callable[..., tuple[jax.Array, tuple[dict[str, jax.Array], Any]]]


def class_weights_from_config(config: ml_collections.ConfigDict, num_classes: int):
  """`config.loss.class_weights`: None, a sequence of C floats, or the name 'cityscapes'."""
  cw = config.loss.get("class_weights", None)
  if cw is None:
    return None
  if isinstance(cw, str):
    if cw not in losses.NAMED_CLASS_WEIGHTS:
      raise ValueError(f"config.loss.class_weights={cw!r}: the named weights are "
                       f"{sorted(losses.NAMED_CLASS_WEIGHTS)}")
    cw = losses.NAMED_CLASS_WEIGHTS[cw]
  cw = tuple(float(w) for w in cw)
  if len(cw) != num_classes:
    raise ValueError(f"config.loss.class_weights has {len(cw)} entries, the dataset has "
                     f"{num_classes} classes")
  return cw


def contrast_settings(config: ml_collections.ConfigDict, *,
                      num_classes: int) -> contrast_loss.ContrastSettings:
  """`ContrastSettings` from `config.contrast` / `config.memory` (`contrast.api`, the one way)."""
  return contrast_api.loss_settings_from_config(config, num_classes=num_classes)


def contrast_active(config: ml_collections.ConfigDict) -> bool:
  """Whether the step computes the contrast loss and updates the memory bank (static)."""
  return bool(config.contrast.get("enabled", False))


def uses_memory(config: ml_collections.ConfigDict) -> bool:
  """Whether the run keeps a memory bank (static): the paper recipe with a memory source.

  The official recipe is in-batch only; which sources are memory is `ContrastSettings`' call.
  """
  if not contrast_active(config) or config.contrast.get("recipe", "paper") != "paper":
    return False
  return contrast_settings(config, num_classes=config.model.num_classes).uses_memory


def uses_official_queues(config: ml_collections.ConfigDict) -> bool:
  """Whether the run keeps the released memory recipe's queues (static): `recipe='official_mem'`."""
  return contrast_active(config) and config.contrast.get("recipe", "paper") == "official_mem"


def official_queue_settings(config: ml_collections.ConfigDict, *, num_classes: int) -> dict:
  """Keywords of `official_mem.enqueue` from `config.memory` (the released queue update)."""
  m = config.memory
  return dict(num_classes=num_classes, label_stride=int(m.official_label_stride),
              pixel_update_freq=int(m.pixels_per_class),
              skip_class0=bool(m.official_skip_class0),
              enqueue_images=int(m.official_enqueue_images) or None,
              ptr_step=m.official_pixel_ptr_step)


def hard_fraction(step: jax.Array, *, fraction: float, ramp_steps: int) -> jax.Array:
  """Semi-hard mining's top fraction at `step`: the hardness curriculum.

  Geometric from 1 (the top 100%: random sampling) at step 0 to `fraction` (paper 0.1) at
  `ramp_steps`, then constant: f(t) = fraction ** min(t / ramp_steps, 1).

  Args:
    step: scalar int, the step being taken.
    fraction: the final top fraction, in (0, 1].
    ramp_steps: length of the ramp (> 0).
  Returns:
    float32 scalar in [fraction, 1].
  """
  progress = jnp.minimum(step.astype(jnp.float32) / float(ramp_steps), 1.0)
  return jnp.float32(fraction) ** progress


def make_objective(config: ml_collections.ConfigDict, *, num_classes: int,
                   axis_name: str = "data") -> Objective:
  """Returns `objective(outputs, batch, memory, rng, step) -> (share, (metrics, keys))`.

  Args of the returned function (all per device, inside shard_map):
    outputs: the model's dict: `logits [b, h, w, C]`, optional `aux_logits`, `embedding [b, h, w, D]`.
    batch: `label [b, H, W]` int32, `image_id [b]` int32.
    memory: the replicated MemoryBank (the bank *before* this step's update), or None.
    rng: key shared by all devices (contrast sampling).
    step: scalar int32, the step being taken (0-based).
  Returns:
    share: this device's share of the global objective (shares sum to it).
    metrics: global values (invariant across devices): `loss`, `ce_loss`, `aux_ce_loss`,
      `contrast_loss`, `contrast_weight`, `valid_anchor_fraction`.
    keys: for the memory update, this device's `(embedding [b, h, w, D] detached,
      label [b, h, w], image_id [b])`; with the released queues (`official_mem`)
      `(embedding, full-size label [b, H, W])`; None without memory.
  """
  class_weights = class_weights_from_config(config, num_classes)
  cw_array = None if class_weights is None else jnp.asarray(class_weights, jnp.float32)
  ohem = bool(config.loss.get("ohem", False))
  ce_kwargs = dict(class_weights=class_weights, ignore_label=IGNORE_LABEL, ohem=ohem)
  if ohem:
    ce_kwargs.update(ohem_threshold=config.loss.ohem_threshold,
                     ohem_min_kept=config.loss.ohem_min_kept)
  aux_weight = float(config.loss.get("aux_weight", 0.4))
  use_contrast = contrast_active(config)
  use_memory = uses_memory(config)
  use_queues = uses_official_queues(config)
  recipe = config.contrast.get("recipe", "paper")
  global_batch = bool(config.contrast.get("global_batch", True))
  weight = float(config.contrast.get("weight", 1.0))
  warmup_steps = int(config.contrast.get("warmup_steps", 0))
  log_health = bool(config.get("log", {}).get("embedding_health", True))

  if use_contrast:
    if recipe == "paper":
      settings = contrast_settings(config, num_classes=num_classes)
      ramp = int(config.contrast.get("hard_mining_ramp_steps", 0))
      if ramp < 0:
        raise ValueError(f"config.contrast.hard_mining_ramp_steps={ramp}: expected >= 0")

      def contrast_fn(emb, lab, pred, image_id, memory, rng, step, axis):
        fraction = None
        if ramp and settings.mining == "semi_hard":
          fraction = hard_fraction(step, fraction=settings.semi_hard_fraction, ramp_steps=ramp)
        return contrast_loss.pixel_contrast_loss(emb, lab, pred, image_id, memory, rng,
                                                 settings=settings, hard_fraction=fraction,
                                                 axis_name=axis)
    elif recipe == "official":
      c = config.contrast

      def contrast_fn(emb, lab, pred, image_id, memory, rng, step, axis):
        del image_id, memory, step  # In-batch, no mining.
        if axis is not None:
          # The official recipe contrasts the sampled pixels of the whole mini-batch with each
          # other: its global form gathers the embedding maps (see the module doc).
          gather = functools.partial(lax.all_gather, axis_name=axis, axis=0, tiled=True)
          emb, lab, pred = gather(emb), gather(lab), gather(pred)
        return official.official_contrast_loss(
            emb, lab, pred, rng, num_classes=num_classes, temperature=c.temperature,
            base_temperature=c.base_temperature, max_samples=c.max_samples,
            max_views=c.max_views)
    elif recipe == "official_mem":
      c, skip_class0 = config.contrast, bool(config.memory.official_skip_class0)

      def contrast_fn(emb, lab, pred, image_id, memory, rng, step, axis):
        del image_id, step  # The queues are the contrast set, no mining.
        if axis is not None:
          gather = functools.partial(lax.all_gather, axis_name=axis, axis=0, tiled=True)
          emb, lab, pred = gather(emb), gather(lab), gather(pred)
        return official_mem.official_mem_contrast_loss(
            emb, lab, pred, memory, rng, num_classes=num_classes, temperature=c.temperature,
            base_temperature=c.base_temperature, max_samples=c.max_samples,
            max_views=c.max_views, skip_class0=skip_class0)
    else:
      raise ValueError(f"config.contrast.recipe={recipe!r}: expected one of {choices.RECIPES}")

  def ce_share(logits: jax.Array, label: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(share of the global CE, global CE value) for logits [b, h, w, C], label [b, H, W]."""
    ce, ce_metrics = losses.cross_entropy(logits, label, **ce_kwargs)
    if ohem:
      # OHEM keeps a per-device subset; its normaliser is the kept count.
      den = ce_metrics["ohem_num_kept"].astype(jnp.float32)
    else:
      valid = (label >= 0) & (label < num_classes)
      w = valid.astype(jnp.float32)
      if cw_array is not None:
        w = w * cw_array[jnp.where(valid, label, 0)]
      den = jnp.sum(w)
    total = lax.psum(den, axis_name)
    share = ce * den / jnp.maximum(total, 1e-12)
    return share, lax.psum(share, axis_name)

  def objective(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], memory: Any,
                rng: jax.Array, step: jax.Array):
    label = batch["label"].astype(jnp.int32)
    n_dev = lax.psum(1, axis_name)
    share, ce_value = ce_share(outputs["logits"], label)
    metrics = {"ce_loss": ce_value}
    if "aux_logits" in outputs and aux_weight > 0:
      aux_share, aux_value = ce_share(outputs["aux_logits"], label)
      share = share + aux_weight * aux_share
      metrics["aux_ce_loss"] = aux_value
    keys = None
    if "embedding" in outputs:
      # Labels on the embedding grid, shared by the health statistics and the contrast.
      emb = outputs["embedding"]
      grid = emb.shape[1:3]
      lab = contrast_labels.downsample_labels(label, grid)
      if log_health:
        # Detached statistics of the embedding's class structure (a collapse shows here first).
        health = contrast_health.embedding_health(emb, lab, num_classes=num_classes,
                                                  axis_name=axis_name)
        metrics.update({f"embedding/{k}": v for k, v in health.items()})
    if use_contrast:
      if "embedding" not in outputs:
        raise ValueError(f"config.contrast.enabled=True but model {config.model.name!r} has no "
                         "projection head (use a '*_contrast' model)")
      pred = contrast_api.align_predictions(outputs["logits"], grid)  # detached argmax
      image_id = batch["image_id"].astype(jnp.int32)
      if global_batch:
        # One loss of the whole mini-batch, evaluated by all devices together; every device
        # holds its value, hence the 1 / N share below.
        c_loss, c_metrics = contrast_fn(emb, lab, pred, image_id, memory, rng, step, axis_name)
      else:
        local_rng = jax.random.fold_in(rng, lax.axis_index(axis_name))
        c_loss, c_metrics = contrast_fn(emb, lab, pred, image_id, memory, local_rng, step, None)
      # Paper: lambda = 1 from the start; official: 0.1 after 5000 warm-up steps.
      lam = jnp.where(step >= warmup_steps, jnp.float32(weight), jnp.float32(0.0))
      share = share + lam * c_loss / n_dev
      metrics["contrast_loss"] = lax.pmean(c_loss, axis_name)
      metrics["contrast_weight"] = lam
      for k in ("valid_anchor_fraction", "num_valid_anchors"):
        if k in c_metrics:
          metrics[k] = lax.pmean(jnp.asarray(c_metrics[k], jnp.float32), axis_name)
      if use_memory:
        # Detached keys of this device's images; `memory.sample_keys_distributed` samples them
        # locally and all-gathers the samples, so every replica applies the same update.
        keys = (lax.stop_gradient(emb), lab, image_id)
      elif use_queues:
        # The released update reads the full-size labels at its own stride (official_mem.py).
        keys = (lax.stop_gradient(emb), label)
    metrics["loss"] = lax.psum(share, axis_name)
    return share, (metrics, keys)

  return objective
