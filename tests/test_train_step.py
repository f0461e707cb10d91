"""The sharded train step: 8 devices == 1 device, and 2 processes x 4 devices == 1 x 8.

Both comparisons need fake CPU devices, which must be set before JAX starts, and the second two
processes joined by `jax.distributed.initialize` on 127.0.0.1; so run as a script this file is
the worker (`--worker-devices <ref.npz> <recipe>...` or `--worker-process <out.npz> <port> <id>`).
The module fixture starts the three workers at once; the 8-device run of the first is the
reference of both tests.
"""
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import helpers

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(recipe: str = "paper"):
  """cityscapes_hrnet:runlocal with 32x32 crops, global batch 8 (one image per fake device)."""
  from configs import cityscapes_hrnet  # pylint: disable=g-import-not-at-top
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
  from pixcon_jax import setup, sharding  # pylint: disable=g-import-not-at-top
  from pixcon_jax import train_step as ts  # pylint: disable=g-import-not-at-top
  exp = setup.for_training(config)
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


# Summation order differs between 1 and 8 devices, or 1 and 2 processes; after two steps of a
# random tiny net that float32 noise measured up to 1.1e-4 of a leaf's largest entry (the stem
# conv's momentum; every other leaf <= 6e-5). A wrong shard, psum or host slice is O(1).
LEAF_ATOL = 3e-4
# The momentum buffers are the raw gradients, and step 2's gradient carries the noise of step 1
# amplified: BN over 8 values (one 1x1 map per image at the 1/32 branch) turns 1e-7 into 1e-5 in
# the step-1 embeddings, which step 2 reads back from the memory bank as contrast keys
# (tau = 0.1). At XLA optimisation level 0 (the workers' setting) the 1-device run measured, of a
# leaf's scale: 4.1e-3 with semi-hard mining, 1.5e-2 with random mining (the default since
# 2026-12-05; 5e-4 at the default level, 2-core Zen 4); params, BN statistics and memory stay
# within 2e-5. Still far from the O(1) of a lost pmean or a wrong shard.
GRAD_LEAF_ATOL = 4e-2


def assert_trees_close(a, b, what, rtol=2e-4, atol=LEAF_ATOL):
  """allclose per leaf with atol scaled by the leaf's magnitude (momentum buffers are ~grads)."""
  import jax  # pylint: disable=g-import-not-at-top
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb), what
  worst = worst_scaled = 0.0
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype == bool or np.issubdtype(x.dtype, np.integer):
      np.testing.assert_array_equal(x, y, err_msg=what)
    else:
      scale = max(1.0, float(np.max(np.abs(y)))) if y.size else 1.0
      np.testing.assert_allclose(x, y, rtol=rtol, atol=atol * scale, err_msg=what)
      worst = max(worst, float(np.max(np.abs(x - y))) if x.size else 0.0)
      worst_scaled = max(worst_scaled, float(np.max(np.abs(x - y))) / scale if x.size else 0.0)
  print(f"{what}: {len(la)} arrays match (max abs diff {worst:.2e}, {worst_scaled:.2e} of the "
        "leaf's scale)")


def flat_state(state, metrics) -> dict[str, np.ndarray]:
  """{keystr: array} of a replicated state and metrics, read from a local device."""
  import jax  # pylint: disable=g-import-not-at-top

  def local(x):
    return np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x)

  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  arrays = {jax.tree_util.keystr(p): local(x) for p, x in flat}
  arrays.update({f"metric/{k}": local(v) for k, v in metrics.items()})
  return arrays


def devices_worker(ref_path: str, recipes: list[str]) -> None:
  """8 devices vs 1 device for each recipe; saves the paper recipe's 8-device result."""
  import jax  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 8, jax.devices()
  # Dropout on: its masks are drawn per image from the image's global position
  # (`layers.Dropout2d`), so they, and the seg.-aware hard anchors picked from the dropped-out
  # logits, are the same on 8 devices as on 1.
  for recipe in recipes:
    config = tiny_config(recipe)
    batches = [fake_batch(config, 0), fake_batch(config, 1)]
    s8, m8 = run_steps(config, jax.devices(), batches)
    if recipe == "paper":
      np.savez(ref_path, **flat_state(s8, m8[-1]))
    s1, m1 = run_steps(config, jax.devices()[:1], batches)
    print(recipe, "metrics 8 devices:", {k: float(v) for k, v in m8[-1].items()})
    print(recipe, "metrics 1 device: ", {k: float(v) for k, v in m1[-1].items()})
    assert m8[-1]["contrast_loss"] > 0
    assert_trees_close(s8.params, s1.params, f"{recipe} params")
    assert_trees_close(s8.batch_stats, s1.batch_stats, f"{recipe} batch_stats")
    assert_trees_close(s8.opt_state, s1.opt_state, f"{recipe} opt_state", atol=GRAD_LEAF_ATOL)
    if recipe == "paper":
      assert s8.memory is not None and bool(np.any(s8.memory.pixel_valid))
      assert bool(np.any(s8.memory.pending.pixel_valid))  # Step 2's keys, written by step 3.
      assert_trees_close(s8.memory, s1.memory, f"{recipe} memory")
    assert_trees_close({k: v for k, v in m8[-1].items()}, {k: v for k, v in m1[-1].items()},
                       f"{recipe} metrics")
  print("WORKER OK")


def process_worker(out_path: str, port: str, process_id: str) -> None:
  """One of two processes (4 devices each) taking the paper recipe's two steps together."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=int(process_id))
  from pixcon_jax import setup, sharding  # pylint: disable=g-import-not-at-top
  from pixcon_jax import train_step as ts  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 8 and jax.local_device_count() == 4, jax.devices()
  config = tiny_config("paper")
  exp = setup.for_training(config)
  state = ts.create_train_state(
      config, exp.train_model, exp.tx, exp.mesh, image_shape=tuple(config.data.crop_size) + (3,),
      num_classes=config.model.num_classes, num_train_images=16, rng=jax.random.PRNGKey(0))
  step = ts.make_train_step(config, exp.train_model, exp.tx, exp.mesh)
  # Each process feeds its contiguous slice of the global batch (its devices' rows).
  per = config.data.batch_size // jax.process_count()
  lo = jax.process_index() * per
  for seed in (0, 1):
    batch = fake_batch(config, seed)
    local = {k: v[lo:lo + per] for k, v in batch.items()}
    state, metrics = step(state, sharding.host_local_to_global(local, exp.mesh))
  arrays = flat_state(state, metrics)  # Replicated: every process holds a full copy.
  if jax.process_index() == 0:
    np.savez(out_path, **arrays)
  print("WORKER OK", jax.process_index(), flush=True)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def workers():
  """Starts the 8-vs-1-device worker and the two joined processes at once; waits for all."""
  # Not pytest's tmp_path: concurrent pytest sessions rotate /tmp/pytest-of-<user>.
  root = pathlib.Path(tempfile.mkdtemp(prefix="pixcon_train_step_"))
  ref, multi, port = root / "ref.npz", root / "multi.npz", str(_free_port())
  specs = {"devices": (["--worker-devices", str(ref), "paper"], 8)}
  for pid in ("0", "1"):
    specs[f"process{pid}"] = (["--worker-process", str(multi), port, pid], 4)
  procs = {name: subprocess.Popen(
      [sys.executable, __file__, *args], cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True,
      env=helpers.subprocess_env(devices=n))
           for name, (args, n) in specs.items()}
  try:
    outputs = {name: p.communicate(timeout=900) for name, p in procs.items()}
  finally:
    for p in procs.values():  # A hung worker (e.g. a failed distributed join) must not linger.
      if p.poll() is None:
        p.kill()
  results = {name: (procs[name].returncode, *outputs[name]) for name in procs}
  yield dict(results=results, ref=ref, multi=multi)
  shutil.rmtree(root, ignore_errors=True)


def _assert_ok(workers, name):
  rc, out, err = workers["results"][name]
  print(out[-4000:])
  assert rc == 0 and "WORKER OK" in out, err[-6000:]


def test_step_on_8_devices_equals_1_device_paper_recipe(workers):
  """Params, BN stats, optimizer state, memory bank and metrics agree (float32 tolerance)."""
  _assert_ok(workers, "devices")


def test_two_processes_equal_one_process(workers):
  """jax.distributed with 2 x 4 devices gives the single 8-device process's state."""
  _assert_ok(workers, "process0")
  _assert_ok(workers, "process1")
  assert workers["ref"].exists(), ("the 8-device reference run failed",
                                   workers["results"]["devices"][2][-6000:])
  a, b = np.load(workers["ref"]), np.load(workers["multi"])
  assert sorted(a.files) == sorted(b.files)
  assert any("memory" in k for k in a.files)
  # The momentum buffers are raw gradients: their float noise is amplified (GRAD_LEAF_ATOL's
  # comment); with dropout on, one entry of 18432 measured 4.8e-4 of its leaf's scale.
  momentum = lambda k: "opt_state" in k
  assert_trees_close({k: b[k] for k in b.files if not momentum(k)},
                     {k: a[k] for k in a.files if not momentum(k)}, "2 x 4 vs 1 x 8")
  assert_trees_close({k: b[k] for k in b.files if momentum(k)},
                     {k: a[k] for k in a.files if momentum(k)}, "2 x 4 vs 1 x 8 opt_state",
                     atol=GRAD_LEAF_ATOL)

if __name__ == "__main__" and sys.argv[1:2] == ["--worker-devices"]:
  devices_worker(sys.argv[2], sys.argv[3:])
elif __name__ == "__main__" and sys.argv[1:2] == ["--worker-process"]:
  process_worker(*sys.argv[2:5])


def _bank_copies(hlo: str, shapes: list[str]) -> list[str]:
  """The `copy` instructions of a compiled module whose result has one of `shapes` (e.g. f32[19,23,16])."""
  return [line.strip() for line in hlo.splitlines()
          if " copy(" in line and any(f"= {s}{{" in line for s in shapes)]


def test_compiled_step_writes_the_memory_bank_in_place():
  """The step updates the donated bank without copying it (578 MB per copy at paper settings).

  Written at the end of the step, the bank's scatter had no data dependency on the loss's reads
  of the bank, and XLA copied the bank twice to keep the old value; the step now writes the
  previous step's keys first (`memory.flush`). Queue and table sizes are primes here so that no
  other array of the step shares the bank's shapes.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from pixcon_jax import setup, sharding  # pylint: disable=g-import-not-at-top
  from pixcon_jax import train_step as ts  # pylint: disable=g-import-not-at-top
  config = tiny_config("paper")
  config.data.batch_size = 2
  config.memory.pixel_queue_size = 23
  exp = setup.for_training(config)
  mesh = sharding.make_mesh(jax.devices()[:1])
  state = ts.create_train_state(
      config, exp.train_model, exp.tx, mesh, image_shape=tuple(config.data.crop_size) + (3,),
      num_classes=config.model.num_classes, num_train_images=29, rng=jax.random.PRNGKey(0))
  batch = sharding.host_local_to_global(fake_batch(config), mesh)
  step = ts.make_train_step(config, exp.train_model, exp.tx, mesh)
  hlo = step.lower(state, batch).compile().as_text()
  c, d = config.model.num_classes, config.model.proj_dim
  assert state.memory.pixel_keys.shape == (c, 23, d), state.memory.pixel_keys.shape
  assert state.memory.region_keys.shape == (c, 29, d), state.memory.region_keys.shape
  shapes = [f"f32[{c},23,{d}]", f"f32[{c},29,{d}]"]
  assert "scatter" in hlo and any(f"= {s}{{" in hlo for s in shapes), "bank not in the step?"
  copies = _bank_copies(hlo, shapes)
  assert not copies, "the compiled step copies the memory bank:\n" + "\n".join(copies)
