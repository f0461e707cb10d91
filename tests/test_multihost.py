"""Two processes joined by jax.distributed (4 fake CPU devices each) == one process with 8.

Run as a script, this file is the worker: `--worker <out.npz> [<port> <process_id>]`.
"""
import os
import pathlib
import socket
import subprocess
import sys
import tempfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def worker(out_path: str, port: str | None, process_id: str | None) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if port is not None:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=int(process_id))
  from pixcon_jax import sharding, train  # pylint: disable=g-import-not-at-top
  from pixcon_jax import train_step as ts  # pylint: disable=g-import-not-at-top
  import test_train_step as tts  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 8, jax.devices()
  tts.disable_dropout()
  config = tts.tiny_config("paper")
  exp = train.setup(config)
  state = ts.create_train_state(
      config, exp.train_model, exp.tx, exp.mesh, image_shape=tuple(config.data.crop_size) + (3,),
      num_classes=config.model.num_classes, num_train_images=16, rng=jax.random.PRNGKey(0))
  step = ts.make_train_step(config, exp.train_model, exp.tx, exp.mesh)
  # Each process feeds its contiguous slice of the global batch (its devices' rows).
  per = config.data.batch_size // jax.process_count()
  lo = jax.process_index() * per
  for seed in (0, 1):
    batch = tts.fake_batch(config, seed)
    local = {k: v[lo:lo + per] for k, v in batch.items()}
    state, metrics = step(state, sharding.host_local_to_global(local, exp.mesh))
  # Replicated: every process holds a full copy; read it from a local device.
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  arrays = {jax.tree_util.keystr(p): np.asarray(x.addressable_data(0)) for p, x in flat}
  arrays.update({f"metric/{k}": np.asarray(v.addressable_data(0)) for k, v in metrics.items()})
  if jax.process_index() == 0:
    np.savez(out_path, **arrays)
  print("WORKER OK", jax.process_index(), flush=True)


def test_two_processes_equal_one_process():
  # Not pytest's tmp_path: concurrent pytest sessions rotate /tmp/pytest-of-<user>.
  tmp_path = pathlib.Path(tempfile.mkdtemp(prefix="pixcon_multihost_"))
  base = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  opt0 = " --xla_backend_optimization_level=0"  # Compiles ~2x faster; the same for all three.
  port = str(_free_port())
  ref, multi = tmp_path / "ref.npz", tmp_path / "multi.npz"
  procs = [subprocess.Popen(
      [sys.executable, __file__, "--worker", str(ref)], cwd=REPO,
      env=dict(base, XLA_FLAGS="--xla_force_host_platform_device_count=8" + opt0),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
  for pid in ("0", "1"):
    procs.append(subprocess.Popen(
        [sys.executable, __file__, "--worker", str(multi), port, pid], cwd=REPO,
        env=dict(base, XLA_FLAGS="--xla_force_host_platform_device_count=4" + opt0),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=900) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0 and "WORKER OK" in out, err[-6000:]
  import test_train_step as tts  # pylint: disable=g-import-not-at-top
  a, b = np.load(ref), np.load(multi)
  assert sorted(a.files) == sorted(b.files)
  assert any("memory" in k for k in a.files)
  for k in a.files:
    x, y = a[k], b[k]
    if x.dtype == bool or np.issubdtype(x.dtype, np.integer):
      np.testing.assert_array_equal(x, y, err_msg=k)
    else:
      scale = max(1.0, float(np.max(np.abs(x)))) if x.size else 1.0
      np.testing.assert_allclose(y, x, rtol=2e-4, atol=tts.LEAF_ATOL * scale, err_msg=k)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
  worker(sys.argv[2], *(sys.argv[3:5] if len(sys.argv) > 3 else (None, None)))
