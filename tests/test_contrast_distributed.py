"""The replicated memory bank under shard_map on 8 fake CPU devices (own process: XLA_FLAGS)."""
import os
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent("""
    import functools
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P
    from pixcon_jax.contrast import loss as loss_lib
    from pixcon_jax.contrast import memory as memory_lib

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    C, D, V, B, H, W = 4, 8, 3, 16, 8, 8  # global batch of 16 -> 2 images per device
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(B, H, W, D)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    label = rng.integers(0, C, size=(B, 2 * H, 2 * W))
    label[3] = 255
    # Labels on the embedding grid (legacy nearest from 16x16 to 8x8 keeps every other pixel).
    label = label[:, ::2, ::2]
    image_id = rng.permutation(40)[:B].astype(np.int32)
    key = jax.random.key(7)
    # Explicit mesh axes: arguments must already carry the shardings of in_specs.
    put = lambda x, spec: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
    emb_s, label_s, id_s = (put(x, P("data")) for x in (emb, label, image_id))

    for mode, extra in (("indexed", dict(num_images=40)), ("fifo", dict(region_queue_size=10))):
      memory = memory_lib.init_memory(num_classes=C, dim=D, pixel_queue_size=20,
                                      region_mode=mode, **extra)
      # Two steps so the second one wraps the FIFOs (16 images x 3 pixels > 20 slots).
      single = memory
      enqueue = jax.jit(memory_lib.enqueue, static_argnames="pixels_per_class")
      for step in range(2):
        single = enqueue(single, jnp.asarray(emb), jnp.asarray(label),
                                    jnp.asarray(image_id + step), jax.random.fold_in(key, step),
                                    pixels_per_class=V)

      def local(memory, emb, label, image_id, key):
        for step in range(2):
          memory = memory_lib.enqueue_distributed(
              memory, emb, label, image_id + step, jax.random.fold_in(key, step),
              pixels_per_class=V, axis_name="data")
        return memory

      specs = (P(), P("data"), P("data"), P("data"), P())
      per_device = jax.jit(jax.shard_map(
          lambda *a: jax.tree.map(lambda x: x[None], local(*a)), mesh=mesh, in_specs=specs,
          out_specs=P("data")))(put(memory, P()), emb_s, label_s, id_s, put(key, P()))
      # The realistic form: the bank as a replicated (P()) output passes the vma check.
      replicated = per_device if mode == "fifo" else jax.jit(jax.shard_map(
          local, mesh=mesh, in_specs=specs, out_specs=P()))(
              put(memory, P()), emb_s, label_s, id_s, put(key, P()))
      for name in ("pixel_keys", "pixel_valid", "pixel_ptr", "region_keys", "region_valid",
                   "region_ptr"):
        stacked = np.asarray(getattr(per_device, name))
        for d in range(1, 8):  # bitwise identical on every device
          assert stacked[d].tobytes() == stacked[0].tobytes(), (mode, name, d)
        want = np.asarray(getattr(single, name))
        # Equal to one device holding the whole batch: exactly for slots and pointers; keys
        # within float32 rounding (the region means are batched matmuls, whose summation order
        # XLA:CPU may pick per batch size and per instruction set).
        same = (functools.partial(np.testing.assert_allclose, rtol=0, atol=1e-6)
                if name.endswith("keys") else np.testing.assert_array_equal)
        same(stacked[0], want, err_msg=f"{mode} {name}")
        got = np.asarray(getattr(replicated, name))
        same(got[0] if mode == "fifo" else got, want)
      assert np.asarray(single.pixel_valid).all()

    print("OK")
""")


def test_memory_bank_identical_on_8_devices_and_equal_to_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), (
      proc.stdout[-2000:] + proc.stderr[-4000:])
