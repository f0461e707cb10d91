"""Benchmarks the train step: CE only vs CE + pixel contrast (paper settings, with memory).

Both variants are compiled first, then their steps alternate (CE, contrast, CE, ...) so that
a shared machine's drift weighs on both alike. Prints one JSON line: compile seconds, median
step seconds after warm-up for both, their ratio (the contrast overhead), XLA's FLOP count of
each compiled step and their ratio, and peak memory (XLA's buffer assignment of the compiled
step, plus the process's max RSS).

With `--official_repo` (a checkout of tfzhou/ContrastiveSeg) and `--torch_python` (an
interpreter with PyTorch), the official PyTorch step is timed first, on the same machine and
settings (`scripts/bench_official_torch.py`), and the line also holds its times and our
speed-up over it (`*_speedup_vs_official`, > 1 when ours is faster).

  python scripts/bench_train.py                      # hrnet_w48_contrast, 2 x 256x512, float32
  python scripts/bench_train.py --official_repo=../ContrastiveSeg --torch_python=/venv/bin/python
  python scripts/bench_train.py --model=hrnet_w48_ocr_contrast --dtype=bfloat16 --steps=10
"""
import importlib
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags
import xla_cost  # scripts/xla_cost.py

REPO = pathlib.Path(__file__).resolve().parents[1]

flags.DEFINE_string("config", "cityscapes_hrnet", "Experiment config module in configs/.")
flags.DEFINE_string("model", "hrnet_w48_contrast", "Registered model name.")
flags.DEFINE_integer("batch", 2, "Global batch size.")
flags.DEFINE_list("crop", ["256", "512"], "Crop h,w.")
flags.DEFINE_string("dtype", "float32", "Compute dtype.")
flags.DEFINE_integer("steps", 5, "Timed steps (median reported).")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.register_validator("steps", lambda n: n >= 1, "--steps must be >= 1 (the median needs a time)")
flags.register_validator("warmup", lambda n: n >= 0, "--warmup must be >= 0")
flags.DEFINE_string("arg", None, "get_config arg (e.g. 'runlocal' for a smoke run).")
flags.DEFINE_list("variants", ["ce", "contrast"], "Which variants to time.")
flags.register_validator("variants", lambda v: bool(v) and set(v) <= {"ce", "contrast"},
                         "--variants must be a non-empty list of ce, contrast")
flags.DEFINE_string("conv_impl", "auto", "config.model.conv_impl: auto | xla | matmul | winograd.")
flags.DEFINE_string("official_repo", None, "Checkout of tfzhou/ContrastiveSeg to time as baseline.")
flags.DEFINE_string("torch_python", None, "Python interpreter with PyTorch for the baseline.")
flags.DEFINE_bool("hugepages", True, "Restart with glibc's malloc on transparent huge pages, as "
                  "`python -m pixcon_jax.main` does (pixcon_jax/cpu/host_memory.py).")
flags.DEFINE_bool("eigen_dots", True, "Run XLA:CPU's dots on Eigen instead of YNNPACK, as "
                  "`python -m pixcon_jax.main` does (pixcon_jax/cpu/xla_flags.py).")
flags.DEFINE_bool("full_memory", True, "Time the contrast step with a full memory bank (random "
                  "unit keys), as in training after the bank fills, not the empty initial one.")
FLAGS = flags.FLAGS


def bench_official(h: int, w: int) -> dict:
  """Runs scripts/bench_official_torch.py in a subprocess and returns its JSON line."""
  cmd = [FLAGS.torch_python or sys.executable, str(REPO / "scripts" / "bench_official_torch.py"),
         f"--official_repo={FLAGS.official_repo}", f"--batch={FLAGS.batch}",
         "--crop", str(h), str(w), f"--steps={FLAGS.steps}", f"--warmup={FLAGS.warmup}",
         f"--variants={','.join(FLAGS.variants)}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    raise SystemExit(f"official baseline failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
  return json.loads(lines[-1])


def _full_memory(memory, replicated):
  """`memory` with every pixel-queue and region slot valid, holding random unit keys."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  k_pixel, k_region = jax.random.split(jax.random.PRNGKey(1))

  def unit(key, shape):
    v = jax.random.normal(key, shape)
    return jax.device_put(v / jnp.linalg.norm(v, axis=-1, keepdims=True), replicated)

  return memory.replace(
      pixel_keys=unit(k_pixel, memory.pixel_keys.shape),
      pixel_valid=jax.device_put(jnp.ones_like(memory.pixel_valid), replicated),
      region_keys=unit(k_region, memory.region_keys.shape),
      region_valid=jax.device_put(jnp.ones_like(memory.region_valid), replicated))


def prepare(config, contrast: bool):
  """Compiles one variant's step; returns (compiled, state, batch, report without times)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from pixcon_jax import setup, sharding  # pylint: disable=g-import-not-at-top
  from pixcon_jax import train_step as ts  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.contrast.enabled = contrast
  exp = setup.for_training(config)
  h, w = config.data.crop_size
  state = ts.create_train_state(
      config, exp.train_model, exp.tx, exp.mesh, image_shape=(h, w, 3),
      num_classes=config.model.num_classes, num_train_images=exp.num_train_images,
      rng=jax.random.PRNGKey(0))
  if contrast and FLAGS.full_memory and state.memory is not None:
    # The mining's top_k costs more on valid entries than on masked ones: time the steady state.
    state = state.replace(memory=_full_memory(state.memory, sharding.replicated(exp.mesh)))
  rng = np.random.default_rng(0)
  b = config.data.batch_size
  batch = sharding.host_local_to_global({
      "image": rng.normal(size=(b, h, w, 3)).astype(np.float32),
      "label": rng.integers(0, config.model.num_classes, (b, h, w)).astype(np.int32),
      "image_id": np.arange(b, dtype=np.int32)}, exp.mesh)
  step = ts.make_train_step(config, exp.train_model, exp.tx, exp.mesh)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  peak = None
  if mem is not None:
    peak = int(getattr(mem, "temp_size_in_bytes", 0) + getattr(mem, "argument_size_in_bytes", 0)
               + getattr(mem, "output_size_in_bytes", 0) - getattr(mem, "alias_size_in_bytes", 0))
  # XLA counts a while loop's body once: the contrast loss's class loop is under-counted, the
  # networks (projection head included) are not.
  report = {"compile_s": round(compile_s, 2), "xla_peak_bytes": peak,
            "xla_flops": xla_cost.flops(compiled)}
  return compiled, state, batch, report


def time_interleaved(runs: dict) -> dict:
  """Times the compiled variants' steps in turn (a, b, a, b, ...) so that the machine's drift
  (shared CPUs: +-30% over minutes here) weighs on all variants alike.

  Args: runs: variant -> (compiled, state, batch, report). Returns variant -> report with
  `step_s` (median), `step_s_all` and the last `loss`.
  """
  import jax  # pylint: disable=g-import-not-at-top
  states = {v: r[1] for v, r in runs.items()}
  times = {v: [] for v in runs}
  metrics = {}
  for i in range(FLAGS.warmup + FLAGS.steps):
    for v, (compiled, _, batch, _) in runs.items():
      t = time.perf_counter()
      states[v], metrics[v] = compiled(states[v], batch)
      jax.block_until_ready(states[v])
      if i >= FLAGS.warmup:
        times[v].append(time.perf_counter() - t)
  return {v: {**runs[v][3], "step_s": round(statistics.median(times[v]), 4),
              "step_s_all": [round(t, 4) for t in times[v]],
              "loss": float(metrics[v]["loss"])} for v in runs}


def main(argv):
  del argv
  if FLAGS.eigen_dots:
    from pixcon_jax.cpu import xla_flags  # pylint: disable=g-import-not-at-top
    xla_flags.use_eigen_dots()
  if FLAGS.hugepages:
    from pixcon_jax.cpu import host_memory  # pylint: disable=g-import-not-at-top
    host_memory.reexec_with_hugepages([sys.executable, *sys.argv])
  import jax  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"configs.{FLAGS.config}").get_config(FLAGS.arg)
  config.model.name = FLAGS.model
  config.model.dtype = FLAGS.dtype
  config.model.conv_impl = FLAGS.conv_impl
  config.data.batch_size = FLAGS.batch
  config.data.crop_size = tuple(int(v) for v in FLAGS.crop)
  out = {"model": FLAGS.model, "batch": FLAGS.batch, "crop": list(config.data.crop_size),
         "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
         "xla_flags": os.environ.get("XLA_FLAGS", ""),
         "dtype": FLAGS.dtype, "conv_impl": FLAGS.conv_impl, "devices": jax.device_count(),
         "platform": jax.devices()[0].platform, "cpus": os.cpu_count(),
         "loadavg_1m": os.getloadavg()[0]}
  official = None
  if FLAGS.official_repo and FLAGS.model != "hrnet_w48_contrast":
    raise SystemExit(f"--official_repo times the official HRNet_W48_CONTRAST only, not "
                     f"--model={FLAGS.model}")
  if FLAGS.official_repo:
    # First, so that both run on the same (otherwise idle) machine one after the other.
    official = bench_official(*config.data.crop_size)
    out["official"] = official
  runs = {v: prepare(config, contrast=v == "contrast") for v in FLAGS.variants}
  results = time_interleaved(runs)
  out.update(results)
  if "ce" in results and "contrast" in results:
    out["contrast_over_ce"] = round(results["contrast"]["step_s"] / results["ce"]["step_s"], 4)
    out["contrast_overhead_pct"] = round(100 * (out["contrast_over_ce"] - 1), 2)
    out["contrast_flops_over_ce"] = round(results["contrast"]["xla_flops"] /
                                          results["ce"]["xla_flops"], 4)
  if official:
    for variant in results:
      out[f"{variant}_speedup_vs_official"] = round(
          official[variant]["step_s"] / results[variant]["step_s"], 3)
  out["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  app.run(main)
