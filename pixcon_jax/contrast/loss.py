"""The paper's pixel-wise contrastive loss, Eq. 3, over mini-batch pixels and the memory bank.

For an anchor pixel i of class c with positives P_i and negatives N_i (paper Eq. 3):

  L_i = 1/|P_i| sum_{i+ in P_i} -log( e^{i.i+/tau} / (e^{i.i+/tau} + sum_{i- in N_i} e^{i.i-/tau}) )
      = 1/|P_i| sum_{i+} softplus( LSE_{i-}(i.i-/tau) - i.i+/tau ),

averaged over the valid anchors (an anchor with no positive or no negative is not valid). The
contrast set is any combination of the mini-batch pixels, the pixel memory and the region memory
(Table 2), inter-image or intra-image (Table 1: only the anchor's own image, no memory).

Cost model and the candidate-pool approximation
-----------------------------------------------
Scanning the whole bank (19 x (29750 + 2975) entries) for every one of the 950 anchors costs ~3e11
FLOPs forward; the loss must stay within ~3% of an HRNet-W48 step (~6e10 FLOPs for loss + grad).
So every step draws random candidate pools without replacement (`sampling.sample_pool`):

- positives of class c: `positive_pool` entries (default 10240 = 10 x K+) of class c, a share
  `batch_pool_fraction` (0.2) from the mini-batch (a uniform sample without replacement of the
  class's pixels in the whole mini-batch, `sampling.batch_pool`: every pixel of the class equally
  likely, whatever its image or segment size; the whole class when it has fewer pixels) and the
  rest from the union of the pixel and region memories (uniform over that union, so pixel vs
  region weights follow their sizes);
- negatives: one pool of `negative_pool` entries (default 20480 = 10 x K-) shared by all classes,
  split the same way (its mini-batch part uniform over all labelled pixels of the mini-batch);
  for class c its entries of other classes are the negatives (so class c sees about
  (1 - share of c) x pool negatives).

Semi-hard mining (Sec. 3.2: top 10% hardest of M, then K at random) is applied to the pool: the
members of a uniform random pool that lie in the bank's hardest 10% are a uniform random subset of
that 10%, so with pool = K / fraction the pool's top 10% is an unbiased stand-in for "K at random
from the bank's top 10%" (up to the fluctuation of the pool quantile). When a class's usable share
of a pool has a top 10% smaller than K (shared negative pool, early small bank), the top part is
widened to K (`semi_hard_at_least_k`), i.e. a slightly deeper quantile, so K samples are still used.
With every pool at least as large as its source the pools are the whole sources and the loss is
exact (the tests compare with a direct numpy Eq. 3).
'hardest' (Table 3) means the K hardest of the whole contrast set, not of the pool (at pool = K /
fraction the pool's hardest K are exactly what semi-hard takes). Each pool entry stands for
n_source / n_pool entries of its source (the mini-batch pixels of the class, or the memory: the
two parts of a pool sample their sources at different rates), so the
set's hardest K are estimated by the pool entries above the threshold whose *weight* reaches K
(`sampling.weighted_top_mask`; about pool x K / n_source entries), and Eq. 3 weights them: a
negative enters the log-sum-exp with its weight (the selected weights add up to K), a positive's
term is averaged with its weight. With pools at least as large as their sources every weight is 1
and this is the exact top-K.

Memory: anchors are processed one class block at a time (`lax.map` under `jax.checkpoint`); a block
computes its similarities to its class's positive pool [A_c, pool+] by matmul and selects the
mined entries as a mask (`sampling.mine_mask`: the exact top-k set, found by bisection on the k-th
value instead of a sort), and Eq. 3 reads the selected similarities in place (masked sums over the
block). So the gradient goes back through the matmul as a dense, masked one (dS @ pool for the
anchors, dS^T @ anchors for in-batch pool pixels): no gathered [A, K, D] embeddings, no gather of
selected values and no scatter-add. The negative pool is shared by all classes, so its
similarities are one [C x A, pool-] matmul per source before the loop (a few large matmuls run
~1.6x faster than C small ones on CPU), and that block (78 MB at paper settings) is kept for the
backward pass. Per class block the positive block and the selection masks are kept
(`_REMAT_POLICY`): no similarity matmul and no selection is recomputed.
Gradients reach the anchors and the in-batch contrast pixels; memory keys are constants.

Work split over devices (`axis_name`, the train step's `contrast.global_batch=True`)
-------------------------------------------------------------------------------------
The loss is one loss of the whole mini-batch, whatever the number of devices it is split over;
each device does its share, and only anchors and per-anchor reductions cross devices:

- Random draws depend on an image's or a pixel's position in the mini-batch (anchors, batch
  pools) or on a candidate's column id (mining), never on the device that holds it.
- Anchors: the class's A largest per-pixel random scores over all images (`sampling.global_top_k`
  merges each device's own top A, [C, N x A] scores). Every device gets every anchor's embedding
  by a psum ([C, A, D]; its transpose sums the anchors' gradients).
- Pools: the mini-batch parts are the top k of per-pixel random keys drawn from each pixel's
  global position, found with one global threshold per pool (bisection with psum'd counts,
  `sampling.uniform_subset`), so the pools are the same sets on any number of devices.
  A class's pool members lie wherever its pixels are, all on one device for a class that only
  one device's images show, so each device keeps room for a whole class pool ([C, batch share]
  entries; its own members valid, the rest masked): the mini-batch positives' similarities are
  not split (at paper settings they are ~1/12 of the loss's FLOPs). The negative pool, whose
  similarities to every anchor are the larger cost, is balanced: each device writes its members
  at their ranks in the global pixel order (`collectives.offset`) and a reduce-scatter
  (`collectives.scatter_rows`; an all-gather of their gradients in the backward pass) leaves
  device d ranks [d, d + 1) x pool / N. The memory pools are drawn with the shared key from the
  replicated bank and each device takes 1/N of their entries (`_pool_slice`).
- Each device computes all anchors against its pool entries, so the similarity FLOPs of the
  negative and memory pools fall as 1/N.
  The mining's counts (`sampling.top_k_mask` bisection, `weighted_top_mask`) and Eq. 3's
  log-sum-exp and positive sums are reduced over devices ([C, A]-sized psums), so every device
  selects its part of the one global selection and holds the same per-anchor losses.

At paper settings, with the mini-batch in the contrast set (semi-hard mining, all three
sources), the collectives are 11.4 MB per device per step on 1 device and 7.7 MB (7.3 MiB) on 8
(mostly the negative pool's reduce-scatter and its gradients' all-gather, [4096, 256] float32),
against 2 x 33.5 MB per image for all-gathering the embedding maps, and the FLOPs per device on
8 devices are 0.22 of one device's (the unsplit mini-batch positives: 0.13 with per-image pools)
(`scripts/bench_contrast.py --only_pod`, `contrast_collective_bytes_*`,
`contrast_flops_per_device_*`). tests/test_contrast_pod.py checks 8 devices == 1.

Measured at paper settings (scripts/bench_contrast.py, CPU): see the JSON it prints
(`temp_bytes`, `flops`, `contrast_flop_share`).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from pixcon_jax.contrast import choices
from pixcon_jax.contrast import collectives
from pixcon_jax.contrast import sampling
from pixcon_jax.contrast.collectives import AxisName
from pixcon_jax.contrast.memory import MemoryBank

SOURCES = choices.SOURCES
_KEPT = "contrast_kept"
# Per class block only the selection masks and the positive similarity block survive to the
# backward pass ([A, pool+] float32 + [A, pool+ + pool-] bool, ~3.5 MB per class at paper
# settings; the negative block is an input of the loop). Everything else -- the pool gathers, the
# bisection -- is dropped; the backward of the block matmul needs only its inputs, so no
# similarity matmul and no selection is recomputed (only the cheap pool gathers are).
_REMAT_POLICY = jax.checkpoint_policies.save_only_these_names(_KEPT)


@dataclasses.dataclass(frozen=True)
class ContrastSettings:
  """Static settings of `pixel_contrast_loss` (bound once with functools.partial).

  The defaults are configs/common.py's (tests/test_objective.py compares them): one default per
  knob. `mining` defaults to 'random', not the paper's 'semi_hard' (docs/ABLATIONS.md,
  "Departures").

  Attributes:
    temperature: tau of Eq. 3 (paper 0.1).
    base_temperature: if set, the loss is scaled by tau / base_tau (official code: 0.07).
    sources: contrast set, any of 'batch', 'pixel_memory', 'region_memory' (Table 2). Default:
      the memory M only, the paper's "from the memory bank M" (Sec. 3.2).
    scope: 'inter' (across images) or 'intra' (anchor's own image only, batch source only; Table 1).
    anchor_sampling: 'random' or 'seg_aware_hard' (half mispredicted pixels).
    anchors_per_class: anchors per class per (per-device) mini-batch (paper 50).
    mining: 'random', 'hardest' or 'semi_hard' positive/negative sampling (Table 3), or
      'hardness_weighted' (beyond the paper: K drawn with probability ~ exp(hardness / T)).
    num_positives: K+ (paper 1024).
    num_negatives: K- (paper 2048).
    semi_hard_fraction: the hardest fraction kept before random sampling (paper 0.1).
    mining_temperature: T of 'hardness_weighted' mining, on the cosine scale (large: random;
      small: hardest).
    semi_hard_at_least_k: keep at least min(K, n) hardest before the random draw, so a pool whose
      top fraction is smaller than K (e.g. a class's share of the shared negative pool, or an
      early, small bank) still yields K samples; the paper's bank (top 10% of ~600k) always holds
      more than K. False = strictly the top fraction.
    top_k: how the mining selects its top-k set: 'bisect' (exact, by bisection on the k-th value,
      no sort; the fast one on CPU), 'sort' (exact, lax.top_k) or 'approx' (lax.approx_max_k,
      for TPU). See `sampling.top_k_mask`.
    positive_pool: candidate pool per class for positives (default 10 x K+; see module doc).
    negative_pool: candidate pool shared by all classes for negatives (default 10 x K-).
    batch_pool_fraction: share of each pool drawn from the mini-batch when memory is also a source.
    class_block: classes whose anchors are processed together per loop step (memory vs speed).
    remat: checkpoint each class block, keeping only the selected indices and values for the
      backward pass (False stores every block's residuals: more memory, same FLOPs).
    unroll: unroll the class loop (only so that XLA cost analysis counts every iteration).
    num_classes: C; None = taken from the memory bank.
    ignore_label: label value without a class (255).
  """
  temperature: float = 0.1
  base_temperature: float | None = None
  sources: tuple[str, ...] = ("pixel_memory", "region_memory")
  scope: str = "inter"
  anchor_sampling: str = "seg_aware_hard"
  anchors_per_class: int = 50
  mining: str = "random"
  num_positives: int = 1024
  num_negatives: int = 2048
  semi_hard_fraction: float = 0.1
  mining_temperature: float = 0.2
  semi_hard_at_least_k: bool = True
  top_k: str = "bisect"
  positive_pool: int = 10240
  negative_pool: int = 20480
  batch_pool_fraction: float = 0.2
  class_block: int = 1
  remat: bool = True
  unroll: bool = False
  num_classes: int | None = None
  ignore_label: int = 255

  def __post_init__(self):
    object.__setattr__(self, "sources", tuple(self.sources))
    bad = [s for s in self.sources if s not in SOURCES]
    if bad or not self.sources:
      raise ValueError(f"contrast sources must be a non-empty subset of {SOURCES}, got "
                       f"{self.sources}")
    if self.scope not in choices.SCOPES:
      raise ValueError(f"contrast scope must be one of {choices.SCOPES}, got {self.scope!r}")
    if self.scope == "intra" and self.sources != ("batch",):
      raise ValueError("scope='intra' contrasts within the anchor's image only: sources must be "
                       f"('batch',), got {self.sources}")
    if self.anchor_sampling not in choices.ANCHOR_SAMPLINGS:
      raise ValueError(f"anchor_sampling must be one of {choices.ANCHOR_SAMPLINGS}, got "
                       f"{self.anchor_sampling!r}")
    if self.mining not in choices.MININGS:
      raise ValueError(f"mining must be one of {choices.MININGS}, got {self.mining!r}")
    if self.top_k not in choices.TOP_K_IMPLS:
      raise ValueError(f"top_k must be one of {choices.TOP_K_IMPLS}, got {self.top_k!r}")
    if not self.mining_temperature > 0.0:
      raise ValueError(f"mining_temperature must be > 0, got {self.mining_temperature}")
    if not 0.0 < self.semi_hard_fraction <= 1.0:
      raise ValueError(f"semi_hard_fraction must be in (0, 1], got {self.semi_hard_fraction}")
    if not 0.0 <= self.batch_pool_fraction <= 1.0:
      raise ValueError(f"batch_pool_fraction must be in [0, 1], got {self.batch_pool_fraction}")
    for name in ("anchors_per_class", "num_positives", "num_negatives", "positive_pool",
                 "negative_pool", "class_block"):
      if getattr(self, name) < 1:
        raise ValueError(f"contrast.{name} must be >= 1, got {getattr(self, name)}")

  @property
  def uses_memory(self) -> bool:
    return any(s in self.sources for s in ("pixel_memory", "region_memory"))

  def pool_split(self, total: int) -> tuple[int, int]:
    """(batch, memory) shares of a pool of `total` candidates."""
    if "batch" not in self.sources:
      return 0, total
    if not self.uses_memory:
      return total, 0
    batch = int(round(total * self.batch_pool_fraction))
    return batch, total - batch


def _pool_weight(source_valid: jax.Array, pool_valid: jax.Array) -> jax.Array:
  """How many source entries one pool entry stands for: n_source / n_pool (1 for a whole set).

  Args:
    source_valid: [..., n] bool, the set the pool was drawn from.
    pool_valid: [..., q] bool, the pool's valid entries.
  Returns:
    [..., 1] float32.
  """
  n = jnp.sum(source_valid, axis=-1, keepdims=True).astype(jnp.float32)
  q = jnp.sum(pool_valid, axis=-1, keepdims=True).astype(jnp.float32)
  return n / jnp.maximum(q, 1.0)


def _memory_union(memory: MemoryBank, sources: tuple[str, ...]):
  """Which bank parts form the memory contrast set: (use_pixel, use_region, T, R)."""
  use_pixel = "pixel_memory" in sources
  use_region = "region_memory" in sources
  return use_pixel, use_region, memory.pixel_keys.shape[1], memory.region_keys.shape[1]


def _gather_union(memory: MemoryBank, cls: jax.Array, slot: jax.Array, use_pixel: bool,
                  use_region: bool, dtype=jnp.float32) -> jax.Array:
  """Keys at (cls, slot) of the [pixel | region] union of one class row; slot >= T is region."""
  t = memory.pixel_keys.shape[1]
  if use_pixel and use_region:
    pix = memory.pixel_keys[cls, jnp.minimum(slot, t - 1)]
    reg = memory.region_keys[cls, jnp.maximum(slot - t, 0)]
    keys = jnp.where((slot < t)[..., None], pix, reg)
  elif use_pixel:
    keys = memory.pixel_keys[cls, slot]
  else:
    keys = memory.region_keys[cls, slot]
  return lax.stop_gradient(keys.astype(dtype))


def _safe_logsumexp(x: jax.Array, valid: jax.Array, axis_name: AxisName = None
                    ) -> tuple[jax.Array, jax.Array]:
  """Masked log-sum-exp over the last axis; (value, any) with value 0 where nothing is valid.

  Invalid entries are replaced before exp (double-where), so neither the value nor the gradient
  can become NaN / Inf for empty rows. With `axis_name` the row's entries are spread over devices.
  """
  any_valid = collectives.psum(jnp.sum(valid, axis=-1, dtype=jnp.int32), axis_name) > 0
  m = collectives.pmax(jnp.max(jnp.where(valid, lax.stop_gradient(x), -jnp.inf), axis=-1),
                       axis_name)
  m = jnp.where(any_valid, m, 0.0)
  x = jnp.where(valid, x, m[..., None])
  s = collectives.psum(jnp.sum(jnp.where(valid, jnp.exp(x - m[..., None]), 0.0), axis=-1),
                       axis_name)
  return jnp.where(any_valid, m + jnp.log(jnp.where(any_valid, s, 1.0)), 0.0), any_valid


def eq3_anchor_loss(pos: jax.Array, pos_valid: jax.Array, neg: jax.Array, neg_valid: jax.Array,
                    temperature: float, pos_weight: jax.Array | None = None,
                    neg_weight: jax.Array | None = None, axis_name: AxisName = None
                    ) -> tuple[jax.Array, jax.Array]:
  """Eq. 3 per anchor from selected similarities.

  Args:
    pos: [A, K+] anchor-positive similarities; pos_valid: [A, K+] bool, the selected ones. (The
      loss passes whole [A, pool] blocks with the mining's selection masks.)
    neg: [A, K-] anchor-negative similarities; neg_valid: [A, K-] bool.
    pos_weight, neg_weight: optional [A, K] (or broadcastable) positive weights: how many members
      of the contrast set each selected entry stands for (None = 1 each). A negative's exp enters
      the sum with its weight; the positives' mean is weighted.
    axis_name: the columns are spread over this mesh axis; sums and maxima are reduced over it,
      so every device returns the same per-anchor losses.
  Returns:
    loss [A] (0 where invalid), valid [A] (at least one positive and one negative).
  """
  psum = functools.partial(collectives.psum, axis_name=axis_name)
  neg_logits = neg / temperature
  if neg_weight is not None:
    neg_logits = neg_logits + jnp.log(jnp.where(neg_valid, neg_weight, 1.0))
  lse_neg, has_neg = _safe_logsumexp(neg_logits, neg_valid, axis_name)
  # -log(e^{s+} / (e^{s+} + sum e^{s-})) = softplus(LSE(s-) - s+), stable for any magnitude.
  per_pos = jax.nn.softplus(lse_neg[:, None] - pos / temperature)
  w = pos_valid.astype(per_pos.dtype)
  if pos_weight is not None:
    w = jnp.where(pos_valid, pos_weight, 0.0).astype(per_pos.dtype)
  num_pos = psum(jnp.sum(pos_valid, axis=-1, dtype=jnp.int32))
  total = psum(jnp.sum(w, axis=-1))
  per_anchor = psum(jnp.sum(jnp.where(pos_valid, w * per_pos, 0.0), axis=-1)) / jnp.where(
      num_pos > 0, total, 1.0)
  valid = has_neg & (num_pos > 0)
  return jnp.where(valid, per_anchor, 0.0), valid


def _pool_slice(index: jax.Array, ok: jax.Array, axis_name: AxisName
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """This device's share of a replicated pool: its contiguous 1/N of the last axis.

  The pool (drawn with the same key on every device) is padded with invalid entries to a
  multiple of N first, so the split does not change which entries the pool holds.

  Args:
    index, ok: [..., q] the pool's entries and validity.
  Returns:
    index [..., ceil(q / N)], ok, and the entries' positions in the pool [ceil(q / N)] int32.
  """
  q, n = index.shape[-1], collectives.size(axis_name)
  share = -(-q // n)
  pad = [(0, 0)] * (index.ndim - 1) + [(0, share * n - q)]
  index, ok = jnp.pad(index, pad), jnp.pad(ok, pad)
  start = collectives.index(axis_name) * share
  take = lambda x: lax.dynamic_slice_in_dim(x, start, share, axis=-1)
  return take(index), take(ok), start + jnp.arange(share, dtype=jnp.int32)


def pixel_contrast_loss(embedding: jax.Array, label: jax.Array, predict: jax.Array | None,
                        image_id: jax.Array, memory: MemoryBank | None, rng: jax.Array, *,
                        settings: ContrastSettings, hard_fraction: jax.Array | None = None,
                        axis_name: AxisName = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Eq. 3 averaged over anchors sampled from the mini-batch.

  Args:
    embedding: [b, h, w, D] float, L2-normalised pixel embeddings (projection head output) of
      this device's images.
    label: [b, h, w] int class ids on the embedding grid (`contrast.labels.downsample_labels`
      brings full-size labels there; the objective does it once for the whole step).
    predict: [b, h, w] predicted class ids on the grid; needed for
      anchor_sampling='seg_aware_hard', else may be None.
    image_id: [b] int; pixels of equal image_id are "the same image" for scope='intra'.
    memory: the bank *before* this step's update (None if no memory source), replicated.
    rng: PRNG key, the same on every device of `axis_name`.
    settings: static ContrastSettings.
    hard_fraction: optional scalar (may be traced) replacing `settings.semi_hard_fraction`: the
      hardness curriculum of `objective.hard_fraction` (1 = random sampling).
    axis_name: the mini-batch is split over this mesh axis (inside `shard_map`) and the devices
      evaluate one loss together, each doing its share (module doc, "Work split over devices").
      The result is the same as one device holding the whole mini-batch. None: this call's
      images are the whole mini-batch.
  Returns:
    loss: scalar float32 (0 when no anchor is valid, e.g. an all-ignore batch), the same on
      every device.
    metrics: num_valid_anchors, valid_anchor_fraction, num_hard_anchors, mean_positives,
      mean_negatives (per valid anchor), all float32 scalars, the same on every device.
  """
  s = settings
  b, h, w, d = embedding.shape
  if label.shape != (b, h, w) or (predict is not None and predict.shape != (b, h, w)):
    raise ValueError(f"pixel_contrast_loss: label {label.shape} and predict "
                     f"{None if predict is None else predict.shape} must be on the embedding "
                     f"grid {(b, h, w)} (contrast.labels.downsample_labels)")
  num_classes = s.num_classes or (memory.num_classes if memory is not None else None)
  if num_classes is None:
    raise ValueError("ContrastSettings.num_classes is required when no memory bank is given")
  if s.uses_memory and memory is None:
    raise ValueError(f"contrast sources {s.sources} need a memory bank, got None")
  psum = functools.partial(collectives.psum, axis_name=axis_name)
  n_dev = collectives.size(axis_name)
  num_images = b * n_dev  # images in the whole mini-batch
  hw = h * w
  # Where this device's images sit in the mini-batch: every random draw of an image depends on
  # its position only, so the split over devices changes no draw.
  positions = collectives.index(axis_name) * b + jnp.arange(b, dtype=jnp.int32)
  label = label.reshape(b, hw).astype(jnp.int32)
  if predict is not None:
    predict = predict.reshape(b, hw)
  # Similarities in float32 at least (bfloat16 embeddings are upcast; float64 stays, for tests).
  dtype = jnp.promote_types(embedding.dtype, jnp.float32)
  emb = embedding.astype(dtype).reshape(b * hw, d)
  flat_label = label.reshape(-1)
  image = jnp.repeat(image_id.astype(jnp.int32), hw)  # [b hw]
  pixel = (positions[:, None] * hw + jnp.arange(hw)).reshape(-1)  # mini-batch-wide pixel ids
  pixel_ok = (label >= 0) & (label < num_classes) & (label != s.ignore_label)  # [b, hw]
  classes = jnp.arange(num_classes)
  rng_anchor, rng_bp, rng_bn, rng_mp, rng_mn, rng_mine = jax.random.split(rng, 6)

  anchors = sampling.sample_anchors(
      label, predict, rng_anchor, num_classes=num_classes,
      anchors_per_class=s.anchors_per_class, mode=s.anchor_sampling,
      ignore_label=s.ignore_label, positions=positions, axis_name=axis_name)  # [C, A]
  # Every device gets every anchor: each holder contributes its own (zeros elsewhere). The
  # transpose, in the backward pass, sums the anchors' gradients from every device.
  held = lambda x: psum(jnp.where(
      anchors.owned.reshape(anchors.owned.shape + (1,) * (x.ndim - 1)), x[anchors.index], 0))
  xs = dict(cls=classes, anchor=held(emb), anchor_pixel=held(pixel),
            anchor_valid=anchors.valid, anchor_image=held(image),
            rng=jax.random.split(rng_mine, num_classes))
  consts = {}
  batch_pos, mem_pos = s.pool_split(s.positive_pool)
  batch_neg, mem_neg = s.pool_split(s.negative_pool)
  # The mini-batch parts of the pools are uniform samples of the whole mini-batch's pixels: one
  # random key per pixel from its global position and one global threshold per pool
  # (`sampling.uniform_subset`), so the pools do not depend on the split over devices.
  total_pixels = num_images * hw  # memory columns are numbered after the pixels
  if batch_pos:
    # Positives of class c: a device holds its own images' members of the pool, which may be
    # all of it (a class present on this device only), so it keeps room for the whole pool.
    # Gradients flow into them.
    is_class = pixel_ok.reshape(-1) & (flat_label == classes[:, None])  # [C, b hw]
    chosen = sampling.batch_pool(is_class, batch_pos, rng_bp, positions, axis_name)
    idx, ok = sampling.compact(chosen, batch_pos)  # [C, min(pool, b hw)]
    xs.update(bp=emb[idx], bp_pixel=pixel[idx], bp_valid=ok, bp_image=image[idx],
              bp_column=pixel[idx])
  if batch_neg:
    # Negatives: one pool over all pixels, its members spread evenly over the devices (their
    # similarity to every anchor is the larger cost): each device writes its members at their
    # ranks in the global pixel order and receives a contiguous 1/N of the ranks.
    chosen = sampling.batch_pool(pixel_ok.reshape(-1), batch_neg, rng_bn, positions, axis_name)
    idx, ok = sampling.compact(chosen, batch_neg)  # [min(pool, b hw)]
    rows = -(-min(batch_neg, total_pixels) // n_dev) * n_dev
    rank = collectives.offset(jnp.sum(chosen, dtype=jnp.int32), axis_name) + jnp.arange(
        idx.shape[0], dtype=jnp.int32)
    put = lambda x: collectives.scatter_rows(
        jnp.zeros((rows,) + x.shape[1:], x.dtype).at[jnp.where(ok, rank, rows)].set(
            x, mode="drop"), axis_name)
    meta = put(jnp.stack([ok.astype(jnp.int32), flat_label[idx], image[idx]], axis=1))
    share = rows // n_dev
    consts.update(bn=put(emb[idx]), bn_valid=meta[:, 0] > 0, bn_label=meta[:, 1],
                  bn_image=meta[:, 2],
                  bn_column=collectives.index(axis_name) * share + jnp.arange(share))
  batch_columns_pos = batch_columns_neg = total_pixels
  memory_weight = {}  # n_source / n_pool of each memory pool (the whole pool, before the split)
  if s.uses_memory:
    use_pixel, use_region, t, r = _memory_union(memory, s.sources)
    parts = ([memory.pixel_valid] if use_pixel else []) + (
        [memory.region_valid] if use_region else [])
    row_valid = jnp.concatenate(parts, axis=1)  # [C, T (+ R)]
    width = row_valid.shape[1]
    # Memory pools are drawn with the same key on every device (the bank is replicated); each
    # device takes its 1/N of the entries.
    if mem_pos:
      # Positives from memory: per class, uniform over the valid [pixel | region] entries of c.
      idx, ok = sampling.sample_pool(row_valid, mem_pos, rng_mp)
      memory_weight["mp"] = _pool_weight(row_valid, ok)
      idx, ok, at = _pool_slice(idx, ok, axis_name)
      xs.update(mp_slot=idx, mp_valid=ok)
      consts.update(mp_column=batch_columns_pos + at)
    if mem_neg:
      # Negatives from memory: one pool over all classes' valid entries.
      idx, ok = sampling.sample_pool(row_valid.reshape(-1), mem_neg, rng_mn)
      memory_weight["nm"] = _pool_weight(row_valid.reshape(-1), ok)
      idx, ok, at = _pool_slice(idx, ok, axis_name)
      cls, slot = idx // width, idx % width
      consts.update(nm=_gather_union(memory, cls, slot, use_pixel, use_region, dtype), nm_valid=ok,
                    nm_label=cls, nm_column=batch_columns_neg + at)
  # 'hardest' estimates the whole set's top K from the pools (module doc); pools at least as
  # large as their sources are the sources themselves, and the exact top-K is taken.
  pools_exact = ((not batch_pos or batch_pos >= total_pixels)
                 and (not batch_neg or batch_neg >= total_pixels)
                 and (not s.uses_memory or ((not mem_pos or mem_pos >= width)
                                            and (not mem_neg or mem_neg >= num_classes * width))))
  weighted = s.mining == "hardest" and not pools_exact
  if weighted:
    # How many source entries each pool entry stands for (only 'hardest' on partial pools): the
    # mini-batch pools are uniform over the whole mini-batch, the memory pools over their class
    # row (or the whole bank), and the sources' rates differ.
    global_pool_weight = lambda source, pool: (
        psum(jnp.sum(source, axis=-1, keepdims=True)).astype(jnp.float32)
        / jnp.maximum(psum(jnp.sum(pool, axis=-1, keepdims=True)), 1).astype(jnp.float32))
    if "bp_valid" in xs:
      xs["bp_weight"] = global_pool_weight(is_class, xs["bp_valid"])  # [C, 1]
    if "bn_valid" in consts:
      consts["bn_weight"] = global_pool_weight(pixel_ok.reshape(-1), consts["bn_valid"])
    if "mp_valid" in xs:
      xs["mp_weight"] = memory_weight["mp"]
    if "nm_valid" in consts:
      consts["nm_weight"] = memory_weight["nm"]

  # The negative pool is shared by all classes: every anchor against it is one [C*A, D] x [D, Q-]
  # matmul per source (C per-class [A, D] x [D, Q-] matmuls, A = 50, run ~1.6x slower on CPU).
  # The [C, A, Q-] result (78 MB at paper settings on one device) is the one similarity block
  # kept for the backward pass. One matmul per source, so that the backward computes the pool
  # gradient only for the in-batch pixels, not for the constant memory keys.
  for name in ("bn", "nm"):
    if name in consts:
      xs[f"{name}_sim"] = jnp.einsum("cad,qd->caq", xs["anchor"], consts.pop(name))
  neg_column = jnp.concatenate([consts[f"{n}_column"] for n in ("bn", "nm")
                                if f"{n}_column" in consts])

  def block(x, consts):
    """One class: [A, D] anchors against its positive pool and the shared negative pool."""
    a = x["anchor"]
    intra = s.scope == "intra"
    pos_sim, pos_ok, pos_column, neg_sim, neg_ok = [], [], [], [], []
    if "bp" in x:
      pos_sim.append(a @ x["bp"].T)
      ok = x["bp_valid"][None, :] & (x["bp_pixel"][None, :] != x["anchor_pixel"][:, None])
      if intra:
        ok &= x["bp_image"][None, :] == x["anchor_image"][:, None]
      pos_ok.append(ok)
      pos_column.append(x["bp_column"])
    if "mp_slot" in x:
      keys = _gather_union(memory, x["cls"], x["mp_slot"], use_pixel, use_region, dtype)
      pos_sim.append(a @ keys.T)
      pos_ok.append(jnp.broadcast_to(x["mp_valid"][None, :], pos_sim[-1].shape))
      pos_column.append(consts["mp_column"])
    if "bn_sim" in x:
      neg_sim.append(x["bn_sim"])
      ok = (consts["bn_valid"] & (consts["bn_label"] != x["cls"]))[None, :]
      if intra:
        ok = ok & (consts["bn_image"][None, :] == x["anchor_image"][:, None])
      neg_ok.append(jnp.broadcast_to(ok, neg_sim[-1].shape))
    if "nm_sim" in x:
      neg_sim.append(x["nm_sim"])
      ok = (consts["nm_valid"] & (consts["nm_label"] != x["cls"]))[None, :]
      neg_ok.append(jnp.broadcast_to(ok, neg_sim[-1].shape))
    pos_sim, pos_ok = jnp.concatenate(pos_sim, 1), jnp.concatenate(pos_ok, 1)
    neg_sim, neg_ok = jnp.concatenate(neg_sim, 1), jnp.concatenate(neg_ok, 1)
    pos_column = jnp.concatenate(pos_column)
    rng_pos, rng_neg = jax.random.split(x["rng"])

    def mine(sim, ok, key, num, harder, column):
      fraction = s.semi_hard_fraction if hard_fraction is None else hard_fraction
      sel = sampling.mine_mask(
          sim, ok & x["anchor_valid"][:, None], key, num=num, mode=s.mining, harder=harder,
          fraction=fraction, top_k=s.top_k, at_least_num=s.semi_hard_at_least_k, column=column,
          temperature=s.mining_temperature, axis_name=axis_name)
      # Saved for the backward pass (see _REMAT_POLICY), so that it recomputes no selection.
      return checkpoint_name(sel, _KEPT)

    pos_sim = checkpoint_name(pos_sim, _KEPT)
    if weighted:
      pos_w = jnp.concatenate([jnp.broadcast_to(x[f"{n}_weight"], x[f"{n}_valid"].shape)
                               for n in ("bp", "mp") if f"{n}_valid" in x])
      neg_w = jnp.concatenate([jnp.broadcast_to(consts[f"{n}_weight"], consts[f"{n}_valid"].shape)
                               for n in ("bn", "nm") if f"{n}_valid" in consts])

      def mine_weighted(sim, ok, w, num, harder):
        hardness = -sim if harder == "low" else sim
        sel, sel_w = sampling.weighted_top_mask(hardness, ok & x["anchor_valid"][:, None],
                                                w[None, :], num, axis_name=axis_name)
        return checkpoint_name(sel, _KEPT), checkpoint_name(sel_w, _KEPT)

      pos_sel, pos_sel_w = mine_weighted(pos_sim, pos_ok, pos_w, s.num_positives, "low")
      neg_sel, neg_sel_w = mine_weighted(neg_sim, neg_ok, neg_w, s.num_negatives, "high")
      loss, ok = eq3_anchor_loss(pos_sim, pos_sel, neg_sim, neg_sel, s.temperature,
                                 pos_weight=pos_sel_w, neg_weight=neg_sel_w, axis_name=axis_name)
      num_pos, num_neg = jnp.sum(pos_sel_w, -1), jnp.sum(neg_sel_w, -1)
    else:
      pos_sel = mine(pos_sim, pos_ok, rng_pos, s.num_positives, "low", pos_column)
      neg_sel = mine(neg_sim, neg_ok, rng_neg, s.num_negatives, "high", neg_column)
      # Eq. 3 over the whole blocks with the selections as masks: the selected similarities are
      # read in place, so the backward is a masked dense one (no gather, no scatter-add).
      loss, ok = eq3_anchor_loss(pos_sim, pos_sel, neg_sim, neg_sel, s.temperature,
                                 axis_name=axis_name)
      num_pos, num_neg = jnp.sum(pos_sel, -1), jnp.sum(neg_sel, -1)
    ok &= x["anchor_valid"]
    return dict(loss=jnp.sum(jnp.where(ok, loss, 0.0)), valid=jnp.sum(ok),
                pos=psum(jnp.sum(jnp.where(ok, num_pos, 0))),
                neg=psum(jnp.sum(jnp.where(ok, num_neg, 0))))

  body = jax.checkpoint(block, policy=_REMAT_POLICY) if s.remat else block
  if s.unroll:
    per_class = [body(jax.tree.map(lambda v: v[c], xs), consts) for c in range(num_classes)]
    out = jax.tree.map(lambda *v: jnp.stack(v), *per_class)
  else:
    block_size = min(s.class_block, num_classes)
    out = lax.map(lambda x: body(x, consts), xs, batch_size=block_size if block_size > 1 else None)
  num_valid = jnp.sum(out["valid"])
  denom = jnp.maximum(num_valid, 1).astype(jnp.float32)
  loss = jnp.sum(out["loss"]) / denom.astype(dtype)
  if s.base_temperature is not None:
    loss = loss * (s.temperature / s.base_temperature)
  num_valid = num_valid.astype(jnp.float32)
  metrics = dict(
      num_valid_anchors=num_valid,
      valid_anchor_fraction=num_valid / float(anchors.valid.size),
      num_hard_anchors=psum(jnp.sum(anchors.hard)).astype(jnp.float32),
      mean_positives=jnp.sum(out["pos"]).astype(jnp.float32) / denom,
      mean_negatives=jnp.sum(out["neg"]).astype(jnp.float32) / denom)
  return loss, metrics
