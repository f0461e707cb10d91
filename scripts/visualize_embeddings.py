r"""Figure 4 of the paper: pixel embeddings of a checkpoint projected to 2-D, coloured by class.

    python scripts/visualize_embeddings.py --config=configs/cityscapes_hrnet.py \
        --workdir=/path/to/run [--per_class=100 --num_batches=4 --method=tsne]

Weights: the latest checkpoint in the workdir, else `config.init_from` (as the eval mode).
Pixels are sampled from the evaluation split: the model's `embedding` output (the
L2-normalised projection, [B, h, w, D]; `--feature_key` picks another output, e.g.
`features` for a model without projection head: the backbone maps resized to the finest
one and concatenated, or `logits`), labels
brought to the embedding grid with the loss's legacy-nearest rule, at most `--per_class`
valid pixels per class. The 2-D projection is scikit-learn's t-SNE or PCA (`--method=pca`).
The scatter plot is drawn with matplotlib, saved as a PNG (default
`<workdir>/embeddings_<method>.png`) and logged to TensorBoard as `embeddings/<method>`.
scikit-learn and matplotlib come with the optional extra: `pip install -e ".[viz]"`; without
them the script prints one `error:` line naming the extra and exits with 2.

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
from PIL import Image

from pixcon_jax import validation

from pixcon_jax import cli
from pixcon_jax import validation


# ------------------------------------------------------------------------------------------
# The [viz] extra and the projections.

VIZ_EXTRA = 'pip install -e ".[viz]"'  # scikit-learn and matplotlib (pyproject.toml)


class MissingExtraError(validation.InputError):
  """scikit-learn or matplotlib is not installed: the message names the extra."""


def require_viz() -> None:
  """Raises MissingExtraError (one line naming the extra) unless scikit-learn and matplotlib
  import."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top,unused-import
    import sklearn  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise MissingExtraError(
        f"scripts/visualize_embeddings.py needs the [viz] extra (scikit-learn, matplotlib), "
        f"{e.name or 'a package'} is missing: {VIZ_EXTRA}") from None


def pca(x: np.ndarray, dim: int = 2) -> np.ndarray:
  """[N, D] -> [N, dim] principal components (scikit-learn)."""
  from sklearn.decomposition import PCA  # pylint: disable=g-import-not-at-top
  return PCA(n_components=dim).fit_transform(np.asarray(x, np.float64))


def tsne(x: np.ndarray, dim: int = 2, *, perplexity: float = 30.0, iters: int = 500,
         seed: int = 0) -> np.ndarray:
  """scikit-learn's t-SNE (PCA init, automatic learning rate).

  Args:
    x: [N, D] points.
    perplexity: clipped to (N - 1) / 3 for small N (scikit-learn needs perplexity < N).
    iters: optimisation steps after scikit-learn's 250 steps of early exaggeration.
  Returns:
    [N, dim] embedding.
  """
  from sklearn.manifold import TSNE  # pylint: disable=g-import-not-at-top
  x = np.asarray(x, np.float64)
  perplexity = min(perplexity, max(2.0, (x.shape[0] - 1) / 3.0))
  return TSNE(n_components=dim, perplexity=perplexity, max_iter=250 + int(iters),
              init="pca", learning_rate="auto", random_state=seed).fit_transform(x)


# ------------------------------------------------------------------------------------------
# Numbers and drawing.

def _squared_distances(x: np.ndarray) -> np.ndarray:
  s = np.sum(x * x, axis=1)
  return np.maximum(s[:, None] + s[None, :] - 2.0 * x @ x.T, 0.0)


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
  """Scatter plot [size, size + legend, 3] uint8 (matplotlib): points coloured by class in the
  dataset palette, a legend of the classes present on the right."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # no display; before pyplot
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  dpi, legend_w = 100, 180
  fig = plt.figure(figsize=((size + legend_w) / dpi, size / dpi), dpi=dpi)
  ax = fig.add_axes((0.02, 0.02, size / (size + legend_w) - 0.03, 0.93))
  pts = np.asarray(points, np.float64)
  labels = np.asarray(labels).astype(np.int64)
  order = np.random.default_rng(0).permutation(len(pts))  # no class painted last on top
  colours = np.asarray(palette, np.float64)[labels[order]] / 255.0
  ax.scatter(pts[order, 0], pts[order, 1], c=colours, s=(2 * radius) ** 2, linewidths=0)
  ax.set_xticks([])
  ax.set_yticks([])
  if title:
    ax.set_title(title, fontsize=8, loc="left")
  present = sorted(set(labels.tolist()))
  handles = [plt.Line2D([], [], marker="s", linestyle="", markersize=8,
                        color=np.asarray(palette[c], np.float64) / 255.0, label=str(names[c]))
             for c in present]
  fig.legend(handles=handles, loc="upper right", fontsize=8, frameon=False)
  fig.canvas.draw()
  image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  plt.close(fig)
  return image


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
  """Samples, projects, draws, logs; returns {"png": path, "statistics": {...}, ...}.

  Raises:
    MissingExtraError before any work when the [viz] extra is not installed.
  """
  require_viz()
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
  flags.DEFINE_integer("iters", 500, "t-SNE iterations after the 250 of early exaggeration.")
  flags.DEFINE_string("output", None, "PNG path (default <workdir>/embeddings_<method>.png).")
  flags.DEFINE_string("feature_key", "embedding", "Model output to project.")
  flags.DEFINE_integer("seed", 0, "Sampling / t-SNE seed.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    require_viz()  # before the model is built
    result = run(FLAGS.config, FLAGS.workdir, num_batches=FLAGS.num_batches,
                 per_class=FLAGS.per_class, method=FLAGS.method, perplexity=FLAGS.perplexity,
                 iters=FLAGS.iters, output=FLAGS.output, feature_key=FLAGS.feature_key,
                 seed=FLAGS.seed)
  except validation.InputError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(validation.EXIT_BAD_INPUT)
  logging.info("wrote %s", result["png"])
  print(json.dumps(result, indent=1))
  sys.stdout.flush()


if __name__ == "__main__":
  _define_flags()
  cli.run(main)  # Bad flags or input: one `error:` line, exit 2.
