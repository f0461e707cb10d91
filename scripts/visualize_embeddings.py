r"""Figure 4 of the paper: pixel embeddings of a checkpoint projected to 2-D, coloured by class.

    python scripts/visualize_embeddings.py --config=configs/cityscapes_hrnet.py \
        --workdir=/path/to/run [--per_class=100 --num_batches=4 --method=tsne]

Weights: the latest checkpoint in the workdir, else `config.init_from` (as the eval mode).
Pixels are sampled from the evaluation split: the model's `embedding` output (the
L2-normalised projection, [B, h, w, D]; `--feature_key` picks another output, e.g.
`features` for a model without projection head: the backbone maps resized to the finest
one and concatenated, or `logits`), labels
brought to the embedding grid with the loss's legacy-nearest rule, at most `--per_class`
valid pixels per class. The 2-D projection is a small exact t-SNE in numpy (no sklearn /
umap dependency) or PCA (`--method=pca`). The scatter plot is drawn with PIL, saved as a
PNG (default `<workdir>/embeddings_<method>.png`) and logged to TensorBoard as
`embeddings/<method>`.

Printed as JSON (and logged as scalars), computed on the L2-normalised D-dimensional
embeddings, so a CE-only and a contrast model can be compared:
  intra_class_distance     mean Euclidean distance of a pixel to its class mean (lower = more compact)
  intra_class_cosine       mean cosine between a pixel and its class mean direction (higher = more compact)
  inter_class_distance     mean distance between class means (higher = more separated)
  min_inter_class_distance the closest pair of class means
  separation_ratio         inter_class_distance / intra_class_distance (higher = better)
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

import numpy as np
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
from PIL import Image, ImageDraw

from pixcon_jax import cli
from pixcon_jax import validation


# ------------------------------------------------------------------------------------------
# Projections.

def pca(x: np.ndarray, dim: int = 2) -> np.ndarray:
  """[N, D] -> [N, dim] principal components."""
  x = np.asarray(x, np.float64)
  x = x - x.mean(0)
  _, _, vt = np.linalg.svd(x, full_matrices=False)
  return x @ vt[:dim].T


def _squared_distances(x: np.ndarray) -> np.ndarray:
  s = np.sum(x * x, axis=1)
  return np.maximum(s[:, None] + s[None, :] - 2.0 * x @ x.T, 0.0)


def _affinities(x: np.ndarray, perplexity: float, tol: float = 1e-5, steps: int = 64) -> np.ndarray:
  """Symmetrised t-SNE input affinities P [N, N]; per-row precision by bisection on entropy."""
  n = x.shape[0]
  d = _squared_distances(x)
  target = np.log(perplexity)
  p = np.zeros((n, n))
  beta = np.ones(n)
  lo, hi = np.full(n, -np.inf), np.full(n, np.inf)
  mask = ~np.eye(n, dtype=bool)
  # All rows are bisected together (vectorised), each on its own bracket.
  for _ in range(steps):
    logits = -d * beta[:, None]
    logits[~mask] = -np.inf
    logits -= logits.max(1, keepdims=True)
    e = np.exp(logits)
    z = e.sum(1, keepdims=True)
    p = e / z
    entropy = -np.sum(np.where(p > 0, p * np.log(np.maximum(p, 1e-300)), 0.0), axis=1)
    diff = entropy - target
    if np.all(np.abs(diff) < tol):
      break
    up = diff > 0  # entropy too high -> sharpen (raise beta)
    lo = np.where(up, beta, lo)
    hi = np.where(up, hi, beta)
    beta = np.where(up, np.where(np.isinf(hi), beta * 2, (beta + hi) / 2),
                    np.where(np.isinf(lo), beta / 2, (beta + lo) / 2))
  p = (p + p.T) / (2.0 * n)
  return np.maximum(p, 1e-12)


def tsne(x: np.ndarray, dim: int = 2, *, perplexity: float = 30.0, iters: int = 500,
         learning_rate: float = 200.0, exaggeration: float = 12.0, exaggeration_iters: int = 100,
         seed: int = 0) -> np.ndarray:
  """Exact t-SNE (van der Maaten & Hinton 2008) with gains and momentum, O(N^2) memory.

  Args:
    x: [N, D] points (N up to a few thousand).
  Returns:
    [N, dim] embedding, centred.
  """
  x = np.asarray(x, np.float64)
  n = x.shape[0]
  perplexity = min(perplexity, max(2.0, (n - 1) / 3.0))
  p = _affinities(pca(x, min(50, x.shape[1], n)) if x.shape[1] > 50 else x, perplexity)
  rng = np.random.default_rng(seed)
  y = rng.normal(0.0, 1e-4, (n, dim))
  velocity = np.zeros_like(y)
  gains = np.ones_like(y)
  for it in range(iters):
    num = 1.0 / (1.0 + _squared_distances(y))
    np.fill_diagonal(num, 0.0)
    q = np.maximum(num / num.sum(), 1e-12)
    scale = exaggeration if it < exaggeration_iters else 1.0
    w = (scale * p - q) * num
    grad = 4.0 * (np.diag(w.sum(1)) - w) @ y
    momentum = 0.5 if it < 250 else 0.8
    gains = np.where(np.sign(grad) != np.sign(velocity), gains + 0.2, gains * 0.8)
    gains = np.maximum(gains, 0.01)
    velocity = momentum * velocity - learning_rate * gains * grad
    y = y + velocity
    y = y - y.mean(0)
  return y


# ------------------------------------------------------------------------------------------
# Numbers and drawing.

def cluster_statistics(emb: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """Compactness / separation of L2-normalised embeddings [N, D] with class labels [N]."""
  emb = np.asarray(emb, np.float64)
  emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
  classes = np.unique(labels)
  means, intra_d, intra_c = [], [], []
  for c in classes:
    e = emb[labels == c]
    m = e.mean(0)
    means.append(m)
    intra_d.append(np.linalg.norm(e - m, axis=1).mean())
    intra_c.append((e @ (m / max(np.linalg.norm(m), 1e-12))).mean())
  means = np.stack(means)
  out = {"num_points": float(len(labels)), "num_classes": float(len(classes)),
         "intra_class_distance": float(np.mean(intra_d)),
         "intra_class_cosine": float(np.mean(intra_c))}
  if len(classes) > 1:
    dist = np.sqrt(_squared_distances(means))
    pair = dist[np.triu_indices(len(classes), 1)]
    out["inter_class_distance"] = float(pair.mean())
    out["min_inter_class_distance"] = float(pair.min())
    out["separation_ratio"] = float(pair.mean() / max(np.mean(intra_d), 1e-12))
  return out


def render(points: np.ndarray, labels: np.ndarray, palette: np.ndarray, names: Sequence[str], *,
           size: int = 800, radius: int = 3, title: str = "") -> np.ndarray:
  """Scatter plot [size, size + legend, 3] uint8: points coloured by class, legend on the right."""
  legend_w = 180
  img = Image.new("RGB", (size + legend_w, size), (255, 255, 255))
  draw = ImageDraw.Draw(img)
  pts = np.asarray(points, np.float64)
  lo, hi = pts.min(0), pts.max(0)
  margin = 20
  span = np.maximum(hi - lo, 1e-9)
  xy = margin + (pts - lo) / span * (size - 2 * margin)
  order = np.random.default_rng(0).permutation(len(pts))  # no class painted last on top
  for i in order:
    x, y = xy[i]
    col = tuple(int(v) for v in palette[int(labels[i])])
    draw.ellipse([x - radius, size - y - radius, x + radius, size - y + radius], fill=col)
  if title:
    draw.text((margin, 4), title, fill=(0, 0, 0))
  present = sorted(set(int(l) for l in labels))
  for row, c in enumerate(present):
    y0 = margin + 16 * row
    draw.rectangle([size + 10, y0, size + 22, y0 + 12], fill=tuple(int(v) for v in palette[c]))
    draw.text((size + 28, y0), str(names[c]), fill=(0, 0, 0))
  return np.asarray(img)


# ------------------------------------------------------------------------------------------
# Sampling from a checkpoint.

def sample_embeddings(config: Any, workdir: str, *, num_batches: int, per_class: int,
                      feature_key: str = "embedding", seed: int = 0
                      ) -> tuple[np.ndarray, np.ndarray, Any, str, int]:
  """(embeddings [N, D], labels [N], dataset info, weights source, step) from the eval split."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from pixcon_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from pixcon_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from pixcon_jax import setup  # pylint: disable=g-import-not-at-top
  from pixcon_jax.contrast import labels as labels_lib  # pylint: disable=g-import-not-at-top
  exp = setup.for_inference(config)
  variables, source, step = checkpointing.load_variables(config, workdir, model=exp.eval_model,
                                                         mesh=exp.mesh)
  local = jax.tree.map(lambda x: x.addressable_data(0), variables)

  @jax.jit
  def features(v, image):
    out = exp.eval_model.apply(v, image, train=False)
    if feature_key not in out:
      raise validation.ConfigError(
          f"--feature_key={feature_key}: model {config.model.name!r} has no such output "
          f"(outputs: {sorted(out)}); use a *_contrast model or another --feature_key")
    feat = out[feature_key]
    if isinstance(feat, (list, tuple)):
      # Backbone outputs (`features`, e.g. of a CE-only model without projection head): the
      # maps resized to the finest one and concatenated, as HRNet's head input is built.
      from pixcon_jax.models import layers  # pylint: disable=g-import-not-at-top
      size = max((f.shape[1:3] for f in feat), key=lambda s: s[0] * s[1])
      feat = jnp.concatenate([layers.resize_bilinear(f, size) for f in feat], axis=-1)
    return feat

  batches = data_lib.make_eval_iterator(
      config.data, config.augment, batch_size_per_process=config.data.eval_batch_size,
      process_index=0, process_count=1)
  embs, labs = [], []
  for i, batch in enumerate(batches):
    if i >= num_batches:
      break
    emb = np.asarray(features(local, np.asarray(batch["image"], np.float32)))
    lab = np.asarray(labels_lib.downsample_labels(np.asarray(batch["label"]), emb.shape[1:3]))
    valid = np.asarray(batch.get("valid", np.ones(len(lab), bool)), bool)
    keep = valid[:, None, None] & (lab >= 0) & (lab < config.model.num_classes)
    embs.append(emb[keep])
    labs.append(lab[keep])
  if not embs or not sum(len(l) for l in labs):
    raise ValueError("no labelled pixel in the sampled evaluation batches")
  emb, lab = np.concatenate(embs), np.concatenate(labs)
  rng = np.random.default_rng(seed)
  pick = []
  for c in np.unique(lab):
    idx = np.flatnonzero(lab == c)
    pick.append(rng.choice(idx, size=min(per_class, len(idx)), replace=False))
  pick = np.sort(np.concatenate(pick))
  return emb[pick], lab[pick], exp.info, source, step


def run(config: Any, workdir: str, *, num_batches: int = 4, per_class: int = 100,
        method: str = "tsne", perplexity: float = 30.0, iters: int = 500,
        output: str | None = None, feature_key: str = "embedding", seed: int = 0
        ) -> dict[str, Any]:
  """Samples, projects, draws, logs; returns {"png": path, "statistics": {...}, ...}."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  emb, lab, info, source, step = sample_embeddings(
      config, workdir, num_batches=num_batches, per_class=per_class, feature_key=feature_key,
      seed=seed)
  stats = cluster_statistics(emb, lab)
  if method == "tsne":
    points = tsne(emb, perplexity=perplexity, iters=iters, seed=seed)
  elif method == "pca":
    points = pca(emb)
  else:
    raise validation.ConfigError(f"--method must be 'tsne' or 'pca', got {method!r}")
  image = render(points, lab, np.asarray(info.palette), info.class_names,
                 title=f"{config.model.name} | {feature_key} | {method} | {source}")
  output = output or os.path.join(workdir, f"embeddings_{method}.png")
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  Image.fromarray(image).save(output)
  writer = metric_writers.create_default_writer(workdir, asynchronous=False)
  writer.write_images(step, {f"embeddings/{method}": image[None]})
  writer.write_scalars(step, {f"embeddings/{k}": v for k, v in stats.items()})
  writer.flush()
  writer.close()
  return {"png": output, "weights": source, "feature_key": feature_key, "method": method,
          "statistics": stats}


FLAGS = flags.FLAGS


def _define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Experiment config (`path.py[:arg]`).",
                                  lock_config=False)
  flags.DEFINE_string("workdir", None, "Run directory holding the checkpoint (output default).")
  flags.DEFINE_integer("num_batches", 4, "Evaluation batches to sample pixels from.")
  flags.DEFINE_integer("per_class", 100, "Pixels sampled per class.")
  flags.DEFINE_enum("method", "tsne", ["tsne", "pca"], "2-D projection.")
  flags.DEFINE_float("perplexity", 30.0, "t-SNE perplexity.")
  flags.DEFINE_integer("iters", 500, "t-SNE iterations.")
  flags.DEFINE_string("output", None, "PNG path (default <workdir>/embeddings_<method>.png).")
  flags.DEFINE_string("feature_key", "embedding", "Model output to project.")
  flags.DEFINE_integer("seed", 0, "Sampling / t-SNE seed.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  result = run(FLAGS.config, FLAGS.workdir, num_batches=FLAGS.num_batches,
               per_class=FLAGS.per_class, method=FLAGS.method, perplexity=FLAGS.perplexity,
               iters=FLAGS.iters, output=FLAGS.output, feature_key=FLAGS.feature_key,
               seed=FLAGS.seed)
  logging.info("wrote %s", result["png"])
  print(json.dumps(result, indent=1))
  sys.stdout.flush()


if __name__ == "__main__":
  _define_flags()
  cli.run(main)  # Bad flags or input: one `error:` line, exit 2.
