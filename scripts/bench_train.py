"""Benchmarks the train step: CE only, the official recipe's contrast and the paper recipe's.

Three variants, all compiled first, then their steps alternate (CE, official, paper, CE, ...) so
that a shared machine's drift weighs on all alike:
  ce        CE only (the `*_contrast` model still runs its projection head forward, for the
            embedding-health metrics, as the official model does in every forward pass);
  official  CE + 0.1 x the official recipe's in-batch contrast (`--arg=official`, after its
            warm-up): like for like with the official PyTorch step;
  paper     CE + the paper recipe's contrast (pixel and region memory, K = 1024 / 2048; a full
            memory bank, as in training once the bank fills).
Prints one JSON line: per variant the compile seconds, median step seconds after warm-up, XLA's
FLOPs of the compiled step and peak memory; then each contrast variant's overheads over CE, in
time and in FLOPs, and `overhead_over_flop_overhead` (time overhead / FLOP overhead) of the
paper recipe: 1.0 means the contrast's work runs at the rate of the rest of the step.

FLOPs: XLA counts a while loop's body once, so the paper loss's class loop is under-counted in the
step that runs; the FLOPs of each contrast variant are read from a second compile of the same
step with the class loop unrolled (`contrast.unroll`; `flops_loop_body_once` keeps the rolled
count). Loops of unknown trip count (the bisections of the mining's top-k) still count once.

With `--official_repo` (a checkout of tfzhou/ContrastiveSeg) and `--torch_python` (an
interpreter with PyTorch), the official PyTorch step is timed first, on the same machine and
settings (`scripts/bench_official_torch.py`), and the line also holds its times and our speed-up
over it like for like (`like_for_like`: CE vs its CE, our official recipe vs its contrast step;
> 1 when ours is faster), and the paper recipe's against its contrast step.

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

from pixcon_jax import cli

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
VARIANTS = ("ce", "official", "paper")
JSON_KEYS = {"ce": "ce", "official": "official_recipe", "paper": "paper_recipe"}
flags.DEFINE_list("variants", list(VARIANTS), "Which variants to time: ce (CE only), official "
                  "(the official recipe's contrast), paper (the paper recipe's contrast).")
flags.register_validator("variants", lambda v: bool(v) and set(v) <= set(VARIANTS),
                         "--variants must be a non-empty list of ce, official, paper")
flags.DEFINE_bool("count_unrolled", True, "Count the paper recipe's FLOPs on a second compile "
                  "with the loss's class loop unrolled (XLA counts a loop body once).")
flags.DEFINE_string("conv_impl", "auto", "config.model.conv_impl: auto | xla | matmul | winograd.")
flags.DEFINE_string("official_repo", None, "Checkout of tfzhou/ContrastiveSeg to time as baseline.")
flags.DEFINE_string("torch_python", None, "Python interpreter with PyTorch for the baseline.")
flags.DEFINE_bool("hugepages", True, "Restart with glibc's malloc on transparent huge pages, as "
                  "`python -m pixcon_jax.main` does (pixcon_jax/cpu/host_memory.py).")
flags.DEFINE_bool("tune_xla_cpu", True, "Run XLA:CPU's dots on Eigen and its thunks in memory "
                  "order, as `python -m pixcon_jax.main` does (pixcon_jax/cpu/xla_flags.py).")
flags.DEFINE_bool("full_memory", True, "Time the contrast step with a full memory bank (random "
                  "unit keys), as in training after the bank fills, not the empty initial one.")
FLAGS = flags.FLAGS


def bench_official(h: int, w: int) -> dict:
  """Runs scripts/bench_official_torch.py in a subprocess and returns its JSON line."""
  # Its CE step is the baseline of ours, its contrast step that of both our recipes.
  official_variants = (["ce"] if "ce" in FLAGS.variants else []) + (
      ["contrast"] if {"official", "paper"} & set(FLAGS.variants) else [])
  cmd = [FLAGS.torch_python or sys.executable, str(REPO / "scripts" / "bench_official_torch.py"),
         f"--official_repo={FLAGS.official_repo}", f"--batch={FLAGS.batch}",
         "--crop", str(h), str(w), f"--steps={FLAGS.steps}", f"--warmup={FLAGS.warmup}",
         f"--variants={','.join(official_variants)}"]
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


def variant_config(variant: str):
  """The config of one variant: `--config` with `--arg` (plus 'official' for the official
  recipe) and the bench's flags."""
  words = [w for w in (FLAGS.arg or "").split(",") if w]
  if variant == "official":
    words.append("official")
  config = importlib.import_module(f"configs.{FLAGS.config}").get_config(",".join(words) or None)
  config.model.name = FLAGS.model
  config.model.dtype = FLAGS.dtype
  config.model.conv_impl = FLAGS.conv_impl
  config.data.batch_size = FLAGS.batch
  config.data.crop_size = tuple(int(v) for v in FLAGS.crop)
  config.contrast.enabled = variant != "ce"
  # The official step is timed after its warm-up (lambda = 0.1); ours computes the loss during
  # the warm-up too (times lambda = 0), but a step past it is what is compared.
  config.contrast.warmup_steps = 0
  return config


def compile_step(config, exp, state, batch):
  """(compiled step, compile seconds)."""
  from pixcon_jax import train_step as ts  # pylint: disable=g-import-not-at-top
  step = ts.make_train_step(config, exp.train_model, exp.tx, exp.mesh)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  return compiled, time.perf_counter() - t0


def prepare(variant: str):
  """Compiles one variant's step; returns (compiled, state, batch, report without times)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from pixcon_jax import setup, sharding  # pylint: disable=g-import-not-at-top
  from pixcon_jax import train_step as ts  # pylint: disable=g-import-not-at-top
  config = variant_config(variant)
  exp = setup.for_training(config)
  h, w = config.data.crop_size
  state = ts.create_train_state(
      config, exp.train_model, exp.tx, exp.mesh, image_shape=(h, w, 3),
      num_classes=config.model.num_classes, num_train_images=exp.num_train_images,
      rng=jax.random.PRNGKey(0))
  if FLAGS.full_memory and state.memory is not None:
    # The mining's top_k costs more on valid entries than on masked ones: time the steady state.
    state = state.replace(memory=_full_memory(state.memory, sharding.replicated(exp.mesh)))
  rng = np.random.default_rng(0)
  b = config.data.batch_size
  batch = sharding.host_local_to_global({
      "image": rng.normal(size=(b, h, w, 3)).astype(np.float32),
      "label": rng.integers(0, config.model.num_classes, (b, h, w)).astype(np.int32),
      "image_id": np.arange(b, dtype=np.int32)}, exp.mesh)
  compiled, compile_s = compile_step(config, exp, state, batch)
  mem = compiled.memory_analysis()
  peak = None
  if mem is not None:
    peak = int(getattr(mem, "temp_size_in_bytes", 0) + getattr(mem, "argument_size_in_bytes", 0)
               + getattr(mem, "output_size_in_bytes", 0) - getattr(mem, "alias_size_in_bytes", 0))
  report = {"compile_s": round(compile_s, 2), "xla_peak_bytes": peak,
            "xla_flops": xla_cost.flops(compiled)}
  if variant == "paper" and FLAGS.count_unrolled:
    # XLA counts a while loop's body once: count the paper loss's class loop on an unrolled copy.
    config.contrast.unroll = True
    unrolled, _ = compile_step(config, exp, state, batch)
    report.update(xla_flops=xla_cost.flops(unrolled), xla_flops_loop_body_once=report["xla_flops"])
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


def overheads(results: dict) -> dict:
  """Each contrast variant's overhead over CE, in step time and in XLA FLOPs, and their ratio."""
  out = {}
  if "ce" not in results:
    return out
  ce = results["ce"]
  for variant in ("official", "paper"):
    if variant in results:
      r = results[variant]
      time_overhead = r["step_s"] / ce["step_s"] - 1
      flop_overhead = r["xla_flops"] / ce["xla_flops"] - 1
      out[f"{JSON_KEYS[variant]}_overhead"] = {
          "time": round(time_overhead, 4), "flops": round(flop_overhead, 4),
          "overhead_over_flop_overhead": round(time_overhead / flop_overhead, 3)
                                         if flop_overhead > 0 else None}
  if "paper" in results:
    out["overhead_over_flop_overhead"] = out["paper_recipe_overhead"][
        "overhead_over_flop_overhead"]
  return out


def against_official(results: dict, official: dict) -> dict:
  """Speed-ups over the official PyTorch step (> 1 when ours is faster)."""
  speedup = lambda ours, theirs: round(official[theirs]["step_s"] / results[ours]["step_s"], 3)
  like = {}
  if "ce" in results and "ce" in official:
    like["ce_speedup_vs_official"] = speedup("ce", "ce")
  if "official" in results and "contrast" in official:
    like["contrast_speedup_vs_official"] = speedup("official", "contrast")
  out = {"like_for_like": like}
  if "paper" in results and "contrast" in official:
    out["paper_contrast_speedup_vs_official"] = speedup("paper", "contrast")
  return out


def main(argv):
  del argv
  unknown = sorted(set(FLAGS.variants) - set(VARIANTS))
  if unknown:
    raise app.UsageError(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}")
  if "official" in (FLAGS.arg or "").split(","):
    raise app.UsageError("--arg must not contain 'official': the variant 'official' is the official "
                     "recipe and 'paper' the paper's (--variants)")
  if FLAGS.tune_xla_cpu:
    from pixcon_jax.cpu import xla_flags  # pylint: disable=g-import-not-at-top
    xla_flags.use_tuned_flags()
  if FLAGS.hugepages:
    from pixcon_jax.cpu import host_memory  # pylint: disable=g-import-not-at-top
    host_memory.reexec_with_hugepages([sys.executable, *sys.argv])
  import jax  # pylint: disable=g-import-not-at-top
  crop = cli.int_list(FLAGS.crop, "crop", length=2)
  out = {"model": FLAGS.model, "batch": FLAGS.batch, "crop": crop,
         "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
         "xla_flags": os.environ.get("XLA_FLAGS", ""),
         "dtype": FLAGS.dtype, "conv_impl": FLAGS.conv_impl, "devices": jax.device_count(),
         "platform": jax.devices()[0].platform, "cpus": os.cpu_count(),
         "loadavg_1m": os.getloadavg()[0]}
  official = None
  if FLAGS.official_repo and FLAGS.model != "hrnet_w48_contrast":
    raise app.UsageError(f"--official_repo times the official HRNet_W48_CONTRAST only, not "
                     f"--model={FLAGS.model}")
  if FLAGS.official_repo:
    # First, so that both run on the same (otherwise idle) machine one after the other.
    official = bench_official(*crop)
    out["official_pytorch"] = official
  runs = {v: prepare(v) for v in VARIANTS if v in FLAGS.variants}
  results = time_interleaved(runs)
  out.update({JSON_KEYS[v]: r for v, r in results.items()})
  out.update(overheads(results))
  if official:
    out.update(against_official(results, official))
  out["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  cli.run(main)
