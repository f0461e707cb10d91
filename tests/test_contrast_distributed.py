"""The replicated memory bank and the global-batch contrast loss under shard_map on 8 fake CPU
devices, against one device holding the whole batch (own process: XLA_FLAGS)."""
import os
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent("""
    import dataclasses
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

    # The global-batch loss: the 8 devices evaluate one loss of the whole batch together (each
    # its images' share of the pools and its 1/8 of the memory pools). It must equal one device
    # holding the whole batch -- value, metrics and gradient -- for every mining rule, with
    # partial pools (sampling matters) and with exact ones.
    label_grid = label
    predict = np.where(rng.uniform(size=label_grid.shape) < 0.3, (label_grid + 1) % C, label_grid)
    predict = np.where(label_grid == 255, 0, predict)
    whole = (jnp.asarray(emb), jnp.asarray(label_grid), jnp.asarray(predict), jnp.asarray(image_id))
    split = tuple(put(x, P("data")) for x in (emb, label_grid, predict, image_id))
    base = loss_lib.ContrastSettings(anchors_per_class=6, num_positives=8, num_negatives=16,
                                     positive_pool=80, negative_pool=160)
    cases = {
        "random": dict(mining="random"),
        "semi_hard": dict(mining="semi_hard"),
        "semi_hard_draw": dict(mining="semi_hard", num_positives=2, num_negatives=4),
        "hardest_pooled": dict(mining="hardest", anchor_sampling="random"),
        "hardest_exact": dict(mining="hardest", positive_pool=4096, negative_pool=8192,
                              batch_pool_fraction=0.5),
        "intra_batch": dict(mining="random", sources=("batch",), scope="intra"),
        "region_only": dict(mining="semi_hard", sources=("batch", "region_memory"),
                            class_block=2),
    }
    for name, overrides in cases.items():
      s = dataclasses.replace(base, **overrides)
      vg = jax.value_and_grad(functools.partial(loss_lib.pixel_contrast_loss, settings=s),
                              has_aux=True)
      (want, want_m), want_g = jax.jit(vg)(*whole, single, key)

      def together(e, l, p, i, m, k):
        (loss, metrics), g = jax.value_and_grad(
            lambda e: loss_lib.pixel_contrast_loss(e, l, p, i, m, k, settings=s,
                                                   axis_name="data"), has_aux=True)(e)
        return loss, metrics, g

      loss, metrics, grad = jax.jit(jax.shard_map(
          together, mesh=mesh, in_specs=(P("data"),) * 4 + (P(), P()),
          out_specs=(P(), P(), P("data"))))(*split, put(single, P()), put(key, P()))
      assert float(want_m["num_valid_anchors"]) > 0, name
      np.testing.assert_allclose(float(loss), float(want), rtol=2e-5, err_msg=name)
      for k, v in want_m.items():
        np.testing.assert_allclose(float(metrics[k]), float(v), rtol=1e-5, err_msg=f"{name} {k}")
      np.testing.assert_allclose(np.asarray(grad), np.asarray(want_g), rtol=1e-4, atol=1e-6,
                                 err_msg=name)
      assert np.abs(np.asarray(grad)).sum() > 0, name
    # Only what the loss needs crosses devices, and each device does its share: compiled on 1
    # and on 8 devices (2 images each), the collectives stay far below one device's embedding
    # map and do not grow with the device count, and the FLOPs per device fall with it.
    import xla_cost  # scripts/
    from jax.sharding import Mesh
    b, h, w, d = 2, 32, 32, 64
    big = loss_lib.ContrastSettings(anchors_per_class=8, num_positives=64, num_negatives=128,
                                    positive_pool=640, negative_pool=1280, unroll=True)
    measured = {}
    for n in (1, 8):
      sds = jax.ShapeDtypeStruct
      bank = memory_lib.init_memory(num_classes=C, dim=d, pixel_queue_size=400,
                                    region_mode="indexed", num_images=40)
      args = (sds((b * n, h, w, d), jnp.float32), sds((b * n, h, w), jnp.int32),
              sds((b * n, h, w), jnp.int32), sds((b * n,), jnp.int32), bank, key)

      def grad_of_loss(e, l, p, i, m, k):
        f = lambda e: loss_lib.pixel_contrast_loss(e, l, p, i, m, k, settings=big,
                                                   axis_name="data")
        return jax.value_and_grad(lambda e: f(e)[0])(e)

      compiled = jax.jit(jax.shard_map(
          grad_of_loss, mesh=Mesh(np.array(jax.devices()[:n]), ("data",)),
          in_specs=(P("data"),) * 4 + (P(), P()), out_specs=(P(), P("data")))).lower(
              *args).compile()
      measured[n] = (xla_cost.collective_bytes(compiled.as_text()), xla_cost.flops(compiled))
    map_bytes = b * h * w * d * 4
    (bytes1, flops1), (bytes8, flops8) = measured[1], measured[8]
    print("pod", measured, map_bytes)
    assert 0 < bytes8 < 0.2 * map_bytes and bytes8 <= 1.1 * bytes1, (measured, map_bytes)
    assert flops8 <= 0.25 * flops1, measured
    print("OK")
""")


def test_memory_bank_and_global_loss_on_8_devices_equal_single_device():
  scripts = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(filter(None, [scripts, os.environ.get("PYTHONPATH")])))
  proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), (
      proc.stdout[-2000:] + proc.stderr[-4000:])
