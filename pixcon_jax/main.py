"""Entry point: `python -m pixcon_jax.main --config=configs/demo.py --workdir=/tmp/demo`.

`--config` accepts `file.py:arg` variants (e.g. `configs/cityscapes_hrnet.py:official`) and
`--config.a.b=value` overrides. `config.mode` selects train (`train.train_and_evaluate`),
eval (`evaluate.evaluate_checkpoint`) or predict (`predict.predict_folder`).
"""
from __future__ import annotations

import signal

if __name__ == "__mp_main__":
  # A grain data worker: multiprocessing's spawn imports the trainer's main module first in
  # every worker. Ignore SIGTERM / SIGINT from here on, before the slow imports below: a signal
  # to the process group is the trainer's to act on (it saves, then stops its workers).
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  signal.signal(signal.SIGINT, signal.SIG_IGN)

# pylint: disable=wrong-import-position
import logging as std_logging
import os
import shutil
import sys
from typing import NoReturn

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from pixcon_jax import checkpointing
from pixcon_jax import cli
from pixcon_jax import config_schema
from pixcon_jax import log_filters
from pixcon_jax import multihost
from pixcon_jax import paths
from pixcon_jax import predict
from pixcon_jax import validation
from pixcon_jax.cpu import host_memory
from pixcon_jax.cpu import xla_flags

FLAGS = flags.FLAGS

config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (`path.py` or `path.py:arg`).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events and results.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for jax.distributed, where JAX cannot detect the cluster "
                    "(Cloud TPU, Slurm, Open MPI and Kubernetes indexed jobs are detected).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.DEFINE_string("local_device_ids", None, "Comma-separated local device ids (optional).")
flags.DEFINE_bool("hugepages", True,
                  "Restart with glibc's malloc on transparent huge pages (GLIBC_TUNABLES="
                  "glibc.malloc.hugetlb=1) unless already set: XLA:CPU's per-step temporaries "
                  "otherwise page-fault anew every step. See pixcon_jax/cpu/host_memory.py.")
flags.DEFINE_bool("tune_xla_cpu", True,
                  "On the CPU, run XLA's matrix products on Eigen instead of YNNPACK and schedule "
                  "its thunks in memory order (faster for this project's step), unless XLA_FLAGS "
                  "sets those flags. See pixcon_jax/cpu/xla_flags.py.")
flags.mark_flags_as_required(["config", "workdir"])


def maybe_initialize_distributed() -> str:
  """Joins the processes of a multi-host run (explicit flags, or auto-detected by JAX).

  Returns the line to log: what was found and done (`multihost.initialize`).
  """
  if FLAGS.coordinator_address:
    if FLAGS.num_processes is None or FLAGS.process_id is None:
      raise app.UsageError("--coordinator_address needs --num_processes and --process_id")
    ids = ([int(i) for i in FLAGS.local_device_ids.split(",")]
           if FLAGS.local_device_ids else None)
    return multihost.initialize(coordinator_address=FLAGS.coordinator_address,
                                num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
                                local_device_ids=ids)
  return multihost.initialize()


# Flag errors end in one `error:` line, exit 2 (the rule shared with the scripts: cli.py).
parse_flags = cli.parse_flags


def main(argv: list[str]) -> None:
  """Checks the config (`config_schema`), then runs its mode; bad input and early stops end in
  one line, and a failed start leaves no new workdir behind."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.tune_xla_cpu:
    xla_flags.use_tuned_flags()  # In os.environ, so that the huge-page restart keeps it.
  log_filters.quiet_resource_tracker(os.environ)
  if FLAGS.hugepages:
    # Before any backend starts: the process is replaced by the same command.
    host_memory.reexec_with_hugepages([sys.executable, "-m", "pixcon_jax.main", *sys.argv[1:]])
  joined = maybe_initialize_distributed()
  # Only process 0 logs at INFO; the others would repeat every line.
  if jax.process_index() > 0:
    logging.set_verbosity(logging.WARNING)
  std_logging.getLogger("absl").setLevel(std_logging.INFO)
  logging.info("%s", joined)
  log_filters.quiet_library_logs()
  logging.info("JAX %s: process %d of %d, %d local / %d global devices (%s); GLIBC_TUNABLES=%s; "
               "XLA_FLAGS=%s", jax.__version__, jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), jax.devices()[0].platform,
               os.environ.get("GLIBC_TUNABLES", ""), os.environ.get("XLA_FLAGS", ""))
  config = FLAGS.config
  paths.expand_config_paths(config)  # The shell expands no `~` after `=`.
  workdir = FLAGS.workdir  # Each mode resolves it (`paths.resolve`: `~`, relative, gs://).
  try:
    # The whole config, before anything is written, compiled or imported from TensorFlow: a
    # bad value would otherwise surface deep in a module, after a compile.
    config_schema.check_config(config)
    config_schema.check_devices(config, num_processes=jax.process_count(),
                                num_devices=jax.device_count())
    validation.check_output_dir(workdir, "--workdir")
  except validation.InputError as e:
    cli.fail(str(e))
  new_workdir = _new_local_dir(workdir)
  try:
    run_mode(config, workdir)
  except validation.InputError as e:
    if new_workdir:
      _remove_failed_start(new_workdir)
    cli.fail(str(e))
  except checkpointing.Stopped as e:
    cli.fail(str(e), e.exit_code, prefix="stopped")


def _new_local_dir(workdir: str) -> str | None:
  """`workdir` as a local path if it does not exist yet (this run would create it), else None."""
  if paths.is_url(workdir):
    return None  # A bucket has no folders to leave behind.
  path = os.path.abspath(os.path.expanduser(workdir))
  return None if os.path.exists(path) else path


def _remove_failed_start(path: str) -> None:
  """Removes the workdir a run created before its input failed, unless it saved a checkpoint.

  A failed start (an unprepared dataset, an init_from that does not fit) otherwise leaves an
  empty run folder, or one with only config.json, that the next run would take for its own.
  """
  checkpoints = os.path.join(path, "checkpoints")
  if os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints)):
    return
  shutil.rmtree(path, ignore_errors=True)


def run_mode(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Dispatches on `config.mode` (checked): train, eval or predict.

  train and evaluate are imported here, not at the top: through CLU's writers they load
  TensorFlow (~5 s), which a bad flag or the huge-page restart would otherwise pay for first.
  """
  mode = config.get("mode", "train")
  if mode == "train":
    from pixcon_jax import train  # pylint: disable=g-import-not-at-top
    train.train_and_evaluate(config, workdir)
  elif mode == "eval":
    from pixcon_jax import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.evaluate_checkpoint(config, workdir)
  else:
    predict.predict_folder(config, workdir)


def run(argv: list[str] | None = None) -> NoReturn:
  """The command line `argv` (argv[0] the program; None: sys.argv), as `python -m` runs it.

  Ends with SystemExit: 0, or the exit code of a bad input (2) or a stop (143, 130).
  """
  if argv is None:
    app.run(main, flags_parser=parse_flags)
  saved = sys.argv
  # ml_collections reads the `--config.a.b` overrides from sys.argv, not from the parsed argv.
  sys.argv = list(argv)
  try:
    app.run(main, argv=sys.argv, flags_parser=parse_flags)
  finally:
    sys.argv = saved


if __name__ == "__main__":
  run()
