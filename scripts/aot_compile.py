"""Compiles the real train and eval steps for a TPU or GPU target on this host, without the chips.

  pip install -e ".[aot]"   # libtpu and the CUDA PJRT plugin, compile-only here
  python scripts/aot_compile.py --config=configs/demo.py:runlocal --target=tpu:v5e:2x2
  python scripts/aot_compile.py --config=configs/cityscapes_hrnet.py:bf16 --target=cuda:h100:4
  python scripts/aot_compile.py --config=configs/cityscapes_hrnet.py:bf16 --target=tpu:v5p:2x2x4 \
      --batch_per_device=4 --noeval

Targets: `tpu:<v4|v5e|v5p|v6e>:<topology>` and `cuda:<a100|a100_80|h100>:<count>`
(`pixcon_jax/aot/targets.py`). `data.batch_size` is global as in training; `--batch_per_device`
sets it to that many images per device. Prints one JSON line: the target, per-device HBM, and
for the train step (and the eval step) per-device argument / output / temp / alias /
generated-code / peak bytes, `fits`, FLOPs per device (the contrast's class loop unrolled),
compile seconds and the HLO checks (`pixcon_jax/aot/report.py`). `--lower_only` skips the
compile (FLOPs and state bytes only; seconds instead of tens of minutes at full size).

Exit status: 0 when every step fits the chip and passes the HLO checks, 1 when one does not,
2 with one `error:` line for a bad flag, a missing extra or a config that does not fit the target.
"""
import json
import os
import sys

# Before JAX starts: run on the CPU (the compile-only devices come from the plugins) and let the
# CUDA plugin load on a host without a CUDA driver.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:arg]).",
                                lock_config=False)
flags.DEFINE_string("target", None, "tpu:v5e:2x2 | tpu:v4:2x2x1 | tpu:v5p:2x2x4 | cuda:h100:4 | "
                    "cuda:a100:8 ...")
flags.DEFINE_integer("batch_per_device", None, "Images per device (default: the config's "
                     "data.batch_size over the target's devices).")
flags.DEFINE_bool("eval", True, "Also compile the eval step.")
flags.DEFINE_bool("lower_only", False, "Lower the train step only: FLOPs and state bytes.")
FLAGS = flags.FLAGS


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def run() -> dict:
  """Builds the target's mesh and the reports; raises ValueError / RuntimeError on bad input."""
  from pixcon_jax.aot import targets  # pylint: disable=g-import-not-at-top
  target = targets.parse(FLAGS.target)
  if FLAGS.batch_per_device is not None and FLAGS.batch_per_device < 1:
    raise ValueError(f"--batch_per_device={FLAGS.batch_per_device}: must be >= 1")
  # After the flags are checked: these load TensorFlow (through CLU) and the plugins.
  from pixcon_jax import sharding  # pylint: disable=g-import-not-at-top
  from pixcon_jax.aot import report  # pylint: disable=g-import-not-at-top
  config = FLAGS.config
  try:
    devices = targets.devices(target)
  except (RuntimeError, NotImplementedError) as e:
    raise RuntimeError(f"--target={target.name}: no compile-only devices ({e}); install the "
                       f"extra: pip install -e \".[aot]\"") from e
  mesh = sharding.make_mesh(devices)
  hbm = targets.hbm_per_device(target, mesh.size)
  if FLAGS.batch_per_device is not None:
    config.data.batch_size = FLAGS.batch_per_device * mesh.size
  out = {"target": target.name, "config": sys.argv and _config_arg(),
         "devices": mesh.size, "chips": target.num_chips,
         "device_kind": devices[0].device_kind, "hbm_bytes_per_device": hbm}
  out["train_step"] = report.train_step_report(config, mesh, platform=target.platform,
                                               hbm_bytes=hbm, compile=not FLAGS.lower_only)
  if FLAGS.eval and not FLAGS.lower_only:
    out["eval_step"] = report.eval_step_report(config, mesh, platform=target.platform,
                                               hbm_bytes=hbm)
  steps = [out[k] for k in ("train_step", "eval_step") if k in out]
  out["fits"] = all(s.get("fits", True) for s in steps)
  out["hlo_ok"] = all(s.get("hlo", {}).get("ok", True) for s in steps)
  return out


def _config_arg() -> str | None:
  for a in sys.argv[1:]:
    if a.startswith("--config="):
      return a.split("=", 1)[1]
  return None


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.target:
    fail("--target is required, e.g. --target=tpu:v5e:2x2")
  if FLAGS.config is None:
    fail("--config is required, e.g. --config=configs/demo.py:runlocal")
  try:
    out = run()
  except (ValueError, RuntimeError) as e:
    fail(str(e).splitlines()[0])
  print(json.dumps(out), flush=True)
  sys.exit(0 if out["fits"] and out["hlo_ok"] else 1)


if __name__ == "__main__":
  app.run(main)
