"""Compiling for TPU and GPU targets from this CPU host (`pixcon_jax/aot`, `scripts/aot_compile.py`).

The tests marked `aot` need the `[aot]` extra (libtpu, the CUDA PJRT plugin). Without it they
are reported as skipped with the reason (`pytest -rs`); `.ci/run` installs the extra in a second
venv and runs them there with PIXCON_REQUIRE_AOT=1, under which a missing extra fails instead.
The rest (target parsing, the script's error contract) runs everywhere.
"""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from pixcon_jax.aot import targets

# The CUDA plugin loads without a CUDA driver only so (read when JAX first starts a backend).
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
REPO = pathlib.Path(__file__).resolve().parents[1]
HAVE_AOT = (importlib.util.find_spec("libtpu") is not None and
            importlib.util.find_spec("jax_plugins.xla_cuda12") is not None)
NEEDS_AOT = "needs the [aot] extra: pip install -e '.[aot]' (.ci/run installs it)"
if os.environ.get("PIXCON_REQUIRE_AOT") and not HAVE_AOT:
  raise RuntimeError(f"PIXCON_REQUIRE_AOT is set but libtpu / jax_plugins.xla_cuda12 are not "
                     f"installed in {sys.prefix}")
GiB = 1 << 30


def _script(*args, env=None):
  env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
  return subprocess.run([sys.executable, str(REPO / "scripts" / "aot_compile.py"), *args],
                        capture_output=True, text=True, env=env, timeout=300, cwd=REPO)


def test_targets_parse_and_name_the_flag():
  t = targets.parse("tpu:v5p:2x2x4")
  assert (t.platform, t.chip, t.num_chips, t.hbm_bytes) == ("tpu", "v5p", 16, 95 * GiB)
  t = targets.parse("cuda:a100:16")
  assert (t.platform, t.num_chips, t.hbm_bytes) == ("cuda", 16, 40960 << 20)
  assert targets.hbm_per_device(targets.parse("tpu:v4:2x2x1"), 8) == 16 * GiB  # 2 cores a chip
  for bad in ("tpu:v9:2x2", "tpu:v5e:2y2", "cuda:h100:0", "cuda:h100:12", "rocm:mi300:8", "v5e"):
    with pytest.raises(targets.TargetError, match=r"^--target=" + bad):
      targets.parse(bad)
  for chip in targets.GPUS:  # Every GPU description is in the repository and names its source.
    text = targets.gpu_target_config(chip)
    assert "cuda_compute_capability" in text and "whitepaper" in text, chip


@pytest.mark.parametrize("args,expected", [
    (["--config=configs/demo.py:runlocal", "--target=tpu:v9:2x2"], "--target=tpu:v9:2x2"),
    (["--config=configs/demo.py:runlocal"], "--target is required"),
    (["--config=configs/demo.py:runlocal", "--target=tpu:v5e:2x2", "--batch_per_device=0"],
     "--batch_per_device=0"),
])
def test_script_bad_flags_exit_2_with_one_error_line(args, expected):
  r = _script(*args)
  lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert r.returncode == 2 and len(lines) == 1 and expected in lines[0], (r.returncode, r.stderr)
  assert not r.stdout


@pytest.mark.skipif(HAVE_AOT, reason="checks the message of a host without the [aot] extra")
def test_script_without_the_extra_says_how_to_install_it():
  r = _script("--config=configs/demo.py:runlocal", "--target=cuda:h100:4")
  assert r.returncode == 2 and 'pip install -e ".[aot]"' in r.stderr, r.stderr


def _tiny_config():
  sys.path.insert(0, str(REPO / "tests"))
  from test_train_step import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config("paper")  # runlocal HRNet, pixel + region memory.
  config.model.overrides.num_blocks = 1
  return config


@pytest.mark.parametrize("name", ["tpu:v5e:2x2", "cuda:h100:4"])
@pytest.mark.aot
@pytest.mark.skipif(not HAVE_AOT, reason=NEEDS_AOT)
def test_runlocal_train_step_compiles_for_the_target(name):
  from pixcon_jax import sharding  # pylint: disable=g-import-not-at-top
  from pixcon_jax.aot import report  # pylint: disable=g-import-not-at-top
  target = targets.parse(name)
  mesh = sharding.make_mesh(targets.devices(target))
  assert sharding.mesh_platform(mesh) == {"tpu": "tpu", "cuda": "gpu"}[target.platform]
  config = _tiny_config()
  config.data.batch_size = mesh.size
  out = report.train_step_report(config, mesh, platform=target.platform,
                                 hbm_bytes=targets.hbm_per_device(target, mesh.size))
  print(json.dumps(out))
  hlo = out["hlo"]
  assert hlo["ok"], hlo["problems"]
  assert not hlo["host_transfers"] and not hlo["disallowed_custom_calls"]
  if target.platform == "cuda":
    assert any(c.startswith("__cudnn$conv") for c in hlo["custom_calls"]), hlo["custom_calls"]
  else:
    # float32 compute without a configured precision is 'highest' (precision.py): on the MXU.
    assert "highest" in hlo["matmul_precision"], hlo["matmul_precision"]
  # The tiny step's state and activations are a few MiB; 256 MiB would mean a blow-up.
  assert out["fits"] and 0 < out["peak_bytes"] < 256 << 20, out["peak_bytes"]
  assert out["argument_bytes"] >= out["state_bytes_per_device"] > 0
  assert out["alias_bytes"] > 0  # The state is donated: updated in place.
  assert out["flops_per_device"] >= out["flops_per_device_loop_body_once"] > 0


@pytest.mark.aot
@pytest.mark.skipif(not HAVE_AOT, reason=NEEDS_AOT)
def test_full_size_step_lowered_for_tpu_has_the_stated_flops_and_state():
  """configs/cityscapes_hrnet.py at 2 x 512x1024 per chip on v5e:2x2, lowered (not compiled).

  Bounds: 4.2-5.0 TFLOP per chip per step (measured 4.61, the contrast's share 0.65) and
  1.0-1.3 GiB of state per chip (parameters and momentum ~540 MiB, memory bank ~609 MiB).
  """
  from configs import cityscapes_hrnet  # pylint: disable=g-import-not-at-top
  from pixcon_jax import sharding  # pylint: disable=g-import-not-at-top
  from pixcon_jax.aot import report  # pylint: disable=g-import-not-at-top
  target = targets.parse("tpu:v5e:2x2")
  mesh = sharding.make_mesh(targets.devices(target))
  config = cityscapes_hrnet.get_config()
  out = report.train_step_report(config, mesh, platform="tpu", hbm_bytes=target.hbm_bytes,
                                 compile=False)
  print(json.dumps(out))
  assert out["batch_per_device"] == 2 and out["crop"] == [512, 1024]
  assert 4.2e12 < out["flops_per_device"] < 5.0e12, out["flops_per_device"]
  assert 1.0 * GiB < out["state_bytes_per_device"] < 1.3 * GiB, out["state_bytes_per_device"]


@pytest.mark.aot
@pytest.mark.skipif(not HAVE_AOT, reason=NEEDS_AOT)
def test_cpu_tuning_stays_on_with_the_extra_installed():
  """libtpu and the CUDA plugin installed, no accelerator: JAX runs on the CPU, and so tuned."""
  code = ("import os; from pixcon_jax.cpu import xla_flags as x; "
          "print(','.join(x.installed_accelerator_plugins())); "
          "print(x.use_tuned_flags(os.environ)); import jax; print(jax.default_backend())")
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                     env=dict(env, PYTHONPATH=str(REPO)))
  assert r.returncode == 0, r.stderr
  plugins, tuned, backend = r.stdout.splitlines()[-3:]
  assert "libtpu" in plugins and "xla_cuda12" in plugins, plugins
  assert (tuned, backend) == ("True", "cpu"), r.stdout
