"""Static-shape sampling for the pixel contrast (paper Sec. 3.2, "Hard Example Sampling").

Everything here has fixed output shapes plus validity masks: a selection is a top-k over masked
random (or hardness) scores -- `lax.top_k` where indices are needed (anchors), a selection mask
found by bisection where a set is enough (mining) -- never boolean indexing or Python branching
on data, so the functions are jit- and shard_map-safe.

- `sample_pool`: a uniform candidate pool of fixed size from the valid entries of a set (stratified
  without replacement; exact -- the whole set -- when the pool is at least as large as the set).
- `batch_pool` (`pixel_keys`, `uniform_subset`), `compact`: a uniform sample without replacement
  of the pixels of the whole (global) mini-batch -- random keys from each pixel's global
  position, one global threshold -- and this device's selected entries packed into a static-size
  array.
- `global_top_k`: the k largest scores of rows whose entries are spread over devices.
- `sample_anchors`: per-class anchors, random or segmentation-aware hard (half mispredicted pixels),
  drawn from the images of all devices with per-image random scores.
- `column_uniform`: uniform scores drawn per column, so that any slice of columns draws its own.
- `top_k_mask`: the set `lax.top_k` would select, as a mask, by bisection on the k-th value.
- `mine_mask`: per-anchor positive / negative selection from a similarity block: random, hardest
  (top-K), semi-hard (top `fraction` hardest, then K at random from them).
- `weighted_top_mask`: the hardest entries of a weighted sample (each pool entry standing for
  `weight` entries of its source), i.e. an estimate of the whole source's top K from a pool.

With `axis_name`, the entries of a row are spread over the devices of that mesh axis (inside
`shard_map`): counts, maxima and sums are reduced over the devices (`collectives.py`), so every
device selects its part of the one global selection. Without it, everything is local.
"""
from __future__ import annotations

import functools
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pixcon_jax.contrast import choices
from pixcon_jax.contrast import collectives
from pixcon_jax.contrast.collectives import AxisName

TopK = Literal["exact", "approx"]
Selection = Literal["bisect", "sort", "approx"]
Mining = Literal["random", "hardest", "semi_hard", "hardness_weighted"]
AnchorSampling = Literal["random", "seg_aware_hard"]

_NEG_INF = -jnp.inf


def masked_top_k(score: jax.Array, valid: jax.Array, k: int, *,
                 top_k: TopK = "exact", ordered: bool = False) -> tuple[jax.Array, jax.Array]:
  """Indices of the k largest valid scores along the last axis.

  Args:
    score: [..., n] float scores (not differentiated: selection only).
    valid: [..., n] bool, False entries are never reported as valid.
    k: static number to select; the output width is min(k, n).
    top_k: 'exact' (`lax.top_k`) or 'approx' (`lax.approx_max_k`, faster on TPU, recall ~0.95).
    ordered: the output is in descending score order even when k >= n (else, with k >= n, the
      indices are simply 0..n-1: no sort).
  Returns:
    index [..., min(k, n)] int32, valid [..., min(k, n)] bool (False when fewer than k valid).
  """
  n = score.shape[-1]
  k = min(int(k), n)
  score = jnp.where(valid, lax.stop_gradient(score).astype(jnp.float32), _NEG_INF)
  if k == n and not ordered:
    # Everything is selected: no need for a sort.
    index = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), score.shape)
    return index, valid
  if top_k == "approx":
    values, index = lax.approx_max_k(score, k)
  elif top_k == "exact":
    values, index = lax.top_k(score, k)
  else:
    raise ValueError(f"top_k must be 'exact' or 'approx', got {top_k!r}")
  return index.astype(jnp.int32), values > _NEG_INF


def sample_pool(valid: jax.Array, k: int, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Uniform candidate pool of k distinct valid entries along the last axis.

  Stratified sampling without replacement: with n valid entries (n >= k) the rank range [0, n) is
  cut into k strata of (near) equal width, one rank is drawn uniformly in each and all ranks are
  cyclically shifted by a random offset, so every valid entry has the same inclusion probability
  k / n, there are no duplicates, and the cost is O(n) (a cumulative sum) plus O(k log n) (a
  search) -- no sort of the whole set. (Unlike a simple random sample, entries far apart in the
  order are favoured over neighbours; in the bank, neighbours are pixels of the same image/step.)
  With n < k all valid entries are returned. With k >= the static size of the axis the result is
  the whole axis (exact).

  Args:
    valid: [..., n] bool.
    k: static pool size (k * k must fit in int32, i.e. k <= 46340).
    rng: PRNG key.
  Returns:
    index [..., min(k, n)] int32 into the last axis, valid [..., min(k, n)] bool.
  """
  n_static = valid.shape[-1]
  if k >= n_static:
    index = jnp.broadcast_to(jnp.arange(n_static, dtype=jnp.int32), valid.shape)
    return index, valid
  if k > 46340:
    raise ValueError(f"pool size k={k} too large for int32 stratum arithmetic (max 46340)")
  lead = valid.shape[:-1]
  count = jnp.cumsum(valid.astype(jnp.int32), axis=-1)  # [..., n]
  n = count[..., -1:]  # [..., 1] number of valid entries
  j = jnp.arange(k, dtype=jnp.int32)
  # start_j = floor(j * n / k) without int32 overflow: j*n = j*(q*k + r).
  q, r = n // k, n % k
  start = j * q + (j * r) // k
  stop = (j + 1) * q + ((j + 1) * r) // k
  u = jax.random.uniform(rng, lead + (k,))
  width = (stop - start).astype(jnp.float32)
  rank = start + jnp.minimum(jnp.floor(u * width).astype(jnp.int32), stop - start - 1)
  # A random cyclic shift of the ranks makes every entry's inclusion probability exactly k / n
  # (strata have widths floor(n/k) or ceil(n/k); the shift averages over which stratum it is in).
  shift = jnp.floor(jax.random.uniform(jax.random.fold_in(rng, 1), n.shape) * n).astype(jnp.int32)
  rank = (rank + jnp.minimum(shift, n - 1)) % jnp.maximum(n, 1)
  rank = jnp.where(n >= k, rank, j)  # fewer valid entries than k: take them all
  ok = rank < n
  # The rank-th valid entry is the first position whose inclusive count exceeds rank.
  search = lambda c, v: jnp.searchsorted(c, v, side="right").astype(jnp.int32)
  for _ in lead:
    search = jax.vmap(search)
  index = search(count, rank)
  index = jnp.where(ok, jnp.minimum(index, n_static - 1), 0)
  return index, ok


def compact(mask: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
  """The first `size` True entries of each row, as indices in ascending order.

  Args:
    mask: [..., n] bool.
    size: static output width (clipped to n).
  Returns:
    index [..., min(size, n)] int32 (0 where unused), ok [..., min(size, n)] bool (False once
    the row's True entries are used up).
  """
  n_static = mask.shape[-1]
  size = min(int(size), n_static)
  count = jnp.cumsum(mask.astype(jnp.int32), axis=-1)  # [..., n]
  j = jnp.arange(size, dtype=jnp.int32)
  # The j-th True entry is the first position whose inclusive count exceeds j.
  search = lambda c: jnp.searchsorted(c, j, side="right").astype(jnp.int32)
  for _ in mask.shape[:-1]:
    search = jax.vmap(search)
  ok = j < count[..., -1:]
  return jnp.where(ok, jnp.minimum(search(count), n_static - 1), 0), ok


def pixel_keys(rng: jax.Array, positions: jax.Array, pixels: int) -> jax.Array:
  """[b * pixels] uint32 random keys below 2^31, image i's from fold_in(rng, positions[i]).

  A pixel's key depends on its position in the global mini-batch only, so any split of the
  images over devices draws the same keys. 31 random bits: ties, broken by pixel id in
  `uniform_subset`, are rare even among millions of pixels.
  """
  bits = per_image(lambda key: jax.random.bits(key, (pixels,), jnp.uint32), rng, positions)
  return (bits >> 1).reshape(-1)


def uniform_subset(valid: jax.Array, k: int, keys: jax.Array, column: jax.Array,
                   axis_name: AxisName = None) -> jax.Array:
  """A uniform sample without replacement of min(k, n_valid) valid entries of each row.

  The sample is the top k of i.i.d. random keys, found over the entries of all devices by
  bisection with psum'd counts (`top_k_mask`), so it is the same set whatever the split: each
  valid entry of a row with n valid entries is included with probability min(k, n) / n.

  Args:
    valid: [..., n] bool, this device's entries of each row.
    k: static sample size per row.
    keys: [n] uint32 keys below 2^32 - 1 (`pixel_keys`), broadcast over the rows.
    column: [n] int ids distinct over all devices (ties of keys keep the lower ids).
    axis_name: the rows' entries are spread over this mesh axis.
  Returns:
    [..., n] bool, this device's part of the sample.
  """
  return top_k_mask(jnp.broadcast_to(keys, valid.shape), valid, k, column=column,
                    axis_name=axis_name)


def batch_pool(valid: jax.Array, k: int, rng: jax.Array, positions: jax.Array,
               axis_name: AxisName = None) -> jax.Array:
  """A candidate pool from the pixels of the whole mini-batch: `uniform_subset` of each row.

  Every valid pixel of a row (e.g. the pixels of one class) of the global mini-batch is in the
  pool with the same probability min(k, n) / n, however its n pixels are spread over images and
  devices. Keys from `pixel_keys`, ties broken by the pixels' global ids.

  Args:
    valid: [..., b * p] bool, this device's b images of p pixels each, flattened.
    k: static pool size per row.
    rng: PRNG key, the same on every device.
    positions: [b] int, the images' positions in the global mini-batch.
    axis_name: the mini-batch's images are split over this mesh axis.
  Returns:
    [..., b * p] bool, the pool members among this device's pixels.
  """
  b = positions.shape[0]
  p = valid.shape[-1] // b
  keys = pixel_keys(rng, positions, p)
  column = (positions[:, None] * p + jnp.arange(p)).reshape(-1)
  return uniform_subset(valid, k, keys, column, axis_name)


class Anchors(NamedTuple):
  """Per-class anchors (`sample_anchors`): slot [c, a] is the a-th anchor of class c.

  index: [C, A] int32, where this device holds the anchor: into its [b * p] flattened pixels.
  owned: [C, A] bool, this device holds the anchor (valid anchors are owned by exactly one).
  valid: [C, A] bool, the slot holds an anchor (same on every device).
  hard: [C, A] bool, an owned anchor that is mispredicted.
  """
  index: jax.Array
  owned: jax.Array
  valid: jax.Array
  hard: jax.Array


def global_top_k(score: jax.Array, valid: jax.Array, k: int, *,
                 axis_name: AxisName = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The k largest valid scores of rows whose entries are spread over the devices of an axis.

  Each device holds n entries of every row. The global k largest are among the union of every
  device's own k largest, so only those candidates' scores cross devices ([..., N * k] floats).

  Args:
    score: [..., n] float scores of this device's entries (not differentiated).
    valid: [..., n] bool.
    k: static number to select.
  Returns:
    index [..., k] int32 into this device's n entries (meaningful where owned), owned [..., k]
    bool, ok [..., k] bool (the slot holds one of the global top k; False when fewer are valid).
    Slot s is the s-th largest over all devices, the same on every device.
  """
  local_index, local_ok = masked_top_k(score, valid, k, ordered=True)
  width = local_index.shape[-1]
  value = jnp.where(local_ok, jnp.take_along_axis(
      lax.stop_gradient(score).astype(jnp.float32), local_index, axis=-1), _NEG_INF)
  merged = collectives.concat_last(value, axis_name)  # [..., N * width]
  if merged.shape[-1] < k:  # fewer entries than k: pad, so the output always has k slots
    pad = [(0, 0)] * (merged.ndim - 1) + [(0, k - merged.shape[-1])]
    merged = jnp.pad(merged, pad, constant_values=_NEG_INF)
  top, slot = lax.top_k(merged, k)
  ok = top > _NEG_INF
  owned = ok & (slot // max(width, 1) == collectives.index(axis_name))
  index = jnp.take_along_axis(local_index, jnp.minimum(slot % max(width, 1), width - 1), axis=-1)
  return index.astype(jnp.int32), owned, ok


def per_image(draw, rng: jax.Array, positions: jax.Array, *arrays: jax.Array):
  """`draw(key_i, *arrays_i)` for every image i, with key_i = fold_in(rng, positions[i]).

  An image's draws depend on its position in the global mini-batch only, so they are the same
  whichever device holds the image.

  Args:
    draw: function of a key and one image's slices of `arrays`.
    positions: [b] int, the images' positions in the global mini-batch.
    arrays: [b, ...] per-image inputs.
  Returns:
    draw's outputs stacked over the b images.
  """
  return jax.vmap(lambda pos, *a: draw(jax.random.fold_in(rng, pos), *a))(positions, *arrays)


def _image_uniforms(rng: jax.Array, positions: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """[b, *shape] uniforms, image i drawn from fold_in(rng, positions[i]) (device-count invariant)."""
  return per_image(lambda key: jax.random.uniform(key, shape), rng, positions)


def sample_anchors(label: jax.Array, predict: jax.Array | None, rng: jax.Array, *,
                   num_classes: int, anchors_per_class: int,
                   mode: AnchorSampling = "seg_aware_hard", ignore_label: int = 255,
                   positions: jax.Array | None = None, axis_name: AxisName = None) -> Anchors:
  """Per-class anchor pixels (paper Sec. 3.2; 50 per class per mini-batch in Sec. 3.3).

  'random': `anchors_per_class` pixels of each class uniformly without replacement.
  'seg_aware_hard': half (floor) of them among the mispredicted pixels (`predict != label`), the
  rest uniformly among the class's other pixels; with fewer hard pixels than half, the random part
  fills the gap, and with fewer pixels than anchors all of the class's pixels are taken.

  A uniform sample without replacement is the top k of i.i.d. uniform scores. Each image's scores
  come from `fold_in(rng, position)`, and with `axis_name` the top k is taken over the images of
  all devices (`global_top_k`): the anchors are the same whether the mini-batch sits on one
  device or is split over many.

  Args:
    label: [b, p] (or [p]: one image) int class ids at the embedding resolution (ignore_label /
      out of range = no class).
    predict: like label, predicted class ids (only read by 'seg_aware_hard').
    rng: PRNG key, the same on every device.
    positions: [b] int, the images' positions in the global mini-batch (default 0..b-1).
  Returns:
    `Anchors` with [C, anchors_per_class] fields.
  """
  if label.ndim == 1:
    label = label[None]
    predict = None if predict is None else predict[None]
  b, p = label.shape
  positions = jnp.arange(b) if positions is None else positions
  classes = jnp.arange(num_classes, dtype=label.dtype)[:, None]
  flat = lambda x: jnp.moveaxis(x, 1, 0).reshape(num_classes, b * p)  # [b, C, p] -> [C, b p]
  label = label.reshape(-1)
  is_class = (label[None, :] == classes) & (label[None, :] != ignore_label)  # [C, b p]
  rng_hard, rng_rand = jax.random.split(rng)
  score = flat(_image_uniforms(rng_rand, positions, (num_classes, p)))
  select = functools.partial(global_top_k, axis_name=axis_name)
  if mode == "random":
    index, owned, valid = select(score, is_class, anchors_per_class)
  elif mode == "seg_aware_hard":
    if predict is None:
      raise ValueError("anchor_sampling='seg_aware_hard' needs `predict`")
    predict = predict.reshape(-1)
    chosen = jnp.zeros(is_class.shape, jnp.float32)
    if anchors_per_class // 2:
      hard = is_class & (predict[None, :] != classes)
      hard_index, hard_owned, _ = select(
          flat(_image_uniforms(rng_hard, positions, (num_classes, p))), hard,
          anchors_per_class // 2)
      # Chosen hard pixels get priority 2 + u over the class's other pixels (u in [0, 1)), so one
      # top k returns them first and then a random fill; no duplicates by construction.
      rows = jnp.broadcast_to(jnp.arange(num_classes)[:, None], hard_index.shape)
      chosen = chosen.at[rows, jnp.where(hard_owned, hard_index, b * p)].set(2.0, mode="drop")
    index, owned, valid = select(score + chosen, is_class, anchors_per_class)
  else:
    raise ValueError(f"anchor sampling must be 'random' or 'seg_aware_hard', got {mode!r}")
  if predict is None:
    is_hard = jnp.zeros(index.shape, bool)
  else:
    is_hard = owned & (jnp.take(predict.reshape(-1), index) != jnp.take(label, index))
  return Anchors(index=index, owned=owned, valid=valid, hard=is_hard)


def column_uniform(rng: jax.Array, column: jax.Array, rows: int) -> jax.Array:
  """[rows, Q] uniforms whose column j is drawn from fold_in(rng, column[j]).

  A column's values depend only on its id, so a device holding a slice of a row's columns
  draws exactly what one device holding them all would.
  """
  draw = lambda c: jax.random.uniform(jax.random.fold_in(rng, c), (rows,))
  return jax.vmap(draw, out_axes=1)(column)


def uniform_rank(u: jax.Array) -> jax.Array:
  """uint32 keys with the order, ties included, of float32 uniforms from `jax.random.uniform`.

  Those are multiples of 2^-23 in [0, 1) (23 random mantissa bits), so u * 2^23 is an exact
  integer below 2^23: as `top_k_mask` scores they select what u selects, and the bisection spans
  23 bits instead of the 31 of float32's ordered bit patterns (tests/test_sampling.py checks
  both facts against the installed JAX).
  """
  return (u.astype(jnp.float32) * float(1 << 23)).astype(jnp.uint32)


def _fraction_count(n: jax.Array | int, fraction: float):
  """ceil(fraction * n), robust to float rounding of exact products (0.1 * 10240 -> 1024)."""
  if isinstance(n, int):
    return max(min(n, 1), min(n, math.ceil(fraction * n - 1e-3)))
  m = jnp.ceil(n.astype(jnp.float32) * fraction - 1e-3).astype(jnp.int32)
  return jnp.clip(m, jnp.minimum(n, 1), n)


def _order_key(score: jax.Array) -> jax.Array:
  """uint32 keys with the order of `score`, at least 1 (0 marks invalid entries).

  float32: the bit pattern with negative floats reversed and the sign bit flipped (1 or more for
  any non-NaN score); uint32, already order keys below 2^32 - 1 (`uniform_rank`): score + 1.
  """
  if score.dtype == jnp.uint32:
    return score + jnp.uint32(1)
  bits = lax.bitcast_convert_type(score.astype(jnp.float32), jnp.uint32)
  return jnp.where(bits >= jnp.uint32(0x80000000), ~bits, bits | jnp.uint32(0x80000000))


def _first_by_column(tied: jax.Array, need: jax.Array, column: jax.Array | None,
                     axis_name: AxisName) -> jax.Array:
  """The `need` tied entries of each row with the smallest column ids, over all devices.

  Bisection on the column id t with the count of tied entries below t summed over devices
  (ids are distinct; without ids, this device's position then the index order is used).

  Args:
    tied: [..., n] bool; need: [...] int32 (at most the number of tied entries).
    column: [n] int32 ids, or None.
  Returns:
    [..., n] bool, the kept tied entries (True also for untied entries: callers mask).
  """
  if column is None:
    n = tied.shape[-1]
    column = collectives.index(axis_name) * n + jnp.arange(n, dtype=jnp.int32)
  column = jnp.broadcast_to(column.astype(jnp.int32), tied.shape)
  count = lambda t: collectives.psum(
      jnp.sum(tied & (column < t[..., None]), axis=-1, dtype=jnp.int32), axis_name)
  # Invariant: count(lo) < need <= count(hi); the answer is hi once hi = lo + 1.
  hi = collectives.pmax(jnp.max(jnp.where(tied, column, 0), axis=-1), axis_name) + 1
  lo = jnp.minimum(hi, 0)

  def body(carry):
    lo, hi = carry
    mid = lo + (hi - lo) // 2
    up = count(mid) >= need
    return jnp.where(up, lo, mid), jnp.where(up, mid, hi)

  _, hi = lax.while_loop(lambda c: jnp.any(c[1] - c[0] > 1), body, (lo, hi))
  return column < hi[..., None]


def _bisect_top_k_mask(score: jax.Array, valid: jax.Array, k: jax.Array,
                       axis_name: AxisName = None, column: jax.Array | None = None
                       ) -> jax.Array:
  """`top_k_mask` by bisection on the k-th largest value; see there.

  The k-th largest valid score of a row is the largest threshold t with count(score >= t) >= k.
  It is found by bisection over the 2^32 ordered bit patterns of float32 (at most 32 counting
  passes, each a compare-and-sum over the row, O(n)); a row stops as soon as some threshold counts
  exactly k, which with distinct values takes about log2(n / gap) passes. Rows whose k-th value is
  tied keep the lower-indexed of the tied entries, as `lax.top_k` does (with `column` ids, the
  lower ids; with `axis_name` and no ids, a lower device's entries come first). The counts are float32 sums, exact for rows of fewer than
  2^24 entries (longer rows are refused). With `axis_name` the counts are summed over devices
  each pass ([...] floats), so the passes, and the selection, are the same on every device.
  """
  if score.shape[-1] * collectives.size(axis_name) >= 2 ** 24:
    raise ValueError(f"top_k_mask: rows of {score.shape[-1]} x {collectives.size(axis_name)} "
                     "entries; at most 2^24 - 1 supported")
  psum = functools.partial(collectives.psum, axis_name=axis_name)
  key = jnp.where(valid, _order_key(score), jnp.uint32(0))  # 0 is below every valid entry
  n_valid = psum(jnp.sum(valid, axis=-1, dtype=jnp.int32))
  k = jnp.minimum(k, n_valid)
  # Invariant: count(key >= lo) >= k > count(key >= hi) = cnt_hi. The initial values are
  # derived from the data so that, inside shard_map, they vary over the same mesh axes as the
  # loop's outputs (a constant would be device-invariant and the loop carry types would differ).
  hi = collectives.pmax(jnp.max(key, axis=-1), axis_name) + jnp.uint32(1)
  lo = jnp.minimum(hi, jnp.uint32(1))  # 1: hi >= 1 for any non-NaN score
  cnt_hi = jnp.minimum(n_valid, 0)
  exact = k == n_valid  # every valid entry (count(key >= 1) == k)
  active = (k > 0) & ~exact & (hi - lo > 1)

  def body(carry):
    lo, hi, cnt_hi, exact, active = carry
    mid = lo + (hi - lo) // 2
    # Counted in float32 (exact below 2^24 per row): XLA:CPU reduces it ~25% faster than int32.
    count = psum(jnp.sum(jnp.where(key >= mid[..., None], 1.0, 0.0), axis=-1)).astype(jnp.int32)
    up = active & (count >= k)
    down = active & (count < k)
    lo, hi = jnp.where(up, mid, lo), jnp.where(down, mid, hi)
    cnt_hi = jnp.where(down, count, cnt_hi)
    exact = exact | (active & (count == k))
    return lo, hi, cnt_hi, exact, active & ~exact & (hi - lo > 1)

  lo, hi, cnt_hi, exact, _ = lax.while_loop(
      lambda c: jnp.any(c[4]), body, (lo, hi, cnt_hi, exact, active))
  above = key >= lo[..., None]

  def break_ties(above):
    # Not exact: the k-th value is tied (hi == lo + 1). Keep all above it and the first
    # k - cnt_hi of the tied entries in index (or column id) order.
    tied = key == lo[..., None]
    need = k - cnt_hi
    if column is None and axis_name is None:
      first = jnp.cumsum(tied, axis=-1, dtype=jnp.int32) <= need[..., None]
    else:
      first = _first_by_column(tied, need, column, axis_name)
    with_ties = (key >= hi[..., None]) | (tied & first)
    return jnp.where(exact[..., None], above, with_ties)

  mask = lax.cond(jnp.any(~exact & (k > 0)), break_ties, lambda a: a, above)
  return mask & (k > 0)[..., None]


def _sorted_top_k_mask(score: jax.Array, valid: jax.Array, k: jax.Array, k_max: int,
                       approx: bool) -> jax.Array:
  """`top_k_mask` with `lax.top_k` (or `lax.approx_max_k`) of width k_max and a scatter."""
  index, ok = masked_top_k(score, valid, k_max, top_k="approx" if approx else "exact",
                           ordered=True)  # ranks matter: a row keeps its first k
  ok = ok & (jnp.arange(k_max) < k[..., None])
  lead = jnp.indices(index.shape, sparse=True)[:-1]
  return jnp.zeros(score.shape, bool).at[(*lead, index)].set(ok, unique_indices=True)


def top_k_mask(score: jax.Array, valid: jax.Array, k: jax.Array | int, *, k_max: int | None = None,
               impl: Selection = "bisect", axis_name: AxisName = None,
               column: jax.Array | None = None) -> jax.Array:
  """Mask of the k largest valid scores along the last axis: the set `lax.top_k` selects.

  Args:
    score: [..., n] float scores (not differentiated: selection only), or, for 'bisect', uint32
      order keys below 2^32 - 1 (`uniform_rank`).
    valid: [..., n] bool; only valid entries are selected.
    k: int, or [...] int per row; a row selects min(k, number of valid entries).
    k_max: static bound on k (needed by 'sort' / 'approx' when k is an array).
    impl: 'bisect' (threshold by bisection, exact; O(n) per pass, no sort: the fast one on CPU),
      'sort' (`lax.top_k` + scatter, exact), 'approx' (`lax.approx_max_k`, for TPU; recall ~0.95).
    axis_name: the row's entries are spread over this mesh axis ('bisect' only).
    column: optional [n] int ids of the entries, distinct over all devices: ties at the k-th
      value keep the lower ids ('bisect'; default: the index order).
  Returns:
    [..., n] bool. Ties at the k-th value keep the lower index, as `lax.top_k`.
  """
  score = lax.stop_gradient(score)
  if impl not in ("bisect", "sort", "approx"):
    raise ValueError(f"top_k must be 'bisect', 'sort' or 'approx', got {impl!r}")
  if axis_name is not None and impl != "bisect":
    raise ValueError(f"top_k={impl!r} selects within one device; rows spread over devices "
                     "(contrast.global_batch=True) need top_k='bisect'")
  if isinstance(k, int):
    k_max = k if k_max is None else k_max
  elif k_max is None:
    k_max = score.shape[-1]
  k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), score.shape[:-1])
  if impl == "bisect":
    return _bisect_top_k_mask(score, valid, k, axis_name, column)
  return _sorted_top_k_mask(score, valid, k, min(int(k_max), score.shape[-1]), impl == "approx")


def weighted_top_mask(score: jax.Array, valid: jax.Array, weight: jax.Array, k: int, *,
                      axis_name: AxisName = None) -> tuple[jax.Array, jax.Array]:
  """The top entries of a weighted sample: an estimate of the top k of the population it stands for.

  Each valid entry i stands for `weight[i]` members of a larger population (its inverse inclusion
  probability, e.g. source size / pool size). The population's top k are estimated by the entries
  above the largest threshold t whose weight, sum_i w_i [score_i >= t], reaches k; when the whole
  valid weight is below k every valid entry is selected. Selected weights are then scaled so that
  they add up to exactly min(k, total weight), the size of the population's top-k set. With unit
  weights this is the exact top-k set (all entries tied at the k-th value included).

  The threshold is found by bisection over the ordered float32 bit patterns (32 weighted counting
  passes over the row, O(n) each; no sort).

  Args:
    score: [..., n] float scores, larger = selected first (not differentiated).
    valid: [..., n] bool.
    weight: positive float weights broadcastable to [..., n].
    k: static size of the population's top set.
    axis_name: the row's entries are spread over this mesh axis (masses summed over devices).
  Returns:
    mask [..., n] bool, scaled weights [..., n] float32 (0 where not selected).
  """
  key = jnp.where(valid, _order_key(lax.stop_gradient(score)), jnp.uint32(0))
  w = jnp.broadcast_to(jnp.asarray(weight, jnp.float32), key.shape)

  def mass(threshold):  # weight at or above a threshold, per row
    return collectives.psum(jnp.sum(jnp.where(key >= threshold[..., None], w, 0.0), axis=-1),
                            axis_name)

  top = collectives.pmax(jnp.max(key, axis=-1), axis_name)
  lo = jnp.minimum(top, jnp.uint32(1))  # key >= 1 <=> valid
  target = jnp.minimum(jnp.float32(k), mass(lo))  # same expression as mass(lo): exact compare
  hi = top + jnp.uint32(1)  # mass(hi) = 0 < target (unless nothing is valid)

  # "Reaches k" up to float32 rounding: with fractional weights a mass can equal k exactly in
  # reals (e.g. 16/3 + 8/3) and land on either side of it depending on the order of the sum, which
  # differs between one device and a psum over many. Weights are >= 1 (a pool is at most its
  # source), so this slack never admits one more entry.
  reach = target * jnp.float32(1.0 - 1e-5)

  def body(_, carry):
    lo, hi = carry
    mid = lo + (hi - lo) // 2
    up = mass(mid) >= reach
    return jnp.where(up, mid, lo), jnp.where(up, hi, mid)

  lo, _ = lax.fori_loop(0, 32, body, (lo, hi))
  mask = valid & (key >= lo[..., None])
  selected = collectives.psum(jnp.sum(jnp.where(mask, w, 0.0), axis=-1), axis_name)
  scale = target / jnp.maximum(selected, 1e-30)
  return mask, jnp.where(mask, w * scale[..., None], 0.0)


def mine_mask(sim: jax.Array, valid: jax.Array, rng: jax.Array, *, num: int, mode: Mining,
              harder: Literal["low", "high"], fraction: float = 0.1, top_k: Selection = "bisect",
              at_least_num: bool = False, column: jax.Array | None = None,
              temperature: float = 0.2, axis_name: AxisName = None) -> jax.Array:
  """Selects per anchor `num` entries of a similarity block (paper Sec. 3.2); returns a mask.

  Modes: 'random' -- uniform among the valid entries; 'hardest' -- the `num` hardest;
  'semi_hard' -- the ceil(fraction * n_valid) hardest, then `num` uniformly among them (with
  `at_least_num`, the top part holds at least min(num, n_valid) entries, so a pool whose top
  fraction is smaller than `num` still yields `num` samples); 'hardness_weighted' (beyond the
  paper) -- `num` drawn without replacement with probability proportional to
  exp(hardness / temperature) (Gumbel top-k: every entry can be drawn, harder ones more often, no
  top-k cut). Harder means lower similarity for positives (`harder='low'`), higher for negatives
  ('high').

  A mask rather than indices: the loss then reads the selected similarities in place (masked
  reductions over the block), so its gradient is a dense, masked one through the block matmul --
  no gathers and no scatter-add in the backward pass.

  Args:
    sim: [A, Q] similarities (anchors x candidate pool); only compared, never differentiated.
    valid: [A, Q] bool, candidates usable by each anchor.
    rng: PRNG key (random draws of 'random' and 'semi_hard').
    fraction: semi-hard's top fraction, a float or a traced scalar in (0, 1] (1 = random).
    top_k: selection implementation, see `top_k_mask`.
    column: optional [Q] int ids of the candidates: the random draws of a candidate then depend
      only on its id (`column_uniform`), not on which device holds it.
    temperature: 'hardness_weighted' only: the draw's temperature on the similarity scale (large:
      random; small: hardest).
    axis_name: the candidates are spread over this mesh axis (each device passes its own [A, Q]).
  Returns:
    [A, Q] bool with min(num, n_valid) entries per row (semi-hard: min(num, m)).
  """
  q = sim.shape[-1] * collectives.size(axis_name)  # candidates per row over all devices
  sim = lax.stop_gradient(sim)
  hardness = -sim if harder == "low" else sim
  select = functools.partial(top_k_mask, impl=top_k, axis_name=axis_name, column=column)

  def raw_uniform():
    if column is None:
      return jax.random.uniform(rng, sim.shape)
    return column_uniform(rng, column, sim.shape[0])

  def uniform():
    # The same selection as u's, with a shorter bisection (see `uniform_rank`).
    u = raw_uniform()
    return uniform_rank(u) if top_k == "bisect" else u

  if mode == "random":
    return select(uniform(), valid, num)
  if mode == "hardness_weighted":
    # Perturbed by Gumbel noise, the top `num` scores are a draw without replacement with
    # probabilities proportional to exp(hardness / temperature) (Plackett-Luce).
    u = jnp.clip(raw_uniform(), jnp.finfo(jnp.float32).tiny, 1.0 - 2.0 ** -24)
    gumbel = -jnp.log(-jnp.log(u))
    return select(hardness.astype(jnp.float32) / temperature + gumbel, valid, num)
  if mode == "hardest":
    return select(hardness, valid, num)
  if mode == "semi_hard":
    n_valid = collectives.psum(jnp.sum(valid, axis=-1, dtype=jnp.int32), axis_name)  # [A]
    m = _fraction_count(n_valid, fraction)
    # Static bound on m; a traced fraction (the hardness curriculum) may be anything up to 1.
    top = _fraction_count(q, fraction) if isinstance(fraction, (int, float)) else q
    if at_least_num:
      m = jnp.maximum(m, jnp.minimum(num, n_valid))
      top = min(q, max(top, num))
    top_mask = select(hardness, valid, m, k_max=top)
    if num >= top:
      return top_mask  # the whole top part is the sample (pool = K / fraction: the default)
    return select(uniform(), top_mask, num)
  raise ValueError(f"mining must be one of {choices.MININGS}, got {mode!r}")
