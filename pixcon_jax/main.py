"""Entry point: `python -m pixcon_jax.main --config=configs/demo.py --workdir=/tmp/demo`.

`--config` accepts `file.py:arg` variants (e.g. `configs/cityscapes_hrnet.py:official`) and
`--config.a.b=value` overrides. `config.mode` selects train (`train.train_and_evaluate`),
eval (`evaluate.evaluate_checkpoint`) or predict (`predict.predict_folder`).
"""
from __future__ import annotations

import logging as std_logging
import os
import re
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


def fail(message: str, exit_code: int = validation.EXIT_BAD_INPUT, *,
         prefix: str = "error") -> NoReturn:
  """Ends the process with `prefix: message` as the last line of stderr (no traceback)."""
  sys.stdout.flush()
  print(f"{prefix}: {' '.join(message.split())}", file=sys.stderr, flush=True)
  sys.exit(exit_code)


def _config_arg_of(argv: list[str]) -> str | None:
  """The value of `--config=path.py[:arg]` (or `--config path.py[:arg]`), if given."""
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _config_file_of(argv: list[str]) -> str | None:
  """The file part of `--config=path.py[:arg]`, if given."""
  arg = _config_arg_of(argv)
  return arg.split(":", 1)[0] if arg is not None else None


def _override_flag(argv: list[str], key: str) -> str:
  """The `--config.a.b=v` argument whose last or inner path part is `key` (else '--config')."""
  for a in argv:
    name = a.split("=", 1)[0]
    if name.startswith("--config.") and key in name[len("--config."):].split("."):
      return a
  return "--config"


def _innermost_message(error: BaseException) -> str:
  """ml_collections wraps KeyError('...Did you mean...') in AttributeError(KeyError)."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  return str(error.args[0]) if len(error.args) == 1 else str(error)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing whose failures end in one line naming the flag, exit code 2.

  ml_collections raises from deep inside flag parsing (a misspelt `--config.a.b` is a chained
  AttributeError; a missing config file an OSError), which absl would show as a traceback.
  """
  # A second parse in one process (`run` called again) defines the `--config.a.b` override
  # flags anew: the previous parse's must go first.
  for name in [n for n in FLAGS if n.startswith("config.")]:
    delattr(FLAGS, name)
  config_file = _config_file_of(argv)
  if config_file and not os.path.isfile(config_file):
    fail(f"--config={config_file}: no such file (relative paths start at the current directory, "
         f"{os.getcwd()}); give a config such as configs/demo.py")
  try:
    return FLAGS(argv)
  except flags.Error as e:
    text = str(e)
    if "Traceback (most recent call last)" in text:
      # An exception inside the config file's get_config(arg): its last line says what failed.
      lines = [line.strip() for line in text.splitlines() if line.strip()]
      fail(f"--config={_config_arg_of(argv)}: {lines[-1]}")
    # A value of the wrong type: "flag --config.a.b=maybe: ('Non-boolean argument ...', 'maybe')".
    override = re.fullmatch(r"flag (--config\.[^=]+=.*?): \('([^']*)', .*\)", text, re.S)
    if override:
      fail(f"{override.group(1)}: {override.group(2)}")
    fail(f"{text}; see --helpshort")
  except (AttributeError, KeyError) as e:
    text = _innermost_message(e)
    key = text.split("\n")[0].strip("'\"")
    hint = text.split("\n", 1)[1] if "\n" in text else ""
    fail(f"{_override_flag(argv, key)}: the config has no key {key!r}. {hint}".strip())
  except Exception as e:  # pylint: disable=broad-except
    # Errors raised by the config file itself (get_config(arg)) or by a value's type.
    fail(f"--config={config_file}: {type(e).__name__}: {_innermost_message(e)}")


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
    fail(str(e))
  new_workdir = _new_local_dir(workdir)
  try:
    run_mode(config, workdir)
  except validation.InputError as e:
    if new_workdir:
      _remove_failed_start(new_workdir)
    fail(str(e))
  except checkpointing.Stopped as e:
    fail(str(e), e.exit_code, prefix="stopped")


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
