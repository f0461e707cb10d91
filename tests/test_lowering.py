"""The train and eval steps lowered for TPU and GPU from this CPU host hold the accelerator graph.

`jax.jit(...).trace(...).lower(lowering_platforms=(p,))` emits the StableHLO a TPU or GPU
would compile, without one. The CPU-only constructs of the models (im2col / Winograd matmuls in
place of convolutions, `cpu.fusion.fusion_barrier`'s conditionals) are chosen when a model is
built, from the platform it is built for (`models.registry.layer_defs`); here they must be absent.

A construct of the model is repeated once per residual block, one of the loss or the head is
not: so each step is lowered for two depths (`num_blocks` 1 and 2) and the counts of `case` and
`dot_general` ops must not grow with depth, while the `convolution` count must. The runlocal
model's convs are below `conv.MATMUL_MIN_FLOPS`, where even the CPU keeps the native op, so the
threshold is lowered to 0: every conv of a model built for the CPU would then be a matmul.
"""
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_train_step import tiny_config  # noqa: E402  pylint: disable=g-import-not-at-top

from pixcon_jax import evaluate  # noqa: E402
from pixcon_jax import precision  # noqa: E402
from pixcon_jax import sharding  # noqa: E402
from pixcon_jax import setup  # noqa: E402
from pixcon_jax import train_step as ts  # noqa: E402
from pixcon_jax.cpu import conv  # noqa: E402

# Lowering platform -> the device platform a model for it is built for.
ACCELERATORS = {"tpu": "tpu", "cuda": "gpu"}
# A host callback would stall every step on the host (and fail on a remote TPU worker).
HOST_CALLBACK = re.compile(r"callback|xla_python|host_callback|python_cpu", re.IGNORECASE)


def _config(num_blocks: int):
  config = tiny_config("paper")  # runlocal HRNet, contrast with pixel + region memory.
  config.data.batch_size = 2
  config.model.overrides.num_blocks = num_blocks
  return config


def _spec(mesh, shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.data_sharded(mesh))


def lower_train_step(config, platform: str, device_platform: str) -> tuple[str, int]:
  """(StableHLO text of the train step lowered for `platform`, number of conv kernels)."""
  mesh = sharding.make_mesh(jax.devices()[:1])
  model = setup.build_model(config, train=True, platform=device_platform)
  tx = ts.make_optimizer(config)
  h, w = config.data.crop_size
  b = config.data.batch_size
  state = ts.abstract_train_state(config, model, tx, mesh, image_shape=(h, w, 3),
                                  num_classes=config.model.num_classes, num_train_images=16)
  assert state.memory is not None, "the memory bank should be on"
  batch = {"image": _spec(mesh, (b, h, w, 3), jnp.float32),
           "label": _spec(mesh, (b, h, w), jnp.int32),
           "image_id": _spec(mesh, (b,), jnp.int32)}
  step = ts.make_train_step(config, model, tx, mesh)
  text = step.trace(state, batch).lower(lowering_platforms=(platform,)).as_text()
  kernels = sum(1 for p in jax.tree.leaves(state.params) if p.ndim == 4)
  return text, kernels


def lower_eval_step(config, platform: str, device_platform: str) -> str:
  """StableHLO text of the eval steps (scores at scale 1, then the confusion matrix)."""
  mesh = sharding.make_mesh(jax.devices()[:1])
  model = setup.build_model(config, train=False, platform=device_platform)
  h, w = config.data.crop_size
  b = config.data.batch_size
  c = config.model.num_classes
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, h, w, 3)),
                                                train=False))
  evaluator = evaluate.make_evaluator(config, model, mesh, class_names=[str(i) for i in range(c)])
  image, scores = _spec(mesh, (b, h, w, 3), jnp.float32), _spec(mesh, (b, h, w, c), jnp.float32)
  (scale_step,) = evaluator._scale_steps.values()  # pylint: disable=protected-access
  texts = [scale_step.trace(variables, image, scores).lower(lowering_platforms=(platform,))]
  texts.append(evaluator._finish.trace(  # pylint: disable=protected-access
      scores, _spec(mesh, (b, h, w), jnp.int32), _spec(mesh, (b,), jnp.bool_)).lower(
          lowering_platforms=(platform,)))
  return "\n".join(t.as_text() for t in texts)


def op_counts(text: str) -> dict[str, int]:
  return {op: len(re.findall(rf"\bstablehlo\.{op}\b", text))
          for op in ("convolution", "case", "dot_general")}


@pytest.fixture
def cpu_would_use_matmuls(monkeypatch):
  monkeypatch.setattr(conv, "MATMUL_MIN_FLOPS", 0)
  # The same model built for the CPU has no native conv left: the criterion can tell them apart.
  x, kernel = (2, 32, 32, 16), (3, 3, 16, 16)
  assert conv.choose_impl(x, kernel, stride=1, padding=1, dilation=1, dtype=jnp.float32,
                          backend="cpu") != "xla"


@pytest.mark.parametrize("platform", sorted(ACCELERATORS))
def test_train_step_lowered_for_accelerator_has_native_convs_only(platform,
                                                                  cpu_would_use_matmuls):
  counts = {}
  for depth in (1, 2):
    text, kernels = lower_train_step(_config(depth), platform, ACCELERATORS[platform])
    counts[depth] = op_counts(text)
    # Forward, input gradient and weight gradient of every conv are native (the first conv
    # has no input gradient): at least forward + weight gradient per kernel.
    assert counts[depth]["convolution"] >= 2 * kernels, (depth, counts[depth], kernels)
    assert not HOST_CALLBACK.search(text), HOST_CALLBACK.search(text).group(0)
  print(platform, counts)
  assert counts[2]["convolution"] > counts[1]["convolution"]
  for op in ("case", "dot_general"):
    assert counts[2][op] == counts[1][op], f"{op} grows with depth: {counts}"


@pytest.mark.parametrize("platform", sorted(ACCELERATORS))
def test_eval_step_lowered_for_accelerator_has_native_convs_only(platform, cpu_would_use_matmuls):
  counts = {}
  for depth in (1, 2):
    text = lower_eval_step(_config(depth), platform, ACCELERATORS[platform])
    counts[depth] = op_counts(text)
    assert not HOST_CALLBACK.search(text), HOST_CALLBACK.search(text).group(0)
  print(platform, counts)
  assert counts[1]["case"] == 0, counts  # Inference has no data-dependent branch at all.
  assert counts[2]["convolution"] > counts[1]["convolution"] > 0
  assert counts[2]["dot_general"] == counts[1]["dot_general"], counts


def _precisions(text: str, op: str) -> list[str]:
  """The operand precisions of every `op` in a StableHLO text, e.g. ['HIGHEST HIGHEST', ...].

  Convolutions print `precision_config = [#stablehlo<precision X>, ...]`, dot_generals
  `precision = [X, Y]`; an op without either counts as 'DEFAULT DEFAULT'.
  """
  out = []
  for line in re.findall(rf"stablehlo\.{op}\b[^\n]*", text):
    m = re.search(r"precision(?:_config)? = \[([^\]]*)\]", line)
    names = re.findall(r"(DEFAULT|HIGHEST|HIGH)\b", m.group(1)) if m else ["DEFAULT"] * 2
    out.append(" ".join(names))
  return out


def test_matmul_precision_reaches_the_steps_lowered_for_tpu():
  config = _config(1)
  assert config.model.dtype == "float32" and config.model.matmul_precision is None
  assert precision.matmul_precision(config) == "highest"
  config.model.dtype = "bfloat16"
  assert precision.matmul_precision(config) == "default"
  config.model.dtype = "float32"
  text, _ = lower_train_step(config, "tpu", "tpu")
  eval_text = lower_eval_step(config, "tpu", "tpu")
  for t in (text, eval_text):
    convs = _precisions(t, "convolution")
    assert convs and set(convs) == {"HIGHEST HIGHEST"}, set(convs)
  dots = _precisions(text, "dot_general")
  assert dots and set(dots) == {"HIGHEST HIGHEST"}, set(dots)
  config.model.matmul_precision = "default"
  text, _ = lower_train_step(config, "tpu", "tpu")
  assert set(_precisions(text, "convolution")) == {"DEFAULT DEFAULT"}
  config.model.matmul_precision = "fp32"
  with pytest.raises(ValueError, match=r"config\.model\.matmul_precision='fp32'"):
    lower_train_step(config, "tpu", "tpu")


def test_experiment_steps_and_evaluator_take_their_devices_from_the_mesh(monkeypatch):
  """Given a mesh, nothing below `main` asks JAX which devices this host has.

  That is what lets `scripts/aot_compile.py` build the experiment for compile-only TPU or GPU
  devices on a CPU host: a `jax.devices()` call anywhere would mix in the host's CPU.
  """
  mesh = sharding.make_mesh(jax.devices()[:1])

  def asked(*args, **kwargs):
    raise AssertionError("library code asked JAX for the host's devices")

  for name in ("devices", "local_devices", "device_count", "local_device_count",
               "process_count", "default_backend"):
    monkeypatch.setattr(jax, name, asked)
  config = _config(1)
  config.data.batch_size = 2
  exp = setup.for_training(config, mesh)
  assert exp.mesh is mesh and (exp.batch_per_device, exp.batch_per_process) == (2, 2)
  state = setup.abstract_state(exp)
  h, w = config.data.crop_size
  batch = {"image": _spec(mesh, (2, h, w, 3), jnp.float32),
           "label": _spec(mesh, (2, h, w), jnp.int32), "image_id": _spec(mesh, (2,), jnp.int32)}
  text = ts.make_train_step(config, exp.train_model, exp.tx, mesh).trace(state, batch).lower(
      lowering_platforms=("tpu",)).as_text()
  assert "stablehlo.convolution" in text
  evaluator = evaluate.make_evaluator(config, exp.eval_model, mesh, class_names=["c"] * 19)
  assert evaluator.mesh is mesh


def test_bf16_setting_for_tpu_and_gpu_keeps_state_and_losses_float32():
  """`:bf16` (precision.py's TPU/GPU choice): bf16 convs at 'default', float32 everything kept."""
  config = _config(1)
  config.model.dtype = "bfloat16"  # What the experiment files' `bf16` word sets.
  assert precision.matmul_precision(config) == "default"
  text, kernels = lower_train_step(config, "tpu", "tpu")
  convs = re.findall(r"stablehlo\.convolution\b[^\n]*", text)
  assert len(convs) >= 2 * kernels
  assert all(re.search(r"->\s*tensor<[^>]*xbf16>", c) for c in convs), [
      c for c in convs if not re.search(r"->\s*tensor<[^>]*xbf16>", c)][:2]
  assert set(_precisions(text, "convolution")) == {"DEFAULT DEFAULT"}
  # The step's returns: the new state and the metrics, float32 (bf16 only inside the step).
  mesh = sharding.make_mesh(jax.devices()[:1])
  model = setup.build_model(config, train=True, platform="tpu")
  state = ts.abstract_train_state(config, model, ts.make_optimizer(config), mesh,
                                  image_shape=(32, 32, 3), num_classes=19, num_train_images=16)
  floats = {str(x.dtype) for x in jax.tree.leaves((state.params, state.opt_state,
                                                    state.batch_stats)) if x.dtype.kind == "f"}
  assert floats == {"float32"}, floats
  main = re.search(r"func\.func public @main\([^\n]*", text).group(0)
  assert "bf16" not in main.split("->")[-1], main.split("->")[-1][:300]
