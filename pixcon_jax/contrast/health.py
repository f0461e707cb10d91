"""Class structure of the pixel embedding: is the contrast separating classes, or collapsing them?

A contrastive loss that matches the paper's value can still drive every embedding to one point
(then each anchor's loss is log(1 + K-), whatever the labels). These statistics make that
visible in every run's metrics, cheaply: they need only per-class sums of the unit embeddings,
S_c = sum_{i in c} e_i and n_c = |c|, so no pixel-by-pixel similarity matrix is formed:

- `same_class_cos`: mean cosine over pairs of distinct pixels of one class,
  sum_c (|S_c|^2 - n_c) / sum_c n_c (n_c - 1).
- `diff_class_cos`: mean cosine over pairs of pixels of different classes,
  (|S|^2 - sum_c |S_c|^2) / (N^2 - sum_c n_c^2), S = sum_c S_c, N = sum_c n_c.
- `gap`: same_class_cos - diff_class_cos (about 0 when collapsed, larger when separated).
- `class_mean_cos`: mean cosine between the mean embeddings of two different classes present.
- `mean_length`: |S| / N, the length of the mean unit embedding (1 = every pixel on one point).

`CollapseAlarm` watches the logged `gap` of a run and says once when it stays below a threshold.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
from jax import lax


def class_sums(embedding: jax.Array, label: jax.Array, num_classes: int
               ) -> tuple[jax.Array, jax.Array]:
  """Per-class sums of unit embeddings.

  Args:
    embedding: [B, h, w, D] L2-normalised embeddings (any float dtype).
    label: [B, h, w] int class ids on the embedding grid; ids outside [0, C) are ignored.
    num_classes: C.
  Returns:
    sums [C, D] float32, counts [C] float32.
  """
  e = lax.stop_gradient(embedding).astype(jnp.float32).reshape(-1, embedding.shape[-1])
  lab = label.reshape(-1)
  onehot = jax.nn.one_hot(jnp.where((lab >= 0) & (lab < num_classes), lab, -1), num_classes,
                          dtype=jnp.float32)  # [P, C]; an ignored pixel is an all-zero row
  return onehot.T @ e, jnp.sum(onehot, axis=0)


def health_from_sums(sums: jax.Array, counts: jax.Array) -> dict[str, jax.Array]:
  """The statistics of the module docstring from `class_sums` (summed over devices if sharded).

  Args:
    sums: [C, D] float32 per-class sums of unit embeddings.
    counts: [C] float32 pixels per class.
  Returns:
    dict of float32 scalars: same_class_cos, diff_class_cos, gap, class_mean_cos, mean_length.
  """
  sq = jnp.sum(sums * sums, axis=-1)  # [C] |S_c|^2
  total = jnp.sum(sums, axis=0)  # [D]
  n = jnp.sum(counts)
  same = jnp.sum(sq - counts) / jnp.maximum(jnp.sum(counts * (counts - 1.0)), 1.0)
  diff = (jnp.sum(total * total) - jnp.sum(sq)) / jnp.maximum(n * n - jnp.sum(counts ** 2), 1.0)
  present = counts > 0
  means = sums / jnp.maximum(jnp.sqrt(sq), 1e-12)[:, None]
  pair = present[:, None] & present[None, :] & ~jnp.eye(counts.shape[0], dtype=bool)
  cos = jnp.where(pair, means @ means.T, 0.0)
  class_mean_cos = jnp.sum(cos) / jnp.maximum(jnp.sum(pair), 1)
  return dict(same_class_cos=same, diff_class_cos=diff, gap=same - diff,
              class_mean_cos=class_mean_cos,
              mean_length=jnp.sqrt(jnp.sum(total * total)) / jnp.maximum(n, 1.0))


def embedding_health(embedding: jax.Array, label: jax.Array, *, num_classes: int,
                     axis_name: str | None = None) -> dict[str, jax.Array]:
  """Class-structure statistics of a (possibly sharded) batch of embeddings.

  Args:
    embedding: [B, h, w, D] L2-normalised embeddings (this device's share inside shard_map).
    label: [B, h, w] class ids on the embedding grid (255 / out of range = ignored).
    num_classes: C.
    axis_name: mesh axis to sum the per-class sums over (the global batch), or None.
  Returns:
    see `health_from_sums`; identical on every device.
  """
  sums, counts = class_sums(embedding, label, num_classes)
  if axis_name is not None:
    sums, counts = lax.psum((sums, counts), axis_name)
  return health_from_sums(sums, counts)


COLLAPSE_DOCS = 'docs/ABLATIONS.md, "When the embedding collapses"'


@dataclasses.dataclass
class CollapseAlarm:
  """Raises one warning when the embedding gap stays low for several logged steps.

  Fed the logged train metrics (`update`), it counts consecutive logged steps at or after the
  contrast warm-up whose `embedding/gap` is below `threshold`; when the count reaches `patience`
  it returns one warning line (once per run), with the same- and different-class cosines and the
  docs section to read. `flag` (1.0 from then on while the gap stays low, else 0.0) is the
  TensorBoard flag the train loop writes.

  Attributes:
    threshold: gap below which a logged step counts (config `log.collapse_gap`).
    patience: consecutive low logged steps that raise the alarm (`log.collapse_patience`).
    start_step: first step that counts (the contrast's `warmup_steps`).
  """
  threshold: float
  patience: int
  start_step: int = 0
  below: int = 0
  fired: bool = False

  def update(self, step: int, metrics: Mapping[str, float], prefix: str = "train/embedding/"
             ) -> str | None:
    """Counts one logged step; returns the warning line the first time the alarm goes off."""
    gap = metrics.get(prefix + "gap")
    if gap is None or step < self.start_step or self.patience < 1:
      return None
    self.below = self.below + 1 if gap < self.threshold else 0
    if self.below < self.patience or self.fired:
      return None
    self.fired = True
    same = metrics.get(prefix + "same_class_cos", float("nan"))
    diff = metrics.get(prefix + "diff_class_cos", float("nan"))
    return (f"embedding collapse: {prefix}gap = {gap:.3f} has stayed below {self.threshold} for "
            f"{self.below} logged steps (same-class cosine {same:.3f}, different-class cosine "
            f"{diff:.3f}); the contrast is no longer separating the classes, see "
            f"{COLLAPSE_DOCS}")

  @property
  def flag(self) -> float:
    return float(self.below >= self.patience)
