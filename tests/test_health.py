"""Embedding-health statistics: a collapsed and a well-separated embedding, and the train metrics."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from pixcon_jax.contrast import health

C, D = 4, 8


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _labels(rng, b=2, h=6, w=8):
  label = rng.integers(0, C, size=(b, h, w))
  label[0, 0, :3] = 255  # ignored pixels take no part
  return label


def _numpy_health(emb, label):
  """The statistics by brute force over every pair of labelled pixels (float64)."""
  e = emb.reshape(-1, emb.shape[-1]).astype(np.float64)
  lab = label.reshape(-1)
  keep = (lab >= 0) & (lab < C)
  e, lab = e[keep], lab[keep]
  cos = e @ e.T
  same = (lab[:, None] == lab[None, :]) & ~np.eye(len(lab), dtype=bool)
  diff = lab[:, None] != lab[None, :]
  present = np.unique(lab)
  means = _unit(np.stack([e[lab == c].sum(0) for c in present]))
  mc = means @ means.T
  off = ~np.eye(len(present), dtype=bool)
  return dict(same_class_cos=cos[same].mean(), diff_class_cos=cos[diff].mean(),
              gap=cos[same].mean() - cos[diff].mean(), class_mean_cos=mc[off].mean(),
              mean_length=np.linalg.norm(e.mean(0)))


def test_collapsed_embedding_has_no_gap_and_unit_mean():
  rng = np.random.default_rng(0)
  label = _labels(rng)
  direction = _unit(rng.normal(size=D))
  emb = np.broadcast_to(direction, label.shape + (D,)).astype(np.float32)
  h = jax.tree.map(float, health.embedding_health(jnp.asarray(emb), jnp.asarray(label),
                                                  num_classes=C))
  np.testing.assert_allclose(h["same_class_cos"], 1.0, atol=1e-5)
  np.testing.assert_allclose(h["diff_class_cos"], 1.0, atol=1e-5)
  np.testing.assert_allclose(h["gap"], 0.0, atol=1e-5)
  np.testing.assert_allclose(h["class_mean_cos"], 1.0, atol=1e-5)
  np.testing.assert_allclose(h["mean_length"], 1.0, atol=1e-5)


def test_separated_embedding_has_a_large_gap():
  rng = np.random.default_rng(1)
  label = _labels(rng)
  centers = np.eye(D)[:C]  # orthogonal class directions
  emb = _unit(centers[np.clip(label, 0, C - 1)] + 0.05 * rng.normal(size=label.shape + (D,)))
  h = jax.tree.map(float, health.embedding_health(jnp.asarray(emb, jnp.float32),
                                                  jnp.asarray(label), num_classes=C))
  assert h["same_class_cos"] > 0.98 and abs(h["diff_class_cos"]) < 0.05
  assert h["gap"] > 0.9 and abs(h["class_mean_cos"]) < 0.05 and h["mean_length"] < 0.6


def test_statistics_equal_brute_force_pairs():
  rng = np.random.default_rng(2)
  label = _labels(rng)
  emb = _unit(rng.normal(size=label.shape + (D,)) + 0.7 * np.eye(D)[np.clip(label, 0, C - 1)])
  got = health.embedding_health(jnp.asarray(emb, jnp.float32), jnp.asarray(label), num_classes=C)
  want = _numpy_health(emb, label)
  for k, v in want.items():
    np.testing.assert_allclose(float(got[k]), v, rtol=1e-4, atol=1e-5, err_msg=k)


def test_sharded_statistics_equal_the_global_batch():
  rng = np.random.default_rng(3)
  label = _labels(rng, b=4)
  emb = _unit(rng.normal(size=label.shape + (D,))).astype(np.float32)
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  fn = jax.shard_map(functools.partial(health.embedding_health, num_classes=C, axis_name="data"),
                     mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P())
  got = jax.jit(fn)(jnp.asarray(emb), jnp.asarray(label))
  want = _numpy_health(emb, label)
  for k, v in want.items():
    np.testing.assert_allclose(float(got[k]), v, rtol=1e-4, atol=1e-5, err_msg=k)
