"""The official released recipe of the pixel contrast loss, static-shaped.

A faithful JAX port of `PixelContrastLoss` and the combined `ContrastCELoss` /
`ContrastAuxCELoss` of https://github.com/tfzhou/ContrastiveSeg (commit
287e5d3), as checked by the golden fixtures `contrastive_core`,
`anchor_sampling` and `contrast_loss_e2e` (golden README quirks 6 and 7).
This is *not* the paper's memory-based loss (that lives in `loss.py`): it is
in-batch only, samples "hard"/"easy" anchor views per (image, class), and
scales the loss by temperature / base_temperature.

The official code is data-dependent Python (per-image loops, `nonzero`,
`randperm`, an `n_view` computed from the data). Here every decision is
computed with fixed shapes:
  * anchors are the B*C (image, class) pairs, kept ones first in the official
    order (image-major, ascending class id), with a validity flag;
  * each anchor has `max_views` view slots (the static bound of
    `n_view = min(max_samples // total_classes, max_views)`) and a view mask;
  * the loss packs the valid (anchor, view) rows into `min(max_samples,
    B*C*max_views)` rows, which always suffices since total_classes * n_view
    <= max_samples.
Where the official code has no result (no class qualifies: it returns None and
crashes; n_view == 0) the loss is 0 with 0 valid anchors.
"""
from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from pixcon_jax import losses
from pixcon_jax.contrast.labels import downsample_labels

# Stand-in for log(0) = -inf: softplus(-1e30 - s) is exactly 0 and has a zero (not NaN) gradient.
_LOG_ZERO = -1e30


@flax.struct.dataclass
class AnchorSample:
  """What `_hard_anchor_sampling` decides, padded to A = B * C anchors.

  Anchor slots [0, num_anchors) hold the kept (image, class) pairs in the
  official order; the rest are padding (`valid` False, counts 0).

  Attributes:
    valid: [A] bool, slot holds a kept anchor.
    image: [A] int32 image index of the anchor.
    cls: [A] int32 class id of the anchor.
    num_hard: [A] int32 pixels with GT == cls and prediction != cls.
    num_easy: [A] int32 pixels with GT == cls and prediction == cls.
    hard_kept: [A] int32 hard views taken (they come first among the views).
    easy_kept: [A] int32 easy views taken (hard_kept + easy_kept == n_view).
    pixel: [A, V] int32 flat pixel index (row-major over h*w) of each view, V = max_views.
    view_mask: [A, V] bool, view v < n_view of a valid anchor.
    n_view: [] int32 views per anchor (0 when no anchor).
    num_anchors: [] int32 total_classes of the official code.
  """
  valid: jax.Array
  image: jax.Array
  cls: jax.Array
  num_hard: jax.Array
  num_easy: jax.Array
  hard_kept: jax.Array
  easy_kept: jax.Array
  pixel: jax.Array
  view_mask: jax.Array
  n_view: jax.Array
  num_anchors: jax.Array


def official_anchor_sampling(label: jax.Array, predict: jax.Array, rng: jax.Array, *,
                             num_classes: int = 19, max_samples: int = 1024,
                             max_views: int = 100, ignore_label: int = 255) -> AnchorSample:
  """`PixelContrastLoss._hard_anchor_sampling`, with static shapes.

  A class c of image b is an anchor if it is not ignore and has strictly more
  than `max_views` GT pixels. With T anchors in the batch,
  n_view = min(max_samples // T, max_views). Per anchor, with
  hard = GT==c & pred!=c and easy = GT==c & pred==c, and n_view / 2 a true
  division:
    both >= n_view/2  -> n_view // 2 hard, the rest easy;
    hard >= n_view/2  -> all easy, the rest hard;
    easy >= n_view/2  -> all hard, the rest easy.
  (One branch always holds since hard + easy > max_views >= n_view.) Views
  are the chosen hard pixels followed by the chosen easy ones; the choice
  within each set is uniformly random (a random subset, as `randperm[:k]`).

  Args:
    label: [B, h, w] int GT at embedding resolution, `ignore_label` = ignore.
    predict: [B, h, w] int predicted class (argmax of the un-upsampled logits).
    rng: PRNG key for the random choice of pixels.
    num_classes: C, the number of classes (ids >= C are never anchors).
    max_samples: budget of anchor views in the batch (official 1024).
    max_views: maximum views per anchor and pixel-count threshold (official 100).
    ignore_label: ignored GT id.
  Returns:
    AnchorSample with A = B * C slots and V = max_views views.
  """
  if label.shape != predict.shape or label.ndim != 3:
    raise ValueError(f"label and predict must both be [B, h, w], got {label.shape} and "
                     f"{predict.shape}")
  batch = label.shape[0]
  num_pixels = label.shape[1] * label.shape[2]
  lab = label.reshape(batch, num_pixels).astype(jnp.int32)
  pred = predict.reshape(batch, num_pixels).astype(jnp.int32)
  classes = jnp.arange(num_classes, dtype=jnp.int32)

  is_class = lab[:, None, :] == classes[None, :, None]  # [B, C, P]
  pred_class = pred[:, None, :] == classes[None, :, None]
  hard = is_class & ~pred_class
  easy = is_class & pred_class
  count = jnp.sum(is_class, axis=-1, dtype=jnp.int32)  # [B, C]
  num_hard = jnp.sum(hard, axis=-1, dtype=jnp.int32)
  num_easy = count - num_hard
  kept = (count > max_views) & (classes[None, :] != ignore_label)

  num_anchors = jnp.sum(kept, dtype=jnp.int32)
  n_view = jnp.where(num_anchors > 0,
                     jnp.minimum(max_samples // jnp.maximum(num_anchors, 1), max_views), 0)

  # Random subsets: one uniform key per pixel. A pixel lies in at most one set (its GT class,
  # hard or easy), so ranking the keys inside each set gives independent random picks.
  u = jax.random.uniform(rng, (batch, 1, num_pixels))
  # A map of <= max_views pixels keeps no class; top_k then needs k <= P and zero padding.
  k = min(max_views, num_pixels)
  pad = [(0, 0), (0, 0), (0, max_views - k)]
  _, hard_pix = lax.top_k(-jnp.where(hard, u, 2.0), k)  # [B, C, k], members first
  _, easy_pix = lax.top_k(-jnp.where(easy, u, 2.0), k)
  hard_pix, easy_pix = jnp.pad(hard_pix, pad), jnp.pad(easy_pix, pad)

  # Kept anchors first, in the official loop order (image-major, ascending class).
  num_slots = batch * num_classes
  flat = jnp.arange(num_slots, dtype=jnp.int32)
  order = jnp.argsort(jnp.where(kept.reshape(-1), flat, flat + num_slots))
  valid = kept.reshape(-1)[order]
  image = order // num_classes
  cls = order % num_classes
  num_hard = jnp.where(valid, num_hard.reshape(-1)[order], 0)
  num_easy = jnp.where(valid, num_easy.reshape(-1)[order], 0)
  hard_pix = hard_pix.reshape(num_slots, max_views)[order]
  easy_pix = easy_pix.reshape(num_slots, max_views)[order]

  # The official branch tests `num >= n_view / 2` (float); 2 * num >= n_view is the same in ints.
  hard_ok = 2 * num_hard >= n_view
  easy_ok = 2 * num_easy >= n_view
  hard_kept = jnp.where(hard_ok & easy_ok, n_view // 2,
                        jnp.where(hard_ok, n_view - num_easy, num_hard))
  hard_kept = jnp.where(valid, hard_kept, 0)
  easy_kept = jnp.where(valid, n_view - hard_kept, 0)

  view = jnp.arange(max_views, dtype=jnp.int32)[None, :]
  easy_slot = jnp.clip(view - hard_kept[:, None], 0, max_views - 1)
  pixel = jnp.where(view < hard_kept[:, None], hard_pix,
                    jnp.take_along_axis(easy_pix, easy_slot, axis=1))
  view_mask = valid[:, None] & (view < n_view)
  return AnchorSample(valid=valid, image=image, cls=cls, num_hard=num_hard, num_easy=num_easy,
                      hard_kept=hard_kept, easy_kept=easy_kept,
                      pixel=jnp.where(view_mask, pixel, 0), view_mask=view_mask,
                      n_view=n_view.astype(jnp.int32), num_anchors=num_anchors)


def official_contrastive_core(
    x: jax.Array, y: jax.Array, view_mask: jax.Array | None = None, *, temperature: float = 0.1,
    base_temperature: float = 0.07) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`PixelContrastLoss._contrastive`: supervised contrast over all valid (anchor, view) rows.

  Rows are z = concat_v x[:, v] (view-major, as the official code). With
  s = z z^T / temperature, positives P(i) = valid rows j != i of the same
  class (other views of the same anchor included), negatives N(i) = valid rows
  of another class:
    L_i = -(temperature / base_temperature)
          * mean_{j in P(i)} [s_ij - log(exp(s_ij) + sum_{k in N(i)} exp(s_ik))],
  and the loss is the mean of L_i over valid rows. The log term is evaluated
  as -softplus(logsumexp_{N(i)} s - s_ij), which equals the official
  max-subtracted form but cannot overflow; with no negative it is exactly 0,
  as the official result. A row without positive (the official 0/0 = NaN) is
  left out of the mean and counted in `num_rows_without_positive`.

  Args:
    x: [A, V, D] anchor views (unit-norm in the official use).
    y: [A] int class of each anchor.
    view_mask: [A, V] bool valid views, or None for all.
    temperature: tau.
    base_temperature: tau_base (the loss is scaled by tau / tau_base).
  Returns:
    (loss scalar float32, metrics with `num_rows` (rows in the mean) and
    `num_rows_without_positive`).
  """
  num_anchors, num_views, dim = x.shape
  if view_mask is None:
    view_mask = jnp.ones((num_anchors, num_views), bool)
  num_rows = num_anchors * num_views
  z = jnp.swapaxes(x, 0, 1).reshape(num_rows, dim).astype(jnp.float32)
  row_y = jnp.tile(y.astype(jnp.int32), num_views)
  row_valid = jnp.swapaxes(view_mask, 0, 1).reshape(num_rows)

  s = jnp.matmul(z, z.T) / temperature
  same = row_y[:, None] == row_y[None, :]
  pair = row_valid[:, None] & row_valid[None, :]
  pos = same & pair & ~jnp.eye(num_rows, dtype=bool)
  neg = ~same & pair

  # log sum_{k in N(i)} exp(s_ik), stabilised by its own (detached) max; _LOG_ZERO if N(i) is empty.
  has_neg = jnp.any(neg, axis=1, keepdims=True)
  neg_max = lax.stop_gradient(jnp.max(jnp.where(neg, s, -jnp.inf), axis=1, keepdims=True))
  neg_max = jnp.where(has_neg, neg_max, 0.0)
  neg_sum = jnp.sum(jnp.exp(jnp.where(neg, s - neg_max, -jnp.inf)), axis=1, keepdims=True)
  log_neg = jnp.where(has_neg, jnp.log(jnp.where(has_neg, neg_sum, 1.0)) + neg_max, _LOG_ZERO)
  # s_ij - log(exp(s_ij) + exp(log_neg_i)) = -softplus(log_neg_i - s_ij).
  log_prob = -jax.nn.softplus(log_neg - s)

  n_pos = jnp.sum(pos, axis=1)
  mean_log_prob_pos = jnp.sum(jnp.where(pos, log_prob, 0.0), axis=1) / jnp.maximum(n_pos, 1)
  row_loss = -(temperature / base_temperature) * mean_log_prob_pos
  counted = row_valid & (n_pos > 0)
  num_counted = jnp.sum(counted, dtype=jnp.int32)
  loss = jnp.sum(jnp.where(counted, row_loss, 0.0)) / jnp.maximum(num_counted, 1)
  metrics = {"num_rows": num_counted,
             "num_rows_without_positive": jnp.sum(row_valid & (n_pos == 0), dtype=jnp.int32)}
  return loss, metrics


def anchor_view_rows(embedding, label, predict, rng, *, num_classes, max_samples, max_views,
                     ignore_label=255):
  """The released anchor sampling packed into static rows (shared by both released recipes).

  Row r is view r % n_view of anchor r // n_view; only class equality defines positives, so
  the layout does not change the loss.

  Args:
    embedding: [B, h, w, D]; label: [B, H, W] (aligned to the grid here); predict: [B, h, w].
  Returns:
    (sample, feats [R, D], anchor [R], view [R], row_valid [R]) with R = min(max_samples,
    slots * max_views).
  """
  batch, h, w, dim = embedding.shape
  label = downsample_labels(label, (h, w))
  sample = official_anchor_sampling(label, predict, rng, num_classes=num_classes,
                                    max_samples=max_samples, max_views=max_views,
                                    ignore_label=ignore_label)
  num_slots = sample.valid.shape[0]
  rows = min(max_samples, num_slots * max_views)
  r = jnp.arange(rows, dtype=jnp.int32)
  n_view = jnp.maximum(sample.n_view, 1)
  anchor = jnp.minimum(r // n_view, num_slots - 1)
  view = r % n_view
  row_valid = r < sample.num_anchors * sample.n_view
  feats = embedding.reshape(batch, h * w, dim)[sample.image[anchor], sample.pixel[anchor, view]]
  return sample, feats, anchor, view, row_valid


def official_contrast_loss(embedding: jax.Array, label: jax.Array, predict: jax.Array,
                           rng: jax.Array, *, num_classes: int = 19, temperature: float = 0.1,
                           base_temperature: float = 0.07, max_samples: int = 1024,
                           max_views: int = 100,
                           ignore_label: int = 255) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`PixelContrastLoss.forward`: downsample the GT, sample anchor views, contrast them.

  Args:
    embedding: [B, h, w, D] L2-normalised projections.
    label: [B, H, W] int GT (255 = ignore), downsampled to (h, w) with the
      legacy nearest rule of `downsample_labels`.
    predict: [B, h, w] int predicted classes (argmax of the un-upsampled logits).
    rng: PRNG key of the random pixel choice.
    num_classes, temperature, base_temperature, max_samples, max_views,
      ignore_label: static settings (official 19, 0.1, 0.07, 1024, 100).
  Returns:
    (loss scalar float32, metrics with `contrast_loss`, `num_valid_anchors`,
    `valid_anchor_fraction` (of the B*C anchor slots), `n_view`, `num_rows`,
    `num_rows_without_positive`).
  """
  sample, feats, anchor, view, row_valid = anchor_view_rows(
      embedding, label, predict, rng, num_classes=num_classes, max_samples=max_samples,
      max_views=max_views, ignore_label=ignore_label)
  loss, metrics = official_contrastive_core(
      feats[:, None, :], sample.cls[anchor], row_valid[:, None], temperature=temperature,
      base_temperature=base_temperature)
  metrics.update(contrast_loss=loss, num_valid_anchors=sample.num_anchors, n_view=sample.n_view,
                 valid_anchor_fraction=sample.num_anchors / float(sample.valid.shape[0]))
  return loss, metrics


def _add_contrast(loss: jax.Array, metrics: dict, logits: jax.Array, embedding: jax.Array,
                  label: jax.Array, rng: jax.Array, *, with_embed: bool, loss_weight: float,
                  ignore_label: int, **contrast_settings) -> tuple[jax.Array, dict]:
  """Adds `loss_weight * official_contrast_loss` to a CE total (shared by the combined losses)."""
  if with_embed:
    # The prediction is the argmax of the un-upsampled logits (golden README quirk 7).
    predict = jnp.argmax(logits, axis=-1)
    contrast, contrast_metrics = official_contrast_loss(
        embedding, label, predict, rng, num_classes=logits.shape[-1], ignore_label=ignore_label,
        **contrast_settings)
    metrics.update(contrast_metrics)
    loss = loss + loss_weight * contrast
  metrics["loss"] = loss
  return loss, metrics


def contrast_ce_loss(logits: jax.Array, embedding: jax.Array, label: jax.Array, rng: jax.Array, *,
                     with_embed: bool = True, loss_weight: float = 0.1,
                     class_weights: Sequence[float] | None = losses.CITYSCAPES_CLASS_WEIGHTS,
                     ignore_label: int = 255, **contrast_settings) -> tuple[jax.Array, dict]:
  """Official `ContrastCELoss`: CE on upsampled logits + loss_weight * pixel contrast.

  Args:
    logits: [B, h, w, C] segmentation logits at the head's stride.
    embedding: [B, h, w, D] L2-normalised projections.
    label: [B, H, W] int GT, 255 = ignore.
    rng: PRNG key of the anchor sampling.
    with_embed: add the contrast term (False during the official warm-up, where the
      official code adds 0 * contrast; here it is not computed at all).
    loss_weight: lambda of the contrast term (official 0.1).
    class_weights: CE class weights (official Cityscapes weights).
    ignore_label: ignored GT id.
    **contrast_settings: keyword settings of `official_contrast_loss`.
  Returns:
    (loss scalar, metrics dict).
  """
  loss, metrics = losses.cross_entropy(logits, label, class_weights=class_weights,
                                       ignore_label=ignore_label)
  return _add_contrast(loss, metrics, logits, embedding, label, rng, with_embed=with_embed,
                       loss_weight=loss_weight, ignore_label=ignore_label, **contrast_settings)


def contrast_aux_ce_loss(logits: jax.Array, aux_logits: jax.Array, embedding: jax.Array,
                         label: jax.Array, rng: jax.Array, *, with_embed: bool = True,
                         loss_weight: float = 0.1, seg_weight: float = 1.0,
                         aux_weight: float = 0.4,
                         class_weights: Sequence[float] | None = losses.CITYSCAPES_CLASS_WEIGHTS,
                         ignore_label: int = 255, **contrast_settings) -> tuple[jax.Array, dict]:
  """Official `ContrastAuxCELoss`: seg_weight * CE(seg) + aux_weight * CE(aux) + lambda * contrast.

  Args as `contrast_ce_loss`, plus aux_logits [B, h, w, C] (the aux head) and
  the `FSAuxCELoss` weights seg_weight (1.0) and aux_weight (0.4). The
  contrast prediction comes from `logits`, not `aux_logits`.
  """
  seg_ce, metrics = losses.cross_entropy(logits, label, class_weights=class_weights,
                                         ignore_label=ignore_label)
  aux_ce, _ = losses.cross_entropy(aux_logits, label, class_weights=class_weights,
                                   ignore_label=ignore_label)
  loss = seg_weight * seg_ce + aux_weight * aux_ce
  metrics["aux_ce_loss"] = aux_ce
  return _add_contrast(loss, metrics, logits, embedding, label, rng, with_embed=with_embed,
                       loss_weight=loss_weight, ignore_label=ignore_label, **contrast_settings)
