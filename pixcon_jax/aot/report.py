"""Compiles the real train and eval steps for a mesh of compile-only devices, and reads the result.

`train_step_report` / `eval_step_report` build the experiment for the mesh (`setup.for_training`),
compile the steps exactly as training and evaluation run them, and return per-device memory
(XLA's `memory_analysis`: arguments, outputs, temporaries, aliased (donated) bytes, generated
code; peak = arguments + outputs + temporaries - aliased), FLOPs per device and `hlo_checks` of
the compiled program. FLOPs are XLA's count of one device's program (`device_flops`) with the
contrast's class loop unrolled (`contrast.unroll`, as `scripts/bench_train.py` counts: XLA
counts a loop body once).
"""
from __future__ import annotations

import copy
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from pixcon_jax import evaluate as evaluate_lib
from pixcon_jax import setup
from pixcon_jax import sharding
from pixcon_jax import train_step as train_step_lib

# Custom calls a compiled step may contain, per platform; anything else is reported.
# CUDA: cuDNN convolutions, cuBLAS / cuBLASLt GEMMs, and XLA's own GPU kernels (Triton, top-k, PRNG).
# TPU: the compiler's own markers and kernels found in the compiled steps (buffers, in-bounds
# gather/scatter indices, async collectives, layout-free concat / crop, the mining's top-k),
# nothing that leaves the chip.
ALLOWED_CUSTOM_CALLS = {
    "tpu": re.compile(r"^(AllocateBuffer|AssumeGatherIndicesInBound|GatherScatterIndicesBitpacked|"
                      r"AsyncCollectiveStart|AsyncCollectiveDone|ConcatBitcast|ZeroCrop|TopK|"
                      r"Sharding|SPMDFullToShardShape|SPMDShardToFullShape|tpu_custom_call)$"),
    "cuda": re.compile(r"^(__cudnn\$conv\w*|__cublas\$\w+|__cublas\$lt\$\w+|"
                       r"__triton\w*|__gpu\$xla\.gpu\.triton|__gpu\$TopK|cu_threefry2x32\w*)$"),
}
# Options of the compile per platform. CUDA: with no GPU to autotune on, XLA's Triton GEMM
# emitter fails on some small dots of the demo model ("Couldn't find output tile sizes" for the
# [96, 8] align-corners resize matrix); cuBLAS takes the dots instead.
COMPILER_OPTIONS = {"tpu": {}, "cuda": {"xla_gpu_enable_triton_gemm": False}}
# Host round trips: any of these stalls the step on the host (and fails on a remote TPU worker).
HOST_TRANSFER = re.compile(
    r"is_host_transfer=true|\b(send|recv|send-done|recv-done|infeed|outfeed)\(|"
    r"custom_call_target=\"[^\"]*(callback|xla_python|host)[^\"]*\"", re.IGNORECASE)
_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')
_CONV_LINE = re.compile(r"=\s*\(?([a-z0-9]+)\[[^\n]*?\b(convolution\(|custom_call_target=\"__cudnn\$conv)")
_PRECISION = re.compile(r"operand_precision=\{([a-z_,]+)\}|\"operand_precision\":\[([^\]]*)\]")


def hlo_checks(text: str, platform: str, num_kernels: int) -> dict[str, Any]:
  """What the compiled HLO says about the step.

  Args:
    text: `compiled.as_text()` (after XLA's passes: fusions, cuDNN rewrites).
    platform: "tpu" or "cuda" (the custom-call allow-list).
    num_kernels: the model's 4-D conv kernels; each has at least a forward and a weight-gradient
      convolution in a train step (the eval step: pass 0, and at least one conv is asked).
  Returns:
    `native_convolutions` (convolution ops and cuDNN conv calls), `conv_result_dtypes` (count
    per dtype), `host_transfers` (matching lines, none expected), `custom_calls` (count per
    target), `disallowed_custom_calls`, `matmul_precision` (operand precisions found on convs
    and dots, count per value, absent = "default"), and `ok` with `problems`.
  """
  conv_dtypes: dict[str, int] = {}
  for dtype, _ in _CONV_LINE.findall(text):
    conv_dtypes[dtype] = conv_dtypes.get(dtype, 0) + 1
  convs = sum(conv_dtypes.values())
  calls: dict[str, int] = {}
  for name in _CUSTOM_CALL.findall(text):
    calls[name] = calls.get(name, 0) + 1
  allowed = ALLOWED_CUSTOM_CALLS[platform]
  disallowed = sorted(c for c in calls if not allowed.match(c))
  host = sorted({m.group(0) for m in HOST_TRANSFER.finditer(text)})
  precisions: dict[str, int] = {}
  for hlo_style, json_style in _PRECISION.findall(text):
    names = hlo_style or json_style.replace('"', "")
    value = ",".join(sorted({n.strip().lower() for n in names.split(",") if n.strip()}))
    precisions[value] = precisions.get(value, 0) + 1
  problems = []
  if convs < max(1, 2 * num_kernels):
    problems.append(f"{convs} native convolutions for {num_kernels} conv kernels")
  if host:
    problems.append(f"host transfers or callbacks: {host}")
  if disallowed:
    problems.append(f"custom calls outside the allow-list: {disallowed}")
  return {"native_convolutions": convs, "conv_result_dtypes": conv_dtypes,
          "host_transfers": host, "custom_calls": calls, "disallowed_custom_calls": disallowed,
          "matmul_precision": precisions or {"default": 0}, "ok": not problems,
          "problems": problems}


def memory(compiled: Any, hbm_bytes: int) -> dict[str, Any]:
  """Per-device bytes of a compiled step against one device's HBM."""
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0)
         for k in ("argument", "output", "temp", "alias", "generated_code")}
  peak = out["argument"] + out["output"] + out["temp"] - out["alias"] + out["generated_code"]
  out = {f"{k}_bytes": v for k, v in out.items()}
  out.update(peak_bytes=peak, hbm_bytes=int(hbm_bytes),
             peak_fraction_of_hbm=round(peak / hbm_bytes, 4), fits=peak <= hbm_bytes)
  return out


def _flops(lowered: Any) -> float | None:
  """XLA's FLOP count of a program lowered for the CPU (compile-only clients give none)."""
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  value = (cost or {}).get("flops")
  return None if value is None else float(value)


def _batch_specs(mesh: Mesh, batch: int, hw: tuple[int, int]) -> dict[str, jax.ShapeDtypeStruct]:
  data = sharding.data_sharded(mesh)
  h, w = hw
  return {"image": jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32, sharding=data),
          "label": jax.ShapeDtypeStruct((batch, h, w), jnp.int32, sharding=data),
          "image_id": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=data)}


def num_kernels(params: Any) -> int:
  """4-D (conv) kernels among a params tree."""
  return sum(1 for p in jax.tree.leaves(params) if len(p.shape) == 4)


def device_flops(config: ml_collections.ConfigDict,
                 exp: setup.TrainingExperiment) -> tuple[float | None, float | None]:
  """FLOPs of one device's step: (class loop counted once, class loop unrolled).

  The step is `shard_map`-ped, so one device's program is the step on a one-device mesh with
  that device's images; it is lowered for a host CPU device (whose client has XLA's cost
  analysis) with the target's model (`exp.train_model`: native convolutions), not compiled.
  """
  cpu = sharding.make_mesh(jax.devices("cpu")[:1])
  state = train_step_lib.abstract_train_state(
      config, exp.train_model, exp.tx, cpu, image_shape=tuple(config.data.crop_size) + (3,),
      num_classes=config.model.num_classes, num_train_images=exp.num_train_images)
  batch = _batch_specs(cpu, exp.batch_per_device, tuple(config.data.crop_size))
  counts = []
  for unroll in (False, True):
    c = copy.deepcopy(config)
    c.contrast.unroll = unroll
    step = train_step_lib.make_train_step(c, exp.train_model, exp.tx, cpu, donate=False)
    counts.append(_flops(step.trace(state, batch).lower()))
  return counts[0], counts[1]


def train_step_report(config: ml_collections.ConfigDict, mesh: Mesh, *, platform: str,
                      hbm_bytes: int, compile: bool = True) -> dict[str, Any]:
  """Compiles (or only lowers) the train step of `config` for `mesh`.

  Args:
    config: the experiment; `data.batch_size` is global (over the mesh).
    mesh: compile-only devices (`targets.devices`), axis 'data'.
    platform: "tpu" or "cuda".
    hbm_bytes: one device's memory.
    compile: False: lower only (FLOPs and state bytes, no memory analysis or HLO checks).
  Returns:
    `batch_per_device`, `crop`, `state_bytes_per_device`, `flops_per_device` (class loop
    unrolled), `flops_per_device_loop_body_once`, `lower_s`; when compiled also `compile_s`,
    the `memory` fields and `hlo`.
  """
  exp = setup.for_training(config, mesh)
  state = setup.abstract_state(exp)
  crop = tuple(config.data.crop_size)
  batch = _batch_specs(mesh, int(config.data.batch_size), crop)
  t0 = time.perf_counter()
  lowered = train_step_lib.make_train_step(config, exp.train_model, exp.tx, mesh).trace(
      state, batch).lower()
  lower_s = time.perf_counter() - t0
  state_bytes = sum(s.size * jnp.dtype(s.dtype).itemsize for s in jax.tree.leaves(state))
  once, unrolled = device_flops(config, exp)
  out: dict[str, Any] = {
      "batch_per_device": exp.batch_per_device, "crop": list(crop),
      "compute_dtype": str(config.model.dtype),
      "state_bytes_per_device": int(state_bytes),
      "flops_per_device": unrolled, "flops_per_device_loop_body_once": once,
      "lower_s": round(lower_s, 2)}
  if not compile:
    return out
  t0 = time.perf_counter()
  compiled = lowered.compile(compiler_options=COMPILER_OPTIONS[platform] or None)
  out["compile_s"] = round(time.perf_counter() - t0, 2)
  out.update(memory(compiled, hbm_bytes))
  out["hlo"] = hlo_checks(compiled.as_text(), platform, num_kernels(state.params))
  return out


def eval_image_size(config: ml_collections.ConfigDict, exp: setup.Experiment) -> tuple[int, int]:
  """The (h, w) every evaluation image is padded to, as the eval pipeline does."""
  size = (config.data.get("eval_pad_size") or
          (config.data.get("synthetic_size") if config.data.dataset == "synthetic" else None) or
          exp.info.eval_pad_size)
  return tuple(int(v) for v in size)


def eval_step_report(config: ml_collections.ConfigDict, mesh: Mesh, *, platform: str,
                     hbm_bytes: int) -> dict[str, Any]:
  """Compiles the evaluator's steps (each scale's scores, then the confusion matrix) for `mesh`.

  The batch is `data.eval_batch_size` padded to the device count, images at the eval pipeline's
  padded size. Memory is the larger of the two programs'; FLOPs are the scale steps' sum.
  """
  exp = setup.for_inference(config, mesh)
  h, w = eval_image_size(config, exp)
  c = int(config.model.num_classes)
  n = mesh.size
  b = -(-int(config.data.eval_batch_size) // n) * n
  variables = jax.eval_shape(lambda: exp.eval_model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
  variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
  rep, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
  variables = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep),
                           variables)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=data)
  evaluator = evaluate_lib.make_evaluator(config, exp.eval_model, mesh,
                                          class_names=[str(i) for i in range(c)])
  image, scores = spec((b, h, w, 3), jnp.float32), spec((b, h, w, c), jnp.float32)
  t0 = time.perf_counter()
  programs, flops = [], 0.0
  cpu = sharding.make_mesh(jax.devices("cpu")[:1])  # One device's program, for its FLOPs.
  cpu_evaluator = evaluate_lib.make_evaluator(config, exp.eval_model, cpu,
                                              class_names=[str(i) for i in range(c)])
  one = lambda x: jax.ShapeDtypeStruct((b // n,) + x.shape[1:], x.dtype)
  for scale, step in evaluator._scale_steps.items():  # pylint: disable=protected-access
    programs.append(step.trace(variables, image, scores).lower().compile(
        compiler_options=COMPILER_OPTIONS[platform] or None))
    cpu_step = cpu_evaluator._scale_steps[scale]  # pylint: disable=protected-access
    flops += _flops(cpu_step.trace(jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                                                variables), one(image), one(scores)).lower()) or 0.0
  programs.append(evaluator._finish.trace(  # pylint: disable=protected-access
      scores, spec((b, h, w), jnp.int32), spec((b,), jnp.bool_)).lower().compile(
          compiler_options=COMPILER_OPTIONS[platform] or None))
  out: dict[str, Any] = {"batch_per_device": b // n, "image": [h, w],
                         "compile_s": round(time.perf_counter() - t0, 2),
                         "flops_per_device": flops}
  mems = [memory(p, hbm_bytes) for p in programs]
  out.update(max(mems, key=lambda m: m["peak_bytes"]))
  out["hlo"] = hlo_checks("\n".join(p.as_text() for p in programs), platform, 0)
  return out
