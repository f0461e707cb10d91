"""Benchmark of the pixel contrast loss (paper Eq. 3) at paper settings; prints one JSON line.

Reports, for loss + gradient w.r.t. the embedding:
- `temp_bytes` / `flops`: XLA compiled memory analysis (temporaries) and cost analysis of
  `contrast.loss.pixel_contrast_loss` at paper settings (C=19, D=256, 2 images of 512x1024 per
  device -> 128x256 embeddings, 50 anchors/class, T=10N, indexed region memory N=2975,
  K=1024/2048, semi-hard, seg-aware hard anchors). FLOPs come from a compile with the class loop
  unrolled, because XLA's cost analysis counts a while-loop body once.
- `naive_temp_bytes` / `naive_flops`: a naive full-matrix reference of the same loss (all anchors
  x whole contrast set, mining over full rows), compiled, not run.
- `train_step_flops`: value_and_grad of a CE loss of HRNet-W48 (+ projection head) in train mode on
  2 x 512x1024 (ShapeDtypeStruct inputs, compiled, not run); `contrast_flop_share` = flops / that.
- `time_paper_loss_grad_s`: loss + grad at paper settings with a full bank (T = 10 N, N = 2975),
  and `time_selection_s`: the mining's top-k selection alone on its shapes (all anchors x each
  pool, k = K) by `lax.top_k` and by bisection (`sampling.top_k_mask`, the default);
- `time_projection_head_s`: HRNet-W48's projection head on `bench_train.py`'s embedding grid,
  forward and forward + backward (the backward is the other part of what contrast adds);
- timings of loss + grad of both versions at a reduced bank size that the naive one can run on CPU
  (`timing_config`), their ratio, and `naive_match_abs_diff`: |loss - naive loss| with pools
  covering the whole (reduced) bank and deterministic 'hardest' mining (should be ~1e-6).

Usage: python scripts/bench_contrast.py [--skip_train_step] [--skip_naive_paper]
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pixcon_jax import cli
from pixcon_jax.cpu import host_memory
from pixcon_jax.cpu import xla_flags
from pixcon_jax.contrast import loss as loss_lib
from pixcon_jax.contrast import memory as memory_lib
from pixcon_jax.contrast import sampling
import xla_cost  # scripts/xla_cost.py


def naive_contrast_loss(embedding, label, predict, image_id, memory, rng, *, settings):
  """Reference Eq. 3: every anchor against the whole contrast set in one [A, N] matrix.

  Same anchor sampling and the same per-row mining rule as `pixel_contrast_loss`, but no pools and
  no blocking; inter-image scope only.
  """
  s = settings
  del image_id
  b, h, w, d = embedding.shape
  c = memory.num_classes
  emb = embedding.reshape(-1, d).astype(jnp.float32)
  label = label.reshape(-1)
  predict = predict.reshape(-1)
  pixel_ok = (label >= 0) & (label < c) & (label != s.ignore_label)
  rng_anchor, _, _, _, _, rng_mine = jax.random.split(rng, 6)
  # The loss's anchors: per-image random scores (the same draws as `pixel_contrast_loss`).
  anchors = sampling.sample_anchors(label.reshape(b, h * w), predict.reshape(b, h * w),
                                    rng_anchor, num_classes=c,
                                    anchors_per_class=s.anchors_per_class,
                                    mode=s.anchor_sampling, ignore_label=s.ignore_label)
  index, valid = anchors.index, anchors.valid
  anchors = emb[index.reshape(-1)]
  a_cls = jnp.repeat(jnp.arange(c), s.anchors_per_class)
  keys, key_cls, key_ok, key_pix = [], [], [], []
  if "batch" in s.sources:
    keys.append(emb); key_cls.append(label); key_ok.append(pixel_ok)
    key_pix.append(jnp.arange(emb.shape[0]))
  for name, part_keys, part_valid in (("pixel_memory", memory.pixel_keys, memory.pixel_valid),
                                      ("region_memory", memory.region_keys, memory.region_valid)):
    if name in s.sources:
      keys.append(jax.lax.stop_gradient(part_keys.reshape(-1, d).astype(jnp.float32)))
      key_cls.append(jnp.repeat(jnp.arange(c), part_keys.shape[1]))
      key_ok.append(part_valid.reshape(-1))
      key_pix.append(jnp.full((part_valid.size,), -1))
  keys, key_cls = jnp.concatenate(keys), jnp.concatenate(key_cls)
  key_ok, key_pix = jnp.concatenate(key_ok), jnp.concatenate(key_pix)
  sim = anchors @ keys.T  # [A, N]: the full matrix
  same = a_cls[:, None] == key_cls[None, :]
  a_ok = valid.reshape(-1)[:, None]
  pos_ok = same & key_ok[None, :] & (key_pix[None, :] != index.reshape(-1)[:, None]) & a_ok
  neg_ok = ~same & key_ok[None, :] & a_ok
  rng_pos, rng_neg = jax.random.split(rng_mine)
  pos_sel = sampling.mine_mask(sim, pos_ok, rng_pos, num=s.num_positives, mode=s.mining,
                               harder="low", fraction=s.semi_hard_fraction, top_k=s.top_k,
                               at_least_num=s.semi_hard_at_least_k)
  neg_sel = sampling.mine_mask(sim, neg_ok, rng_neg, num=s.num_negatives, mode=s.mining,
                               harder="high", fraction=s.semi_hard_fraction, top_k=s.top_k,
                               at_least_num=s.semi_hard_at_least_k)
  per_anchor, ok = loss_lib.eq3_anchor_loss(sim, pos_sel, sim, neg_sel, s.temperature)
  ok &= valid.reshape(-1)
  loss = jnp.sum(jnp.where(ok, per_anchor, 0.0)) / jnp.maximum(jnp.sum(ok), 1)
  return loss, {"num_valid_anchors": jnp.sum(ok).astype(jnp.float32)}


def _specs(*, batch, h, w, dim, num_classes, pixel_queue, num_images):
  f32, i32 = jnp.float32, jnp.int32
  sds = jax.ShapeDtypeStruct
  memory = memory_lib.MemoryBank(
      pixel_keys=sds((num_classes, pixel_queue, dim), f32),
      pixel_valid=sds((num_classes, pixel_queue), bool), pixel_ptr=sds((num_classes,), i32),
      region_keys=sds((num_classes, num_images, dim), f32),
      region_valid=sds((num_classes, num_images), bool), region_ptr=sds((num_classes,), i32),
      region_mode="indexed")
  return (sds((batch, h, w, dim), f32), sds((batch, h, w), i32), sds((batch, h, w), i32),
          sds((batch,), i32), memory, jax.random.key(0))


def _value_and_grad(fn, settings):
  f = functools.partial(fn, settings=settings)
  return jax.jit(jax.value_and_grad(f, has_aux=True))


def _analyse(fn, settings, args):
  compiled = _value_and_grad(fn, settings).lower(*args).compile()
  mem = compiled.memory_analysis()
  return int(mem.temp_size_in_bytes), xla_cost.flops(compiled)


def train_step_flops(batch: int = 2, height: int = 512, width: int = 1024) -> float:
  """FLOPs of value_and_grad(CE) of HRNet-W48 + projection head in train mode (lazy import)."""
  from pixcon_jax import models  # pylint: disable=g-import-not-at-top
  model = models.build_model("hrnet_w48_contrast", num_classes=19)
  image = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0), "dropout": jax.random.key(1)},
      jnp.zeros((1, 64, 64, 3), jnp.float32), train=False))
  label = jax.ShapeDtypeStruct((batch, height, width), jnp.int32)

  def ce(params, batch_stats, image, label):
    out, _ = model.apply({"params": params, "batch_stats": batch_stats}, image, train=True,
                         mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
    logits = out["logits"]
    logits = jax.image.resize(logits, (batch, height, width, logits.shape[-1]), "bilinear")
    logp = jax.nn.log_softmax(logits)
    ok = label != 255
    nll = -jnp.take_along_axis(logp, jnp.where(ok, label, 0)[..., None], -1)[..., 0]
    return jnp.sum(jnp.where(ok, nll, 0.0)) / jnp.maximum(jnp.sum(ok), 1)

  compiled = jax.jit(jax.value_and_grad(ce)).lower(
      variables["params"], variables["batch_stats"], image, label).compile()
  return xla_cost.flops(compiled)


def _random_inputs(rng, *, batch, h, w, dim, num_classes, pixel_queue, num_images):
  k = jax.random.split(rng, 6)
  emb = jax.random.normal(k[0], (batch, h, w, dim))
  emb = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
  # Blocky labels (like segments) with some ignore.
  coarse = jax.random.randint(k[1], (batch, h // 8, w // 8), 0, num_classes)
  label = jnp.repeat(jnp.repeat(coarse, 8, 1), 8, 2)
  label = jnp.where(jax.random.uniform(k[2], label.shape) < 0.05, 255, label)
  predict = jnp.where(jax.random.uniform(k[3], label.shape) < 0.2,
                      jax.random.randint(k[4], label.shape, 0, num_classes), label % 255)
  memory = memory_lib.init_memory(num_classes=num_classes, dim=dim, pixel_queue_size=pixel_queue,
                                  region_mode="indexed", num_images=num_images)
  km = jax.random.split(k[5], 3)
  pk = jax.random.normal(km[0], memory.pixel_keys.shape)
  rk = jax.random.normal(km[1], memory.region_keys.shape)
  memory = memory.replace(
      pixel_keys=pk / jnp.linalg.norm(pk, axis=-1, keepdims=True),
      pixel_valid=jnp.ones(memory.pixel_valid.shape, bool),
      region_keys=rk / jnp.linalg.norm(rk, axis=-1, keepdims=True),
      region_valid=jax.random.uniform(km[2], memory.region_valid.shape) < 0.8)
  return emb, label, predict, jnp.arange(batch, dtype=jnp.int32), memory, rng


def pod_scaling(*, batch_per_device: int = 2, h: int = 128, w: int = 256, dim: int = 256,
                num_classes: int = 19, num_images: int = 2975) -> dict[str, float]:
  """The global-batch contrast (loss + gradient w.r.t. the embeddings, as inside the train step's
  shard_map) at paper settings compiled on 1 and on 8 devices, `batch_per_device` images each.

  Needs a process with 8 devices (the bench runs it in a child with 8 fake CPU devices).
  Returns `contrast_collective_bytes_{1,8}dev` (bytes of collective results per device per step,
  `xla_cost.collective_bytes`, from the compiled program with the class loop rolled) and
  `contrast_flops_per_device_{1,8}dev` (XLA cost analysis with the class loop unrolled).
  """
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  # The paper's mining, and the mini-batch in the contrast set too (the larger, split case).
  settings = loss_lib.ContrastSettings(mining="semi_hard", sources=loss_lib.SOURCES)
  out = {}
  for n in (1, 8):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ("data",))
    args = _specs(batch=batch_per_device * n, h=h, w=w, dim=dim, num_classes=num_classes,
                  pixel_queue=10 * num_images, num_images=num_images)
    for unroll in (False, True):
      s = dataclasses.replace(settings, unroll=unroll)

      def local(e, l, p, i, m, k, s=s):
        f = lambda e: loss_lib.pixel_contrast_loss(e, l, p, i, m, k, settings=s,
                                                   axis_name="data")
        (loss, _), grad = jax.value_and_grad(f, has_aux=True)(e)
        return loss, grad

      fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"),) * 4 + (P(), P()),
                                 out_specs=(P(), P("data"))))
      compiled = fn.lower(*args).compile()
      if unroll:
        out[f"contrast_flops_per_device_{n}dev"] = xla_cost.flops(compiled)
      else:
        out[f"contrast_collective_bytes_{n}dev"] = xla_cost.collective_bytes(compiled.as_text())
  out["contrast_collective_mib_8dev"] = out["contrast_collective_bytes_8dev"] / 2 ** 20
  out["contrast_flops_8dev_over_1dev"] = (out["contrast_flops_per_device_8dev"]
                                          / out["contrast_flops_per_device_1dev"])
  return out


def _pod_scaling_in_child() -> dict[str, float]:
  """Runs `pod_scaling` in a child process with 8 fake CPU devices; returns its dict."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip())
  proc = subprocess.run([sys.executable, __file__, "--pod_worker"], env=env, capture_output=True,
                        text=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"pod scaling worker failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _time(fn, args, repeats):
  out = fn(*args)
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats, out


def selection_times(settings, *, num_classes: int, repeats: int) -> dict[str, dict[str, float]]:
  """Seconds of the mining's top-k selection alone on its shapes (all anchors x each pool, k = K,
  one class block of anchors at a time as in the loss): `lax.top_k` and the bisection mask."""
  a = settings.anchors_per_class
  out = {}
  for name, pool, k in (("positives", settings.positive_pool, settings.num_positives),
                        ("negatives", settings.negative_pool, settings.num_negatives)):
    x = jax.random.normal(jax.random.key(3), (num_classes, a, pool))
    valid = jnp.ones(x.shape, bool)
    times = {}
    for impl in ("sort", "bisect"):
      fn = jax.jit(lambda v, ok, k=k, impl=impl: jax.lax.map(
          lambda b: sampling.top_k_mask(b[0], b[1], k, impl=impl), (v, ok)))
      times["lax_top_k" if impl == "sort" else impl], _ = _time(fn, (x, valid), repeats)
    out[f"{name} [{num_classes * a}, {pool}] k={k}"] = times
  return out


def projection_head_times(*, batch: int = 2, h: int = 64, w: int = 128, channels: int = 720,
                          dim: int = 256, repeats: int = 3) -> dict[str, float]:
  """Seconds of HRNet-W48's projection head (convmlp 720 -> 720 -> 256, train-mode BN) on the
  embedding grid of `bench_train.py`'s default crop (2 x 256x512 -> 64x128): forward alone (the
  CE-only step runs it too) and forward + backward (what contrast adds is the difference)."""
  from pixcon_jax.models.projection import ProjectionHead  # pylint: disable=g-import-not-at-top
  head = ProjectionHead(proj_dim=dim)
  x = jax.random.normal(jax.random.key(0), (batch, h, w, channels))
  variables = head.init(jax.random.key(1), x[:1, :8, :8], train=False)
  weight = jax.random.normal(jax.random.key(2), (batch, h, w, dim))

  def loss(params, x):
    y, _ = head.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                      train=True, mutable=["batch_stats"])
    return jnp.sum(y * weight)

  forward, _ = _time(jax.jit(loss), (variables["params"], x), repeats)
  both, _ = _time(jax.jit(jax.grad(loss, argnums=(0, 1))), (variables["params"], x), repeats)
  return {"grid": [batch, h, w, channels], "forward_s": forward, "forward_backward_s": both,
          "backward_s": both - forward}


def _log(msg):
  print(f"[bench_contrast {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv=None):
  parser = cli.ArgumentParser()
  parser.add_argument("--skip_train_step", action="store_true")
  parser.add_argument("--skip_naive_paper", action="store_true")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--only_pod", action="store_true",
                      help="only the 1- vs 8-device collective bytes and FLOPs")
  parser.add_argument("--pod_worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--no_hugepages", action="store_true",
                      help="keep glibc's default malloc (see pixcon_jax/cpu/host_memory.py)")
  parser.add_argument("--no_tune_xla_cpu", action="store_true",
                      help="keep XLA:CPU's YNNPACK dots and default schedule "
                           "(pixcon_jax/cpu/xla_flags.py)")
  flags = parser.parse_args(argv)
  if flags.pod_worker:
    print(json.dumps(pod_scaling()))
    return
  if not flags.no_tune_xla_cpu:
    xla_flags.use_tuned_flags()
  if not flags.no_hugepages:
    host_memory.reexec_with_hugepages([sys.executable, *sys.argv])
  result = {"backend": jax.default_backend(),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}
  _log("compiling the global-batch contrast on 1 and 8 devices (child process)")
  result.update(_pod_scaling_in_child())
  if flags.only_pod:
    print(json.dumps(result))
    return
  num_images = 2975
  paper = dict(batch=2, h=128, w=256, dim=256, num_classes=19, pixel_queue=10 * num_images,
               num_images=num_images)
  settings = loss_lib.ContrastSettings(mining="semi_hard", sources=loss_lib.SOURCES)
  result["settings"] = {k: (list(v) if isinstance(v, tuple) else v)
                        for k, v in dataclasses.asdict(settings).items()}
  args = _specs(**paper)
  _log("compiling loss+grad at paper settings (rolled: memory)")
  result["temp_bytes"], result["flops_rolled_loop_counted_once"] = _analyse(
      loss_lib.pixel_contrast_loss, settings, args)
  _log(f"temp_bytes={result['temp_bytes']}; compiling unrolled (cost analysis)")
  result["unrolled_temp_bytes"], result["flops"] = _analyse(
      loss_lib.pixel_contrast_loss, dataclasses.replace(settings, unroll=True), args)
  _log(f"flops={result['flops']:.4g}")
  if not flags.skip_naive_paper:
    _log("compiling naive full-matrix reference at paper settings")
    result["naive_temp_bytes"], result["naive_flops"] = _analyse(
        naive_contrast_loss, settings, args)
    _log(f"naive temp={result['naive_temp_bytes']} flops={result['naive_flops']:.4g}")
  if not flags.skip_train_step:
    _log("compiling HRNet-W48 train step (2 x 512x1024)")
    try:
      result["train_step_flops"] = train_step_flops()
      result["contrast_flop_share"] = result["flops"] / result["train_step_flops"]
    except Exception as e:  # pylint: disable=broad-except
      result["train_step_flops"] = None
      result["train_step_error"] = f"{type(e).__name__}: {e}"[:300]

  _log("timing at paper settings with a full bank, and the mining's selection alone")
  inputs = _random_inputs(jax.random.key(2), **paper)
  result["time_paper_loss_grad_s"], _ = _time(
      _value_and_grad(loss_lib.pixel_contrast_loss, settings), inputs, flags.repeats)
  result["time_selection_s"] = selection_times(settings, num_classes=paper["num_classes"],
                                               repeats=flags.repeats)

  result["time_projection_head_s"] = projection_head_times(repeats=flags.repeats)

  _log("timing at reduced bank size")
  # Timing at a reduced bank that the naive form can run on this host.
  small = dict(paper, pixel_queue=2000, num_images=200)
  result["timing_config"] = dict(small, note="reduced bank (T=2000, N=200) so the naive full "
                                 "matrix fits on CPU; other settings as in the paper")
  inputs = _random_inputs(jax.random.key(1), **small)
  ours = _value_and_grad(loss_lib.pixel_contrast_loss, settings)
  naive = _value_and_grad(naive_contrast_loss, settings)
  t_ours, _ = _time(ours, inputs, flags.repeats)
  t_naive, _ = _time(naive, inputs, flags.repeats)
  result["time_loss_grad_s"] = t_ours
  result["time_naive_loss_grad_s"] = t_naive
  result["time_ratio_naive_over_ours"] = t_naive / t_ours
  # Exactness check: pools cover the whole reduced bank, deterministic 'hardest' mining.
  # Batch 2x128x256 = 65536 pixels and a bank of 19 x (2000 + 200): pools of 2 x 65536 cover the
  # batch ([C, P] positives, P negatives) and memory (T + R per class; 19 (T + R) = 41800).
  exact = dataclasses.replace(settings, mining="hardest", positive_pool=131072,
                              negative_pool=131072, batch_pool_fraction=0.5)
  l_ours = float(_value_and_grad(loss_lib.pixel_contrast_loss, exact)(*inputs)[0][0])
  l_naive = float(_value_and_grad(naive_contrast_loss, exact)(*inputs)[0][0])
  result["naive_match_abs_diff"] = abs(l_ours - l_naive)
  print(json.dumps(result))


if __name__ == "__main__":
  main(sys.argv[1:])
