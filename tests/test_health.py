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


def _logged(emb, label, prefix="train/embedding/"):
  stats = health.embedding_health(jnp.asarray(emb), jnp.asarray(label), num_classes=3)
  return {prefix + k: float(v) for k, v in stats.items()}


def test_collapse_alarm_fires_once_on_a_forced_collapse_after_the_warmup():
  rng = np.random.default_rng(0)
  label = rng.integers(0, 3, size=(2, 6, 6))
  centres = np.eye(3, 4)
  separated = centres[label] + 0.1 * rng.normal(size=label.shape + (4,))
  collapsed = np.ones(label.shape + (4,)) + 0.01 * rng.normal(size=label.shape + (4,))
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  good, bad = _logged(unit(separated), label), _logged(unit(collapsed), label)
  assert good["train/embedding/gap"] > 0.5 and bad["train/embedding/gap"] < 0.01
  alarm = health.CollapseAlarm(threshold=0.05, patience=3, start_step=100)
  lines, flags = [], []
  # Collapsed during the warm-up (steps < 100): not counted. Then separated (resets the count),
  # two low steps, one good one, then low for good.
  for step, m in [(50, bad), (90, bad), (100, good), (110, bad), (120, bad), (130, good),
                  (140, bad), (150, bad), (160, bad), (170, bad), (180, bad)]:
    lines.append(alarm.update(step, m))
    flags.append(alarm.flag)
  fired = [line for line in lines if line]
  assert len(fired) == 1 and lines[8] == fired[0], lines  # at step 160, the 3rd low step in a row
  assert flags == [0.0] * 8 + [1.0] * 3, flags
  line = fired[0]
  assert "\n" not in line and "docs/ABLATIONS.md" in line and "collapse" in line
  assert f"{bad['train/embedding/same_class_cos']:.3f}" in line
  assert f"{bad['train/embedding/diff_class_cos']:.3f}" in line
  # A run whose embedding stays separated never raises it; patience 0 turns it off.
  calm, off = health.CollapseAlarm(0.05, 3), health.CollapseAlarm(0.05, 0)
  assert not any(calm.update(s, good) for s in range(10)) and calm.flag == 0.0
  assert not any(off.update(s, bad) for s in range(10))


def test_collapse_alarm_reads_its_config_keys():
  from configs import demo  # pylint: disable=g-import-not-at-top
  from pixcon_jax import train  # pylint: disable=g-import-not-at-top
  config = demo.get_config()
  config.log.collapse_gap = 0.07
  config.log.collapse_patience = 6
  config.contrast.warmup_steps = 25
  alarm = train.make_collapse_alarm(config)
  assert (alarm.threshold, alarm.patience, alarm.start_step) == (0.07, 6, 25)
  config.contrast.enabled = False
  assert train.make_collapse_alarm(config) is None
