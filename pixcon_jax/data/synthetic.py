"""Synthetic street scenes: a procedural, download-free dataset for the demo and the tests.

Each example is rendered from `np.random.default_rng([seed, split_salt, index, stream])`, so it is a pure
function of (seed, split, index, size) and can be produced at any resolution: the scene is laid out
in normalised coordinates and textures have a fixed period relative to the image height.

What decides a class is texture, shape and context, not colour alone: colours are drawn per image
from overlapping ranges (grey cars on grey roads, brown trees before brown buildings, overcast grey
skies), while every class has a distinctive structure:

  sky         top of the image, smooth vertical gradient + soft clouds
  building    rectangles on the horizon with a regular grid of windows and floor lines
  vegetation  blob-shaped crowns with strong high-frequency speckle, on a trunk
  road        perspective trapezoid at the bottom, fine grain, dashed centre line
  sidewalk    strips along the road edges with a tile grid
  car         box body + cabin with dark windows + two black wheels, on the road
  person      head + torso + two legs, on the sidewalk
  pole        thin vertical bar from the sidewalk to above the horizon, with a small plate

Objects are painted back to front (by their foot point), so occlusions follow the perspective.
"""
from __future__ import annotations

import zlib

import numpy as np

from pixcon_jax.data import classes

CLASS_NAMES = ("road", "sidewalk", "building", "vegetation", "sky", "car", "person", "pole")
ROAD, SIDEWALK, BUILDING, VEGETATION, SKY, CAR, PERSON, POLE = range(8)
_COLORS = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (107, 142, 35), (70, 130, 180),
           (0, 0, 142), (220, 20, 60), (153, 153, 153))
CLASS_TABLE = tuple(classes.ClassEntry(i, i, n, c, False)
                    for i, (n, c) in enumerate(zip(CLASS_NAMES, _COLORS)))
DEFAULT_SIZE = (256, 512)
DEFAULT_NUM_TRAIN = 2000
DEFAULT_NUM_VAL = 100


def _split_salt(split: str) -> int:
  return zlib.crc32(split.encode())


class _Canvas:
  """An image + label under construction, with helpers that paint masks in bounding boxes."""

  def __init__(self, h: int, w: int, rng: np.random.Generator, noise: np.random.Generator):
    # Layout draws and per-pixel noise use separate streams, so the scene does not depend on the
    # resolution (the noise stream consumes H*W values per draw).
    self.h, self.w, self.rng, self.noise = h, w, rng, noise
    self.image = np.zeros((h, w, 3), np.float32)
    self.label = np.zeros((h, w), np.uint8)
    # Pixel-centre coordinates normalised by the height (x by the height too: isotropic shapes).
    self.ys = (np.arange(h, dtype=np.float32) + 0.5) / h
    self.xs = (np.arange(w, dtype=np.float32) + 0.5) / h
    self.aspect = w / h

  def box(self, y0: float, y1: float, x0: float, x1: float):
    """Integer slices of the normalised box (x in units of height), clipped; None if empty."""
    r0, r1 = max(0, int(np.floor(y0 * self.h))), min(self.h, int(np.ceil(y1 * self.h)))
    c0, c1 = max(0, int(np.floor(x0 * self.h))), min(self.w, int(np.ceil(x1 * self.h)))
    if r0 >= r1 or c0 >= c1:
      return None
    return slice(r0, r1), slice(c0, c1)

  def paint(self, sl, mask: np.ndarray, color: np.ndarray, cls: int) -> None:
    """Paints `color` ([3] or [h, w, 3]) and class `cls` where `mask` ([h, w] bool) holds."""
    img, lab = self.image[sl], self.label[sl]
    if color.ndim == 1:
      img[mask] = color
    else:
      img[mask] = color[mask]
    lab[mask] = cls


def _noise(rng: np.random.Generator, shape, scale: float) -> np.ndarray:
  return rng.standard_normal(shape, dtype=np.float32) * scale


def _smooth_field(cv: _Canvas, ys: np.ndarray, xs: np.ndarray, n: int, freq: float) -> np.ndarray:
  """Sum of `n` random low-frequency sinusoids in [-1, 1], evaluated on the grid (ys x xs)."""
  out = np.zeros((len(ys), len(xs)), np.float32)
  for _ in range(n):
    fy, fx = cv.rng.uniform(-freq, freq, size=2)
    ph = cv.rng.uniform(0, 2 * np.pi)
    out += np.sin(2 * np.pi * (fy * ys[:, None] + fx * xs[None, :]) + ph)
  return out / n


def _draw_background(cv: _Canvas, horizon: float, vx: float, road_l: float, road_r: float,
                     walk: float) -> None:
  """Sky, facade zone, road and sidewalks (everything below the horizon is ground or facade)."""
  rng, ys, xs = cv.rng, cv.ys, cv.xs
  # Sky: blue or overcast grey, brighter towards the horizon, soft clouds; nearly noise-free.
  overcast = rng.random() < 0.35
  top = np.array([150, 155, 160] if overcast else [60, 110, 200], np.float32) + rng.uniform(-20, 20, 3)
  bottom = top + rng.uniform(30, 60)
  t = np.clip(ys / max(horizon, 1e-3), 0, 1)[:, None, None]
  sky = top * (1 - t) + bottom * t + 25 * _smooth_field(cv, ys, xs, 3, 2.0)[..., None]
  cv.image[:] = sky
  cv.label[:] = SKY
  # Ground: below the horizon, x positions of the road / sidewalk edges converge to (vx, horizon).
  r0 = min(cv.h - 1, int(horizon * cv.h))
  gy = ys[r0:, None]
  depth = np.clip((gy - horizon) / (1 - horizon), 0, 1)  # 0 at the horizon, 1 at the bottom.
  left = vx - road_l * depth
  right = vx + road_r * depth
  wl = left - walk * depth
  wr = right + walk * depth
  x = xs[None, :]
  road = (x >= left) & (x <= right)
  walk_mask = ((x >= wl) & (x < left)) | ((x > right) & (x <= wr))
  sl = (slice(r0, cv.h), slice(0, cv.w))
  shape = road.shape
  # Road: dark to mid grey, fine grain and a dashed centre line (still road).
  base = rng.uniform(55, 120)
  road_col = np.full(shape + (3,), base, np.float32) + rng.uniform(-8, 8, 3)
  road_col += _noise(cv.noise, shape, 9)[..., None]
  dash = (np.abs(x - vx) < 0.006 * (0.2 + depth)) & (np.sin(2 * np.pi * 6 / (depth + 0.15)) > 0.2)
  road_col[dash] = 225
  cv.paint(sl, road, road_col, ROAD)
  # Sidewalk: light grey / beige / reddish tiles with darker joints (perspective tile grid).
  wb = rng.uniform(110, 190)
  walk_col = np.full(shape + (3,), wb, np.float32) + rng.uniform(-25, 25, 3)
  u = (x - vx) / np.maximum(depth, 0.02) * 3.0
  v = 1.5 / (depth + 0.08)
  joints = (np.abs(np.sin(np.pi * u)) < 0.18) | (np.abs(np.sin(np.pi * v)) < 0.2)
  walk_col[joints] *= 0.6
  walk_col += _noise(cv.noise, shape, 4)[..., None]
  cv.paint(sl, walk_mask, walk_col, SIDEWALK)
  # Beyond the sidewalks the facades continue down to the ground (painted by the buildings).
  cv._facade_bottom = (wl, wr, r0)  # pylint: disable=protected-access


def _draw_buildings(cv: _Canvas, horizon: float) -> None:
  """Facades along the street: window grids and floor lines, tops at random heights."""
  rng = cv.rng
  wl, wr, r0 = cv._facade_bottom  # pylint: disable=protected-access
  x = 0.0
  while x < cv.aspect:
    bw = rng.uniform(0.12, 0.45)
    if rng.random() < 0.2:  # A gap showing the sky.
      x += bw * 0.5
      continue
    top = rng.uniform(0.03, horizon - 0.06)
    sl = cv.box(top, 1.0, x, x + bw)
    x += bw
    if sl is None:
      continue
    ys, xs = cv.ys[sl[0]], cv.xs[sl[1]]
    # The facade reaches the ground only outside the sidewalks.
    ground_rows = np.arange(sl[0].start, sl[0].stop) >= r0
    outside = np.ones((len(ys), len(xs)), bool)
    if ground_rows.any():
      g = np.arange(sl[0].start, sl[0].stop)[ground_rows] - r0
      outside[ground_rows] = (xs[None, :] < wl[g]) | (xs[None, :] > wr[g])
    mask = outside
    wall = rng.choice([[120, 120, 125], [150, 110, 80], [175, 160, 130], [100, 70, 60],
                       [90, 95, 110]]).astype(np.float32) + rng.uniform(-25, 25, 3)
    col = np.broadcast_to(wall, mask.shape + (3,)).copy()
    # Regular window grid (dark glass), period fixed per building; floor lines.
    py, px = rng.uniform(0.035, 0.07), rng.uniform(0.03, 0.06)
    fy = ((ys[:, None] - top) / py) % 1.0
    fx = ((xs[None, :] - sl[1].start / cv.h) / px) % 1.0
    win = (fy > 0.3) & (fy < 0.8) & (fx > 0.25) & (fx < 0.75)
    glass = np.array([40, 50, 70], np.float32) + rng.uniform(-15, 25, 3)
    col[win] = glass
    col[np.broadcast_to(fy < 0.08, mask.shape)] *= 0.75
    col += _noise(cv.noise, mask.shape, 5)[..., None]
    cv.paint(sl, mask, col, BUILDING)


def _draw_tree(cv: _Canvas, foot_y: float, foot_x: float, s: float) -> None:
  rng = cv.rng
  trunk = cv.box(foot_y - 0.5 * s, foot_y, foot_x - 0.03 * s, foot_x + 0.03 * s)
  if trunk is not None:
    m = np.ones((trunk[0].stop - trunk[0].start, trunk[1].stop - trunk[1].start), bool)
    col = np.array([70, 50, 35], np.float32) + _noise(cv.noise, m.shape + (3,), 12)
    cv.paint(trunk, m, col, VEGETATION)
  cy, cx, r = foot_y - 0.75 * s, foot_x, 0.35 * s
  sl = cv.box(cy - 1.3 * r, cy + 1.3 * r, cx - 1.5 * r, cx + 1.5 * r)
  if sl is None:
    return
  ys, xs = cv.ys[sl[0]][:, None], cv.xs[sl[1]][None, :]
  mask = np.zeros((len(cv.ys[sl[0]]), len(cv.xs[sl[1]])), bool)
  for _ in range(5):  # A crown of overlapping discs.
    oy, ox = rng.uniform(-0.5, 0.5, 2) * r
    rr = rng.uniform(0.5, 0.8) * r
    mask |= (ys - cy - oy) ** 2 + (xs - cx - ox) ** 2 < rr ** 2
  green = rng.random() < 0.7
  base = (np.array([60, 120, 40], np.float32) if green else np.array([140, 100, 50], np.float32))
  base = base + rng.uniform(-20, 20, 3)
  # Strong speckle (leaves): the texture, not the hue, marks vegetation.
  speck = _noise(cv.noise, mask.shape, 1.0)
  col = base * (1 + 0.35 * np.clip(speck, -2, 2))[..., None]
  cv.paint(sl, mask, col, VEGETATION)


def _draw_car(cv: _Canvas, foot_y: float, foot_x: float, s: float) -> None:
  rng = cv.rng
  w, hb = 0.9 * s, 0.28 * s
  body = rng.uniform(20, 235, 3).astype(np.float32)
  if rng.random() < 0.3:  # Grey cars exist too: colour alone cannot separate car from road.
    body[:] = rng.uniform(60, 140)
  x0 = foot_x - w / 2
  sl = cv.box(foot_y - 0.55 * s, foot_y, x0, x0 + w)
  if sl is None:
    return
  ys, xs = cv.ys[sl[0]][:, None], cv.xs[sl[1]][None, :]
  yb = foot_y - 0.08 * s
  lower = (ys >= yb - hb) & (ys < yb) & (xs >= x0) & (xs <= x0 + w)
  ctop = yb - hb - 0.18 * s
  cab_l = x0 + 0.2 * w + (ys - ctop) * -0.5
  cab_r = x0 + 0.8 * w - (ys - ctop) * -0.5
  cabin = (ys >= ctop) & (ys < yb - hb) & (xs >= cab_l) & (xs <= cab_r)
  wr = 0.09 * s
  wheels = np.zeros_like(lower)
  for wx in (x0 + 0.2 * w, x0 + 0.8 * w):
    wheels |= (ys - (foot_y - wr)) ** 2 + (xs - wx) ** 2 < wr ** 2
  mask = lower | cabin | wheels
  col = np.broadcast_to(body, mask.shape + (3,)).copy()
  win = cabin & (ys > ctop + 0.03 * s) & (xs > cab_l + 0.03 * s) & (xs < cab_r - 0.03 * s)
  col[win] = np.array([30, 40, 55], np.float32)
  col[wheels] = 20
  col[np.broadcast_to((ys > yb - 0.35 * hb) & (ys < yb - 0.25 * hb), mask.shape)] *= 0.5  # Trim.
  col += _noise(cv.noise, mask.shape, 4)[..., None]
  cv.paint(sl, mask, col, CAR)


def _draw_person(cv: _Canvas, foot_y: float, foot_x: float, s: float) -> None:
  rng = cv.rng
  h = 0.9 * s
  sl = cv.box(foot_y - h, foot_y, foot_x - 0.15 * s, foot_x + 0.15 * s)
  if sl is None:
    return
  ys, xs = cv.ys[sl[0]][:, None], cv.xs[sl[1]][None, :]
  hr = 0.08 * s
  head = (ys - (foot_y - h + hr)) ** 2 + (xs - foot_x) ** 2 < hr ** 2
  torso = (ys > foot_y - h + 2 * hr) & (ys < foot_y - 0.45 * h) & (np.abs(xs - foot_x) < 0.12 * s)
  legs = (ys >= foot_y - 0.45 * h) & (np.abs(np.abs(xs - foot_x) - 0.055 * s) < 0.035 * s)
  mask = head | torso | legs
  col = np.zeros(mask.shape + (3,), np.float32)
  col[torso] = rng.uniform(20, 235, 3)
  col[legs] = rng.uniform(20, 120, 3)
  col[head] = np.array([210, 160, 130], np.float32) * rng.uniform(0.5, 1.05)
  col += _noise(cv.noise, mask.shape, 4)[..., None]
  cv.paint(sl, mask, col, PERSON)


def _draw_pole(cv: _Canvas, foot_y: float, foot_x: float, s: float, horizon: float) -> None:
  rng = cv.rng
  top = min(horizon - 0.1, foot_y - 1.4 * s)
  hw = max(0.025 * s, 1.0 / cv.h)
  sl = cv.box(top, foot_y, foot_x - 0.06 * s, foot_x + 0.06 * s)
  if sl is None:
    return
  ys, xs = cv.ys[sl[0]][:, None], cv.xs[sl[1]][None, :]
  bar = np.abs(xs - foot_x) < hw
  plate = (ys > top) & (ys < top + 0.08 * s) & (np.abs(xs - foot_x) < 0.05 * s)
  mask = np.broadcast_to(bar, (len(cv.ys[sl[0]]), bar.shape[1])) | plate
  col = np.zeros(mask.shape + (3,), np.float32)
  col[:] = rng.uniform(60, 160)
  col[plate] = rng.uniform(40, 220, 3)
  # Metallic shading across the bar: bright edge, dark edge.
  col *= (1 + 0.4 * np.clip((xs - foot_x) / hw, -1, 1))[..., None]
  cv.paint(sl, mask, col, POLE)


def render(seed: int, index: int, size: tuple[int, int] = DEFAULT_SIZE, split: str = "train"
           ) -> tuple[np.ndarray, np.ndarray]:
  """Renders one scene.

  Args:
    seed: dataset seed.
    index: example index in its split.
    size: (H, W) of the output.
    split: split name (different splits give different scenes).

  Returns:
    image [H, W, 3] uint8 RGB and label [H, W] uint8 with train ids 0..7 (no ignore).
  """
  h, w = size
  rng = np.random.default_rng([seed, _split_salt(split), index, 0])
  cv = _Canvas(h, w, rng, np.random.default_rng([seed, _split_salt(split), index, 1]))
  horizon = rng.uniform(0.35, 0.5)
  vx = rng.uniform(0.35, 0.65) * cv.aspect
  road_l, road_r = rng.uniform(0.35, 0.8, 2) * cv.aspect
  walk = rng.uniform(0.15, 0.35) * cv.aspect
  _draw_background(cv, horizon, vx, road_l, road_r, walk)
  _draw_buildings(cv, horizon)
  # Objects with foot points; the size s grows with the distance below the horizon (perspective).
  objects = []
  for _ in range(rng.integers(1, 6)):
    d = rng.uniform(0.15, 1.0)
    side = rng.uniform(-0.8, 0.8)
    fy = horizon + d * (1 - horizon)
    fx = vx + side * (road_r if side > 0 else road_l) * d
    objects.append((fy, "car", fx, 0.6 * d))
  for kind, n in (("person", rng.integers(1, 6)), ("pole", rng.integers(1, 4)),
                  ("tree", rng.integers(1, 5))):
    for _ in range(n):
      d = rng.uniform(0.2, 1.0)
      fy = horizon + d * (1 - horizon)
      left = rng.random() < 0.5
      u = rng.uniform(0.2, 0.9)
      fx = (vx - (road_l + u * walk) * d) if left else (vx + (road_r + u * walk) * d)
      objects.append((fy, kind, fx, 0.6 * d))
  for fy, kind, fx, s in sorted(objects, key=lambda o: o[0]):
    if kind == "car":
      _draw_car(cv, fy, fx, s)
    elif kind == "person":
      _draw_person(cv, fy, fx, s)
    elif kind == "pole":
      _draw_pole(cv, fy, fx, s, horizon)
    else:
      _draw_tree(cv, fy, fx, s)
  # Moderate sensor noise and a global exposure change.
  img = cv.image * rng.uniform(0.85, 1.15) + _noise(cv.noise, (h, w, 1), 4.0)
  return np.clip(img, 0, 255).astype(np.uint8), cv.label


class SyntheticSource:
  """grain RandomAccessDataSource of synthetic scenes (`len` and `__getitem__`, picklable).

  Records are dicts: `image` [H, W, 3] uint8, `label` [H, W] uint8 train ids, `image_id` int32.
  """

  def __init__(self, num_examples: int, *, seed: int = 0, size: tuple[int, int] = DEFAULT_SIZE,
               split: str = "train"):
    self._n, self._seed, self._size, self._split = int(num_examples), int(seed), tuple(size), split

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < self._n:
      raise IndexError(f"synthetic {self._split}: index {index} out of range [0, {self._n})")
    image, label = render(self._seed, index, self._size, self._split)
    return {"image": image, "label": label, "image_id": np.int32(index)}

  def __repr__(self) -> str:
    return (f"SyntheticSource(split={self._split!r}, n={self._n}, seed={self._seed}, "
            f"size={self._size})")
