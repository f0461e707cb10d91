"""The inference protocol: whole-image / sliding-window, multi-scale + flip, as pure functions.

The protocol (matches the official `segmentor/tester.py`, `ss_test` / `ms_test` /
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

Every function here is per device, jit- and shard_map-safe, with static shapes; the sharded
dataset-level evaluation (`evaluate.Evaluator`) and the prediction of a folder
(`segment.make_predictor`) compose them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from pixcon_jax import precision as precision_lib
from pixcon_jax.models import layers

# Named protocols for `config.eval.protocol`. None/'' means: use the explicit keys.
PROTOCOLS: dict[str, dict[str, Any]] = {
    # One pass at the original size.
    "single": dict(scales=(1.0,), flip=False),
    # Paper Sec. 4.1 "Testing": scales 0.75 to 2.0 step 0.25, with flipping.
    "paper": dict(scales=(0.75, 1.0, 1.25, 1.5, 1.75, 2.0), flip=True),
    # Official H_48_D_4_TEST.json: `ms_test`, scale_search 0.5 to 2.0 step 0.25, flipping.
    "official": dict(scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0), flip=True),
}

EVAL_MODES = ("whole", "slide")  # config.eval.mode
AGGREGATES = ("logits", "softmax")  # config.eval.aggregate: what multi-scale passes sum

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
    if self.mode not in EVAL_MODES:
      raise ValueError(f"config.eval.mode must be one of {EVAL_MODES}, got {self.mode!r}")
    if self.aggregate not in AGGREGATES:
      raise ValueError(f"config.eval.aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")
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
  if scale == 1.0:  # also where height / width are symbolic (jax.export)
    x = image
  else:
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
