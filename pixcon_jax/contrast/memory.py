"""The memory bank M of the paper (Sec. 3.2 "Pixel-to-Region Contrast", Sec. 3.3), as a pytree.

Two parts, both holding detached, L2-normalised keys:

- pixel queue `[C, T, D]`: per class a FIFO receiving V randomly chosen pixel embeddings of that
  class from each image of the step (paper V = 10, T = 10 N).
- region memory `[C, R, D]`: the mean embedding of each class in each image. `region_mode='indexed'`
  is the paper's `[C, N, D]` table, written at `[c, image_id]` (N = number of training images);
  `region_mode='fifo'` is a per-class FIFO of R entries for datasets too large for a table.

Every entry carries a validity bit; a slot becomes valid when first written and stays valid. The
bank is replicated: each device samples the keys of its own images, the keys of all devices are
all-gathered and every device applies the same `push`, so replicas stay bitwise identical.
`enqueue` is the single-device form on a (global) batch; `enqueue_distributed` is the shard_map
form. Both give the same bank for the same global batch and rng, because the random pixels of an
image are drawn from `fold_in(rng, global image position)`.

Deferred writes. The train step does not write its keys into the bank at its end: it stores them
as the bank's `pending` update, and the next step `flush`es them first, before anything reads the
bank. The bank every loss sees is the same (all earlier steps' keys), but in the compiled step the
in-place scatter then precedes every read of the bank; written at the end, it has no data
dependency on the loss's reads (the keys come from the forward pass), so XLA cannot order it
after them and copied the whole bank to keep the old value alive (twice per step: 578 MB each at
paper settings on Cityscapes). `lax.optimization_barrier` does not order it on XLA:CPU.
`tests/test_train_step.py` checks that the compiled step holds no copy of the bank.
"""
from __future__ import annotations

from typing import Literal

import flax
import jax
import jax.numpy as jnp
from jax import lax

from pixcon_jax.contrast import choices
from pixcon_jax.contrast import sampling


RegionMode = Literal["indexed", "fifo"]


@flax.struct.dataclass
class MemoryBank:
  """Pixel queue and region memory (see module docstring).

  Attributes:
    pixel_keys: [C, T, D] keys of the pixel queue.
    pixel_valid: [C, T] bool.
    pixel_ptr: [C] int32 next slot to write per class (FIFO head).
    region_keys: [C, R, D] region keys (R = N images if indexed, the queue size if fifo).
    region_valid: [C, R] bool.
    region_ptr: [C] int32 next slot per class (fifo mode; unused when indexed).
    region_mode: static, 'indexed' or 'fifo'.
    pending: a MemoryUpdate not yet written (see "Deferred writes" above), or None. The keys the
      bank holds are those of `flush(bank)`.
  """
  pixel_keys: jax.Array
  pixel_valid: jax.Array
  pixel_ptr: jax.Array
  region_keys: jax.Array
  region_valid: jax.Array
  region_ptr: jax.Array
  region_mode: str = flax.struct.field(pytree_node=False, default="indexed")
  pending: "MemoryUpdate | None" = None

  @property
  def num_classes(self) -> int:
    return self.pixel_keys.shape[0]

  @property
  def dim(self) -> int:
    return self.pixel_keys.shape[-1]


@flax.struct.dataclass
class MemoryUpdate:
  """The keys one step adds to the bank, per image (so they can be all-gathered over devices).

  Keys are not yet L2-normalised: `push` normalises them after the gather, so that the sharded
  and the single-device programs round identically (the normalisation is the only op whose
  vectorisation could differ between the two programs).

  Attributes:
    pixel_keys: [B, C, V, D] V sampled pixel embeddings of each class in each image.
    pixel_valid: [B, C, V] bool (fewer than V pixels of the class in the image -> False).
    region_keys: [B, C, D] per-image class means.
    region_valid: [B, C] bool (class present in the image).
    image_id: [B] int32.
  """
  pixel_keys: jax.Array
  pixel_valid: jax.Array
  region_keys: jax.Array
  region_valid: jax.Array
  image_id: jax.Array


def init_memory(*, num_classes: int, dim: int, pixel_queue_size: int,
                region_mode: RegionMode = "indexed", num_images: int | None = None,
                region_queue_size: int | None = None, dtype=jnp.float32) -> MemoryBank:
  """An empty bank (all entries invalid).

  Args:
    num_classes: C.
    dim: D.
    pixel_queue_size: T per class (paper 10 N).
    region_mode: 'indexed' ([C, N, D] by image_id, needs num_images) or 'fifo' (needs
      region_queue_size).
    dtype: key storage dtype (bfloat16 halves the bank; similarities are computed in float32).
  """
  if region_mode == "indexed":
    if not num_images or num_images < 1:
      raise ValueError(f"region_mode='indexed' needs num_images >= 1, got {num_images}")
    slots = num_images
  elif region_mode == "fifo":
    if not region_queue_size or region_queue_size < 1:
      raise ValueError(f"region_mode='fifo' needs region_queue_size >= 1, got {region_queue_size}")
    slots = region_queue_size
  else:
    raise ValueError(f"region_mode must be one of {choices.REGION_MODES}, got {region_mode!r}")
  if pixel_queue_size < 1:
    raise ValueError(f"pixel_queue_size must be >= 1, got {pixel_queue_size}")
  c = num_classes
  return MemoryBank(
      pixel_keys=jnp.zeros((c, pixel_queue_size, dim), dtype),
      pixel_valid=jnp.zeros((c, pixel_queue_size), bool),
      pixel_ptr=jnp.zeros((c,), jnp.int32),
      region_keys=jnp.zeros((c, slots, dim), dtype),
      region_valid=jnp.zeros((c, slots), bool),
      region_ptr=jnp.zeros((c,), jnp.int32),
      region_mode=region_mode)


def empty_update(*, batch_size: int, num_classes: int, pixels_per_class: int, dim: int,
                 dtype=jnp.float32) -> MemoryUpdate:
  """An update that writes nothing (every entry invalid), of a step's shapes.

  Args:
    batch_size: B, the global batch of the step whose keys it stands for.
    pixels_per_class: V.
  Returns:
    MemoryUpdate with `pixel_keys [B, C, V, D]` zeros, all `*_valid` False, `image_id` -1.
  """
  b, c, v = batch_size, num_classes, pixels_per_class
  return MemoryUpdate(
      pixel_keys=jnp.zeros((b, c, v, dim), dtype), pixel_valid=jnp.zeros((b, c, v), bool),
      region_keys=jnp.zeros((b, c, dim), dtype), region_valid=jnp.zeros((b, c), bool),
      image_id=jnp.full((b,), -1, jnp.int32))


def flush(memory: MemoryBank) -> MemoryBank:
  """Writes the bank's pending update (if any); the result has `pending=None`.

  The train step calls it first, so that the bank's in-place write precedes its reads.
  """
  if memory.pending is None:
    return memory
  return push(memory.replace(pending=None), memory.pending)


def _l2_normalize(x: jax.Array) -> jax.Array:
  return x * lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def sample_keys(embedding: jax.Array, label: jax.Array, image_id: jax.Array, rng: jax.Array, *,
                num_classes: int, pixels_per_class: int, ignore_label: int = 255,
                batch_offset: jax.Array | int = 0) -> MemoryUpdate:
  """The step's keys for the bank: V random pixels and the mean embedding per class and image.

  Args:
    embedding: [B, h, w, D] pixel embeddings (detached here).
    label: [B, h, w] on the embedding grid (`contrast.labels.downsample_labels` brings full-size
      labels there; the objective does it once per step).
    image_id: [B] int.
    rng: PRNG key, the same on all devices.
    batch_offset: position of this batch's first image in the global batch; image b's pixels are
      drawn with `fold_in(rng, batch_offset + b)` so a sharded step picks the same pixels as one
      device on the gathered batch.
  Returns:
    MemoryUpdate with B images.
  """
  b, h, w, d = embedding.shape
  if label.shape != (b, h, w):
    raise ValueError(f"sample_keys: label {label.shape} must be on the embedding grid "
                     f"{(b, h, w)} (contrast.labels.downsample_labels)")
  emb = lax.stop_gradient(embedding).astype(jnp.float32).reshape(b, h * w, d)
  label = label.reshape(b, h * w)
  classes = jnp.arange(num_classes, dtype=label.dtype)
  is_class = (label[:, None, :] == classes[None, :, None]) & (label[:, None, :] != ignore_label)
  # [B, C, hw]: V pixels per class and image, uniformly without replacement.
  score = sampling.per_image(lambda key: jax.random.uniform(key, (num_classes, h * w)), rng,
                             batch_offset + jnp.arange(b))
  score = jnp.where(is_class, score, -jnp.inf)
  v = min(pixels_per_class, h * w)
  top, index = lax.top_k(score, v)
  pixel_valid = top > -jnp.inf
  pixel_keys = jnp.take_along_axis(emb[:, None, :, :], index[..., None], axis=2)  # [B, C, V, D]
  # Region keys: per-image class means (Sec. 3.2), via a one-hot matmul.
  onehot = is_class.astype(jnp.float32)  # [B, C, hw]
  sums = jnp.einsum("bcp,bpd->bcd", onehot, emb, precision=lax.Precision.HIGHEST)
  count = jnp.sum(onehot, axis=-1)
  region_keys = sums / jnp.maximum(count, 1.0)[..., None]
  return MemoryUpdate(pixel_keys=pixel_keys, pixel_valid=pixel_valid, region_keys=region_keys,
                      region_valid=count > 0, image_id=image_id.astype(jnp.int32))


def gather_keys(update: MemoryUpdate, axis_name: str) -> MemoryUpdate:
  """All-gathers per-device updates along the batch axis (inside shard_map / a named axis).

  The output is invariant over `axis_name` (identical on every device), in device order, i.e. the
  global batch order.
  """
  return jax.tree.map(
      lambda x: lax.all_gather(x, axis_name, axis=0, tiled=True, to="invarying"), update)


def _fifo_write(keys: jax.Array, valid: jax.Array, ptr: jax.Array, new: jax.Array,
                new_valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-class FIFO write of a variable number of entries (compacted, in order).

  Equivalent to pushing the valid new entries of each class one by one: with n new entries and
  S slots, only the last min(n, S) survive, written at (ptr + rank) % S, and ptr advances by n.

  Args:
    keys: [C, S, D]; valid: [C, S]; ptr: [C].
    new: [C, N, D]; new_valid: [C, N].
  """
  c, s = valid.shape
  n_new = jnp.sum(new_valid, axis=1, dtype=jnp.int32)  # [C]
  rank = jnp.cumsum(new_valid, axis=1, dtype=jnp.int32) - 1
  keep = new_valid & (rank >= (n_new - s)[:, None])
  slot = jnp.where(keep, (ptr[:, None] + rank) % s, s)  # s = out of bounds -> dropped
  rows = jnp.broadcast_to(jnp.arange(c)[:, None], slot.shape)
  keys = keys.at[rows, slot].set(new.astype(keys.dtype), mode="drop")
  valid = valid.at[rows, slot].set(True, mode="drop")
  return keys, valid, (ptr + n_new) % s


def push(memory: MemoryBank, update: MemoryUpdate) -> MemoryBank:
  """Applies a (global) update: pixel FIFO per class, region table or FIFO.

  Order within a step is image-major (image 0's V keys of a class first), so FIFO order is the
  global batch order. In indexed mode a repeated image_id within the update keeps its last
  occurrence; a class absent from an image leaves that image's old entry in place. A pending
  update of `memory` is written first; the result has none.
  """
  memory = flush(memory)  # An earlier pending update goes first (FIFO order).
  b, c, v, d = update.pixel_keys.shape
  update = update.replace(pixel_keys=_l2_normalize(update.pixel_keys),
                          region_keys=_l2_normalize(update.region_keys))
  pixel_new = jnp.transpose(update.pixel_keys, (1, 0, 2, 3)).reshape(c, b * v, d)
  pixel_new_valid = jnp.transpose(update.pixel_valid, (1, 0, 2)).reshape(c, b * v)
  pixel_keys, pixel_valid, pixel_ptr = _fifo_write(
      memory.pixel_keys, memory.pixel_valid, memory.pixel_ptr, pixel_new, pixel_new_valid)
  region_new = jnp.transpose(update.region_keys, (1, 0, 2))  # [C, B, D]
  region_new_valid = update.region_valid.T  # [C, B]
  if memory.region_mode == "indexed":
    slots = memory.region_keys.shape[1]
    ids = update.image_id
    # Drop all but the last occurrence of an image id so the scatter has unique indices.
    later_dup = jnp.triu(ids[:, None] == ids[None, :], k=1).any(axis=1)
    ok = region_new_valid & ~later_dup[None, :] & (ids >= 0)[None, :] & (ids < slots)[None, :]
    slot = jnp.where(ok, ids[None, :], slots)
    rows = jnp.broadcast_to(jnp.arange(c)[:, None], slot.shape)
    region_keys = memory.region_keys.at[rows, slot].set(
        region_new.astype(memory.region_keys.dtype), mode="drop")
    region_valid = memory.region_valid.at[rows, slot].set(True, mode="drop")
    region_ptr = memory.region_ptr
  else:
    region_keys, region_valid, region_ptr = _fifo_write(
        memory.region_keys, memory.region_valid, memory.region_ptr, region_new, region_new_valid)
  return memory.replace(pixel_keys=pixel_keys, pixel_valid=pixel_valid, pixel_ptr=pixel_ptr,
                        region_keys=region_keys, region_valid=region_valid,
                        region_ptr=region_ptr)


def enqueue(memory: MemoryBank, embedding: jax.Array, label: jax.Array, image_id: jax.Array,
            rng: jax.Array, *, pixels_per_class: int, ignore_label: int = 255) -> MemoryBank:
  """Adds a (global) batch's keys to the bank; pure.

  Args:
    memory: the bank.
    embedding: [B, h, w, D] (detached and re-normalised here).
    label: [B, h, w] on the embedding grid.
    image_id: [B] int (the row of the indexed region memory).
    rng: PRNG key.
    pixels_per_class: V (paper 10).
  Returns:
    The updated bank.
  """
  update = sample_keys(embedding, label, image_id, rng, num_classes=memory.num_classes,
                       pixels_per_class=pixels_per_class, ignore_label=ignore_label)
  return push(memory, update)


def enqueue_distributed(memory: MemoryBank, embedding: jax.Array, label: jax.Array,
                        image_id: jax.Array, rng: jax.Array, *, pixels_per_class: int,
                        axis_name: str = "data", ignore_label: int = 255) -> MemoryBank:
  """`enqueue` inside shard_map: local sampling, all_gather of the sampled keys, identical push.

  Gathering the sampled keys ([B, C, V + 1, D]) instead of the embeddings ([B, h, w, D]) moves
  ~hw / (C (V + 1)) times fewer bytes and gives the same bank as `enqueue` on the global batch.

  Args:
    memory: the replicated bank.
    embedding: [B_local, h, w, D] this device's embeddings.
    label: [B_local, h, w] on the embedding grid.
    image_id: [B_local].
    rng: PRNG key, replicated (the same on all devices).
  Returns:
    The updated bank, identical on every device.
  """
  return push(memory, sample_keys_distributed(
      embedding, label, image_id, rng, num_classes=memory.num_classes,
      pixels_per_class=pixels_per_class, axis_name=axis_name, ignore_label=ignore_label))


def sample_keys_distributed(embedding: jax.Array, label: jax.Array, image_id: jax.Array,
                            rng: jax.Array, *, num_classes: int, pixels_per_class: int,
                            axis_name: str = "data", ignore_label: int = 255) -> MemoryUpdate:
  """The global batch's update inside shard_map: local `sample_keys`, then all-gathered.

  Args: as `enqueue_distributed`.
  Returns:
    MemoryUpdate of the global batch (`pixel_keys [B_global, C, V, D]`), identical on every
    device; `push` it (or set it as the bank's `pending`) to add it to the bank.
  """
  offset = lax.axis_index(axis_name) * embedding.shape[0]
  update = sample_keys(embedding, label, image_id, rng, num_classes=num_classes,
                       pixels_per_class=pixels_per_class, ignore_label=ignore_label,
                       batch_offset=offset)
  return gather_keys(update, axis_name)
