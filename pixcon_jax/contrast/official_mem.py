"""The released memory recipe (`H_48_D_4_MEM`) of the pixel contrast loss, static-shaped.

A JAX port of tfzhou/ContrastiveSeg (commit 287e5d3): the loss of `lib/loss/loss_contrast_mem.py`
(`PixelContrastLoss` with a queue) and the queue update `Trainer._dequeue_and_enqueue` of
`segmentor/trainer_contrastive.py`, as run by `scripts/cityscapes/hrnet/run_h_48_d_4_contrast_mem.sh`.
Checked against the released code itself on the fixtures in tests/official_mem/.

The released memory is two per-class queues of `memory_size` (5000) entries each, a segment queue
(per-image class means) and a pixel queue, that start as random unit vectors. The loss contrasts
one anchor view per (image, class) (`max_views` 1, the anchor sampling of `official.py`) with the
whole of both queues only (no in-batch contrast), at tau = base tau = 0.07. Its quirks, each
reproduced here and listed in docs/ABLATIONS.md ("Departures"):

  1. The queue pointer of the pixel queue advances by 1 per write of K (<= 10) keys, so successive
     writes overwrite each other (`ptr_step='one'`); a write that reaches the end goes to the last
     K slots and resets the pointer to 0.
  2. Class 0 is never enqueued (`x > 0` also drops the ignore label), and the contrast set skips
     its queue rows: their place holds 2 x memory_size zero vectors labelled 0, the positives of a
     class-0 anchor and negatives (logit 0) of every other anchor (`skip_class0`).
  3. The queues start as random unit vectors, which count as keys of their class.
  4. The labels of the update are `label[:, ::stride, ::stride]` with `network.stride` = 8, while
     HRNet's keys are at stride 4: the flat label index k picks the flat key index k, so the keys
     come from the top quarter of the image, at other positions than their labels
     (`label_stride`; 4 aligns them).
  5. The pixel keys of class c are taken at flat positions `randperm(count_c)[:K]`, not at the
     class's own pixels: K random positions among the first count_c of the key map.
  6. A row's own index is masked out of its positives (`logits_mask`) although the contrast set is
     the queue: row i loses queue column i as a positive.
  7. DDP broadcasts rank 0's buffers at every forward, so the queues hold rank 0's images only
     (`enqueue_images`: the leading images of the global batch that are enqueued).

Shapes: C classes, Q = queue size, D embedding dim, F = pixel_update_freq.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from pixcon_jax.contrast import official
from pixcon_jax.contrast import sampling

# log(0) stand-in: softplus(-1e30 - s) is exactly 0 with a zero gradient (as official.py).
_LOG_ZERO = -1e30
PTR_STEPS = ("one", "count")


@flax.struct.dataclass
class OfficialQueues:
  """The released memory: `segment_queue`, `pixel_queue` [C, Q, D] and their pointers [C] int32."""
  segment_queue: jax.Array
  segment_ptr: jax.Array
  pixel_queue: jax.Array
  pixel_ptr: jax.Array


@flax.struct.dataclass
class QueueUpdate:
  """One step's keys per image, written in image order by `apply_update`.

  Attributes:
    segment_keys: [B, C, D] unit class means.
    present: [B, C] bool, class enqueued for the image.
    pixel_keys: [B, C, F, D] unit pixel keys; the first `num_pixels` are written.
    num_pixels: [B, C] int32, K = min(pixel count, F).
  """
  segment_keys: jax.Array
  present: jax.Array
  pixel_keys: jax.Array
  num_pixels: jax.Array


def _normalize(x: jax.Array) -> jax.Array:
  """torch's F.normalize: x / max(||x||, 1e-12) over the last axis."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def init_queues(rng: jax.Array, *, num_classes: int, dim: int, queue_size: int) -> OfficialQueues:
  """Random unit-vector queues (released `torch.randn` + normalize) and zero pointers."""
  seg_rng, pix_rng = jax.random.split(rng)
  shape = (num_classes, queue_size, dim)
  return OfficialQueues(
      segment_queue=_normalize(jax.random.normal(seg_rng, shape, jnp.float32)),
      segment_ptr=jnp.zeros((num_classes,), jnp.int32),
      pixel_queue=_normalize(jax.random.normal(pix_rng, shape, jnp.float32)),
      pixel_ptr=jnp.zeros((num_classes,), jnp.int32))


def random_picks(rng: jax.Array, count: jax.Array, *, num_positions: int, pixel_update_freq: int,
                 batch_offset: jax.Array | int = 0) -> jax.Array:
  """`randperm(count)[:F]` per (image, class): F random distinct positions in [0, count).

  Args:
    count: [B, C] int, positions to draw from.
    num_positions: static bound of `count` (the label grid's size).
    batch_offset: global position of image 0 (image b draws from fold_in(rng, offset + b)).
  Returns:
    [B, C, F] int32; entries past min(count, F) are meaningless.
  """
  b, c = count.shape
  f = min(pixel_update_freq, num_positions)
  score = sampling.per_image(lambda key: jax.random.uniform(key, (c, num_positions)), rng,
                             batch_offset + jnp.arange(b))
  score = jnp.where(jnp.arange(num_positions)[None, None, :] < count[..., None], score, -1.0)
  _, index = lax.top_k(score, f)
  return jnp.pad(index, [(0, 0), (0, 0), (0, pixel_update_freq - f)]).astype(jnp.int32)


def sample_update(keys: jax.Array, label: jax.Array, rng: jax.Array | None, *, num_classes: int,
                  label_stride: int = 8, pixel_update_freq: int = 10, skip_class0: bool = True,
                  picks: jax.Array | None = None,
                  batch_offset: jax.Array | int = 0) -> QueueUpdate:
  """The keys `_dequeue_and_enqueue` writes for a batch (quirks 2, 4, 5 of the module doc).

  Args:
    keys: [B, h, w, D] detached embeddings.
    label: [B, H, W] int full-size GT (ignore = any id outside [0, C)).
    rng: key of the pixel picks (unused when `picks` is given).
    label_stride: the released `network.stride` (8); labels are `label[:, ::s, ::s]`, matched to
      the keys by flat index.
    pixel_update_freq: F, pixel keys per (image, class) (released 10).
    skip_class0: never enqueue class 0 (released).
    picks: [B, C, F] flat positions to take (tests feed the released `randperm`s), or None.
  Returns:
    QueueUpdate of B images.
  """
  b, h, w, d = keys.shape
  lab = label[:, ::label_stride, ::label_stride].reshape(b, -1).astype(jnp.int32)
  num_positions = lab.shape[1]
  if num_positions > h * w:
    raise ValueError(f"label {label.shape[1:]} at stride {label_stride} has {num_positions} "
                     f"positions, more than the {h}x{w} keys (config.memory.official_label_stride)")
  feats = lax.stop_gradient(keys).astype(jnp.float32).reshape(b, h * w, d)[:, :num_positions]
  classes = jnp.arange(num_classes, dtype=jnp.int32)
  is_class = lab[:, None, :] == classes[None, :, None]  # [B, C, P]
  if skip_class0:
    is_class = is_class & (classes > 0)[None, :, None]
  onehot = is_class.astype(jnp.float32)
  count = jnp.sum(is_class, axis=-1, dtype=jnp.int32)
  sums = jnp.einsum("bcp,bpd->bcd", onehot, feats, precision=lax.Precision.HIGHEST)
  segment = _normalize(sums / jnp.maximum(count, 1)[..., None].astype(jnp.float32))
  if picks is None:
    picks = random_picks(rng, count, num_positions=num_positions,
                         pixel_update_freq=pixel_update_freq, batch_offset=batch_offset)
  picks = jnp.clip(picks, 0, num_positions - 1)
  pixel = jnp.take_along_axis(feats[:, None, :, :], picks[..., None], axis=2)  # [B, C, F, D]
  return QueueUpdate(segment_keys=segment, present=count > 0, pixel_keys=_normalize(pixel),
                     num_pixels=jnp.minimum(count, pixel_update_freq))


def apply_update(queues: OfficialQueues, update: QueueUpdate, *,
                 ptr_step: str = "one") -> OfficialQueues:
  """Writes an update image by image, as the released loop (quirk 1).

  Per image and present class c, with Q slots, pointer p and K pixel keys: the segment key goes
  to slot p_seg, p_seg <- (p_seg + 1) % Q; the pixel keys go to slots [Q-K, Q) with p <- 0 if
  p + K >= Q, else to [p, p+K) with p <- (p + 1) % Q (`ptr_step='one'`, released) or
  (p + K) % Q (`'count'`, a FIFO).
  """
  if ptr_step not in PTR_STEPS:
    raise ValueError(f"config.memory.official_pixel_ptr_step={ptr_step!r}: expected one of "
                     f"{PTR_STEPS}")
  num_classes, q, _ = queues.pixel_queue.shape
  f = update.pixel_keys.shape[2]
  if f > q:
    raise ValueError(f"pixel_update_freq {f} exceeds the queue size {q} "
                     "(config.memory.official_queue_size)")
  rows = jnp.arange(num_classes)

  def one_image(state: OfficialQueues, image: QueueUpdate):
    seg_slot = jnp.where(image.present, state.segment_ptr, q)  # q: dropped
    segment_queue = state.segment_queue.at[rows, seg_slot].set(image.segment_keys, mode="drop")
    segment_ptr = jnp.where(image.present, (state.segment_ptr + 1) % q, state.segment_ptr)
    k, ptr = image.num_pixels, state.pixel_ptr
    wrap = ptr + k >= q
    start = jnp.where(wrap, q - k, ptr)
    j = jnp.arange(f)[None, :]
    slot = jnp.where(image.present[:, None] & (j < k[:, None]), start[:, None] + j, q)
    pixel_queue = state.pixel_queue.at[rows[:, None], slot].set(image.pixel_keys, mode="drop")
    step = 1 if ptr_step == "one" else k
    new_ptr = jnp.where(wrap, 0, (ptr + step) % q)
    pixel_ptr = jnp.where(image.present, new_ptr, ptr).astype(jnp.int32)
    return OfficialQueues(segment_queue, segment_ptr.astype(jnp.int32), pixel_queue,
                          pixel_ptr), None

  queues, _ = lax.scan(one_image, queues, update)
  return queues


def enqueue(queues: OfficialQueues, keys: jax.Array, label: jax.Array, rng: jax.Array, *,
            axis_name: str | None = None, enqueue_images: int | None = None,
            ptr_step: str = "one", **update_settings) -> OfficialQueues:
  """Samples this batch's update and writes it (quirk 7: only the leading `enqueue_images`).

  With `axis_name` (inside shard_map) each device samples its own images and the updates are
  all-gathered in device order, so every replica writes the same global-batch update.

  Args:
    keys: [b, h, w, D] this device's detached embeddings; label: [b, H, W] full-size GT.
    enqueue_images: leading images of the (global) batch written per step; None = all.
    **update_settings: `sample_update`'s keywords (num_classes, label_stride, ...).
  """
  offset = 0 if axis_name is None else lax.axis_index(axis_name) * keys.shape[0]
  update = sample_update(keys, label, rng, batch_offset=offset, **update_settings)
  if axis_name is not None:
    update = jax.tree.map(
        lambda x: lax.all_gather(x, axis_name, axis=0, tiled=True, to="invarying"), update)
  if enqueue_images is not None:
    update = jax.tree.map(lambda x: x[:enqueue_images], update)
  return apply_update(queues, update, ptr_step=ptr_step)


def contrast_set(queues: OfficialQueues, *, skip_class0: bool = True) -> tuple[jax.Array, jax.Array, int]:
  """`_sample_negative` of cat(segment, pixel) queues: ([M, D] keys, [M] labels, zero rows).

  With `skip_class0` the keys are classes 1..C-1 (2Q each, segment queue first) and the released
  2Q trailing zero rows (label 0) are not materialised: their count is returned instead.
  """
  queue = lax.stop_gradient(jnp.concatenate([queues.segment_queue, queues.pixel_queue], axis=1))
  c, n, d = queue.shape
  first = 1 if skip_class0 else 0
  keys = queue[first:].reshape(-1, d).astype(jnp.float32)
  labels = jnp.repeat(jnp.arange(first, c, dtype=jnp.int32), n)
  return keys, labels, (n if skip_class0 else 0)


def queue_contrastive(x: jax.Array, y: jax.Array, row_index: jax.Array, row_valid: jax.Array,
                      keys: jax.Array, key_labels: jax.Array, num_zero_keys: int, *,
                      temperature: float, base_temperature: float) -> tuple[jax.Array, jax.Array]:
  """`_contrastive(X_anchor, y_anchor, queue)`: each anchor row against the queue (quirk 6).

  L_i = -(tau / tau_base) mean_{j in P(i)} [s_ij - log(exp(s_ij) + sum_{k in N(i)} exp(s_ik))],
  s = x keys^T / tau, P(i) = keys of row i's class except column `row_index[i]`, N(i) = keys of
  another class; the `num_zero_keys` zero keys (label 0, s = 0) follow the M real columns.

  Args:
    x: [R, D] anchor rows; y: [R] their classes; row_index: [R] the row's index in the released
      order (view-major); row_valid: [R] bool.
    keys: [M, D]; key_labels: [M].
  Returns:
    (loss: mean over valid rows with a positive, rows counted).
  """
  r = x.shape[0]
  m = keys.shape[0]
  s_real = jnp.matmul(x.astype(jnp.float32), keys.T) / temperature  # [R, M]
  s = jnp.concatenate([s_real, jnp.zeros((r, num_zero_keys), jnp.float32)], axis=1)
  col_y = jnp.concatenate([key_labels, jnp.zeros((num_zero_keys,), jnp.int32)])
  same = y[:, None] == col_y[None, :]
  pos = same & (jnp.arange(m + num_zero_keys)[None, :] != row_index[:, None])
  neg = ~same
  has_neg = jnp.any(neg, axis=1, keepdims=True)
  neg_max = lax.stop_gradient(jnp.max(jnp.where(neg, s, -jnp.inf), axis=1, keepdims=True))
  neg_max = jnp.where(has_neg, neg_max, 0.0)
  neg_sum = jnp.sum(jnp.exp(jnp.where(neg, s - neg_max, -jnp.inf)), axis=1, keepdims=True)
  log_neg = jnp.where(has_neg, jnp.log(jnp.where(has_neg, neg_sum, 1.0)) + neg_max, _LOG_ZERO)
  log_prob = -jax.nn.softplus(log_neg - s)
  n_pos = jnp.sum(pos, axis=1)
  mean_log_prob_pos = jnp.sum(jnp.where(pos, log_prob, 0.0), axis=1) / jnp.maximum(n_pos, 1)
  row_loss = -(temperature / base_temperature) * mean_log_prob_pos
  counted = row_valid & (n_pos > 0)
  num = jnp.sum(counted, dtype=jnp.int32)
  return jnp.sum(jnp.where(counted, row_loss, 0.0)) / jnp.maximum(num, 1), num


def official_mem_contrast_loss(embedding: jax.Array, label: jax.Array, predict: jax.Array,
                               queues: OfficialQueues, rng: jax.Array, *, num_classes: int = 19,
                               temperature: float = 0.07, base_temperature: float = 0.07,
                               max_samples: int = 1024, max_views: int = 1,
                               skip_class0: bool = True,
                               ignore_label: int = 255) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`PixelContrastLoss.forward(feats, labels, predict, queue)` of loss_contrast_mem.py.

  Args:
    embedding: [B, h, w, D] L2-normalised projections.
    label: [B, H, W] int GT (255 = ignore), brought to (h, w) by legacy nearest.
    predict: [B, h, w] int argmax of the un-upsampled logits.
    queues: the memory before this step's update (detached).
    rng: key of the anchor views' pixel choice.
  Returns:
    (loss scalar, metrics with `contrast_loss`, `num_valid_anchors`, `valid_anchor_fraction`,
    `n_view`, `num_rows`). No anchor: loss 0 (the released code crashes).
  """
  sample, feats, anchor, view, row_valid = official.anchor_view_rows(
      embedding, label, predict, rng, num_classes=num_classes, max_samples=max_samples,
      max_views=max_views, ignore_label=ignore_label)
  keys, key_labels, num_zero = contrast_set(queues, skip_class0=skip_class0)
  loss, num_rows = queue_contrastive(
      feats, sample.cls[anchor], view * sample.num_anchors + anchor, row_valid, keys, key_labels,
      num_zero, temperature=temperature, base_temperature=base_temperature)
  return loss, {"contrast_loss": loss, "num_valid_anchors": sample.num_anchors,
                "valid_anchor_fraction": sample.num_anchors / float(sample.valid.shape[0]),
                "n_view": sample.n_view, "num_rows": num_rows}
