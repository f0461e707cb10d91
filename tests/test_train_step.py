"""The sharded train step: 8 devices == 1 device on the same global batch.

Run as a script, this file is the worker: it needs 8 fake CPU devices, which must be set
before JAX starts, hence the subprocess.
"""
import os
import pathlib
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(recipe: str = "paper"):
  """cityscapes_hrnet:runlocal with 32x32 crops, global batch 8 (one image per fake device)."""
  sys.path.insert(0, str(REPO / "configs"))
  import cityscapes_hrnet  # pylint: disable=g-import-not-at-top
  config = cityscapes_hrnet.get_config("runlocal" + (",official" if recipe == "official" else ""))
  config.data.batch_size = 8
  config.data.crop_size = (32, 32)
  config.memory.pixel_queue_size = 16
  config.contrast.anchors_per_class = 4
  config.contrast.num_positives = 8
  config.contrast.num_negatives = 16
  config.contrast.positive_pool = 32
  config.contrast.negative_pool = 64
  config.contrast.warmup_steps = 0  # Contrast on from step 0 (official recipe too).
  # A random tiny net at the paper's LR is chaotic: float32 reduction-order noise (1e-6)
  # after step 1 grows to 1e-3 at step 2 even for CE alone; a small LR keeps step 2 (the
  # first to read the memory bank) comparable.
  config.optim.lr = 1e-4
  return config


def fake_batch(config, seed: int = 0) -> dict:
  """A global batch with ignore pixels and uneven class counts across images."""
  rng = np.random.default_rng(seed)
  b = config.data.batch_size
  h, w = config.data.crop_size
  label = rng.integers(0, 5, (b, h, w)).astype(np.int32)
  label[:, : h // 4] = 255  # Ignore rows.
  label[0, :, : w // 2] = 7  # Uneven weighted-pixel totals per device.
  image = rng.normal(size=(b, h, w, 3)).astype(np.float32) + label[..., None] * 0.1
  return {"image": image, "label": label, "image_id": np.arange(b, dtype=np.int32)}


def run_steps(config, devices, batches):
  """Runs len(batches) steps on a mesh of `devices`; returns the final state as numpy."""
  import jax  # pylint: disable=g-import-not-at-top
  from pixcon_jax import sharding, train  # pylint: disable=g-import-not-at-top
  from pixcon_jax import train_step as ts  # pylint: disable=g-import-not-at-top
  exp = train.setup(config)
  mesh = sharding.make_mesh(devices)
  state = ts.create_train_state(
      config, exp.train_model, exp.tx, mesh, image_shape=tuple(config.data.crop_size) + (3,),
      num_classes=config.model.num_classes, num_train_images=16, rng=jax.random.PRNGKey(0))
  step = ts.make_train_step(config, exp.train_model, exp.tx, mesh)
  metrics = []
  for batch in batches:
    state, m = step(state, sharding.host_local_to_global(batch, mesh))
    metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics


def disable_dropout():
  """Dropout masks are per-device random streams: compare the steps without them."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from pixcon_jax.models import heads  # pylint: disable=g-import-not-at-top
  heads.dropout2d = lambda rate, *, train: nn.Dropout(rate, deterministic=True)


# Summation order differs between 1 and 8 devices, or 1 and 2 processes; after two steps of a
# random tiny net that float32 noise measured up to 1.1e-4 of a leaf's largest entry (the stem
# conv's momentum; every other leaf <= 6e-5). A wrong shard, psum or host slice is O(1).
LEAF_ATOL = 3e-4


def assert_trees_close(a, b, what, rtol=2e-4, atol=LEAF_ATOL):
  """allclose per leaf with atol scaled by the leaf's magnitude (momentum buffers are ~grads)."""
  import jax  # pylint: disable=g-import-not-at-top
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb), what
  worst = 0.0
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype == bool or np.issubdtype(x.dtype, np.integer):
      np.testing.assert_array_equal(x, y, err_msg=what)
    else:
      scale = max(1.0, float(np.max(np.abs(y)))) if y.size else 1.0
      np.testing.assert_allclose(x, y, rtol=rtol, atol=atol * scale, err_msg=what)
      worst = max(worst, float(np.max(np.abs(x - y))) if x.size else 0.0)
  print(f"{what}: {len(la)} arrays match (max abs diff {worst:.2e})")


def worker() -> None:
  import jax  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 8, jax.devices()
  disable_dropout()
  for recipe in sys.argv[2:]:
    config = tiny_config(recipe)
    batches = [fake_batch(config, 0), fake_batch(config, 1)]
    s8, m8 = run_steps(config, jax.devices(), batches)
    s1, m1 = run_steps(config, jax.devices()[:1], batches)
    print(recipe, "metrics 8 devices:", {k: float(v) for k, v in m8[-1].items()})
    print(recipe, "metrics 1 device: ", {k: float(v) for k, v in m1[-1].items()})
    assert m8[-1]["contrast_loss"] > 0
    assert_trees_close(s8.params, s1.params, f"{recipe} params")
    assert_trees_close(s8.batch_stats, s1.batch_stats, f"{recipe} batch_stats")
    assert_trees_close(s8.opt_state, s1.opt_state, f"{recipe} opt_state")
    if recipe == "paper":
      assert s8.memory is not None and bool(np.any(s8.memory.pixel_valid))
      assert_trees_close(s8.memory, s1.memory, f"{recipe} memory")
    assert_trees_close({k: v for k, v in m8[-1].items()}, {k: v for k, v in m1[-1].items()},
                       f"{recipe} metrics")
  print("WORKER OK")


def _run_worker(*recipes):
  # Backend optimisation off: the tiny step compiles ~2x faster, and both sides run the same code.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"))
  proc = subprocess.run([sys.executable, __file__, "--worker", *recipes], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=900)
  print(proc.stdout[-4000:])
  assert proc.returncode == 0 and "WORKER OK" in proc.stdout, proc.stderr[-6000:]


def test_step_on_8_devices_equals_1_device_paper_recipe():
  """Params, BN stats, optimizer state, memory bank and metrics agree (float32 tolerance)."""
  _run_worker("paper")


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
  worker()
