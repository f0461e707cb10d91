"""Bad inputs end in one short message naming the key or file and what to do (issues 19, 28).

First the table of issue 28: each mistake a new user made, through `main` in this process
(`main.run`), must exit 2 with one `error:` line naming the key, no traceback, nothing written.
Then in-process checks where the message is the point (the config schema, the checkpoint
restore, init_from, predict, prepare_data), and a subprocess of `pixcon_jax.main` where the exit
code and the last line of output are (flag parsing, the early config check). One tiny workdir
with two checkpoints, written without training, serves the checkpoint cases.
"""
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from pixcon_jax import checkpointing
from pixcon_jax import config_schema
from pixcon_jax import log_filters
from pixcon_jax import main as main_lib
from pixcon_jax import predict
from pixcon_jax import segment
from pixcon_jax import validation
import helpers
from helpers import run_main

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(widths=(4, 8, 16, 32), stage_modules=(1, 1, 1), num_blocks=1, stem_width=8,
            layer1_planes=4, layer1_blocks=1)


# ---- issue 28's table: rows 1-8 and 17 (exit 2, one line naming the key, nothing written) ------
# (row, overrides of `M = main --config=configs/demo.py:runlocal --workdir=W`, the key named).
# `{images}` is a folder with one PNG, `{out}` a folder to create.
MISTAKES = [
    (1, ["--config.model.name=hrnet_w18_contrst"], "model.name"),
    (2, ["--config.contrast.mining=semihard"], "contrast.mining"),
    (3, ["--config.contrast.recipe=offical"], "contrast.recipe"),
    (4, ["--config.model.name=hrnet_w18", "--config.contrast.enabled=True"], "contrast.enabled"),
    (5, ["--config.model.num_classes=19"], "model.num_classes"),  # the demo has 8 classes
    (6, ["--config.data.dataset=citiscapes"], "data.dataset"),
    (7, ["--config.mode=eval", "--config.eval.protocol=papr"], "eval.protocol"),
    (8, ["--config.mode=predict", "--config.predict.input_dir={images}",
         "--config.predict.output_dir={out}", "--config.predict.label_format=labelid"],
     "predict.label_format"),
    (17, ["--config.optim.lr=-0.02"], "optim.lr"),
]


@pytest.mark.parametrize("row, overrides, key", MISTAKES, ids=[f"row{m[0]}" for m in MISTAKES])
def test_a_mistake_of_the_table_ends_in_one_line_naming_the_key(row, overrides, key, tmp_path,
                                                                monkeypatch):
  monkeypatch.chdir(REPO)
  images = tmp_path / "images"
  images.mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "a.png")
  workdir = tmp_path / "run"
  args = [a.format(images=images, out=tmp_path / "out") for a in overrides]
  start = time.monotonic()
  code, lines = run_main("--config=configs/demo.py:runlocal", f"--workdir={workdir}", *args)
  assert time.monotonic() - start < 15, f"row {row}: the check must run before any compile"
  assert code == validation.EXIT_BAD_INPUT, (row, lines[-5:])
  assert lines[-1].startswith(f"error: config.{key}="), (row, lines[-5:])
  assert not any("Traceback" in line for line in lines), row
  assert not workdir.exists() and not (tmp_path / "out").exists(), row


def test_a_failed_start_leaves_no_new_workdir(tmp_path, monkeypatch):
  """An input error after the mode started (e.g. an unprepared dataset) removes what it made."""
  monkeypatch.chdir(REPO)

  def fails_after_writing(config, workdir, steps=()):
    run = pathlib.Path(workdir)
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text("{}")
    for step in steps:
      (run / "checkpoints" / str(step)).mkdir()
    raise validation.MissingInputError("synthetic: no prepared data")

  monkeypatch.setattr(main_lib, "run_mode", fails_after_writing)
  new = tmp_path / "new"
  code, lines = run_main("--config=configs/demo.py:runlocal", f"--workdir={new}")
  assert (code, lines[-1]) == (2, "error: synthetic: no prepared data")
  assert not new.exists()
  # A folder that was there before, or one holding a checkpoint, is the user's: kept.
  old = tmp_path / "old"
  old.mkdir()
  assert run_main("--config=configs/demo.py:runlocal", f"--workdir={old}")[0] == 2
  assert (old / "config.json").exists()
  monkeypatch.setattr(main_lib, "run_mode", lambda c, w: fails_after_writing(c, w, steps=(5,)))
  saved = tmp_path / "saved"
  assert run_main("--config=configs/demo.py:runlocal", f"--workdir={saved}")[0] == 2
  assert (saved / "checkpoints" / "5").is_dir()


def demo_config(**overrides) -> ml_collections.ConfigDict:
  """configs/demo.py:runlocal shrunk to a seconds-long init (helpers.tiny_demo_config)."""
  return helpers.tiny_demo_config(**overrides)


def _main(*args, timeout=120):
  """`python -m pixcon_jax.main ARGS` -> (exit code, last non-empty line of stdout+stderr, all)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-m", "pixcon_jax.main", "--nohugepages", *args], cwd=REPO,
                     env=env, capture_output=True, text=True, timeout=timeout)
  out = p.stdout + p.stderr
  lines = [line for line in out.splitlines() if line.strip()]
  return p.returncode, (lines[-1] if lines else ""), out


def _built(config):
  """(Experiment, state, new train iterator) of `config`.

  The state has the configured shapes and shardings but zeros for values: the restore and
  init_from checks only need shapes, and the tiny HRNet's real init takes a minute to compile
  on a busy 2-core machine.
  """
  from pixcon_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from pixcon_jax import setup  # pylint: disable=g-import-not-at-top
  exp = setup.for_training(config)
  shapes = setup.abstract_state(exp)
  rep = jax.sharding.NamedSharding(exp.mesh, jax.sharding.PartitionSpec())
  state = jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype), rep), shapes)
  it = data_lib.make_train_iterator(config.data, config.augment, batch_size_per_process=2,
                                    seed=0, process_index=0, process_count=1)
  return exp, state, it


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A run directory with checkpoints of steps 1 and 2 and its config.json (no training)."""
  from pixcon_jax import train  # pylint: disable=g-import-not-at-top
  config = demo_config()
  path = tmp_path_factory.mktemp("bad_inputs") / "run"
  _, state, it = _built(config)
  manager = checkpointing.make_manager(str(path), config)
  for step in (1, 2):
    checkpointing.save(manager, step, state.replace(step=state.step + step), it)
  manager.wait_until_finished()
  manager.close()
  train.save_run_config(config, str(path))
  return path


def _copy(workdir, tmp_path):
  dst = tmp_path / "run"
  shutil.copytree(workdir, dst)
  return dst


# ---- the command line: one line, exit code 2, no traceback ------------------------------------

@pytest.mark.parametrize("override, expected", [
    ("--config.schedule.total_step=5",
     "--config.schedule.total_step=5: the config has no key 'total_step'. "
     "Did you mean \"total_steps\""),
    ("--config.foo=1", "--config.foo=1: the config has no key 'foo'"),
])
def test_misspelt_config_key_is_one_line_with_the_hint(tmp_path, override, expected):
  rc, last, out = _main("--config=configs/demo.py:runlocal", f"--workdir={tmp_path}", override)
  assert rc == validation.EXIT_BAD_INPUT
  assert last.startswith("error: " + expected), out
  assert "Traceback" not in out


def test_missing_config_file_is_named(tmp_path):
  rc, last, out = _main("--config=configs/nonexistent.py", f"--workdir={tmp_path}")
  assert rc == validation.EXIT_BAD_INPUT
  assert last.startswith("error: --config=configs/nonexistent.py: no such file"), out
  assert "Traceback" not in out


def test_zero_total_steps_fails_before_compiling(tmp_path):
  rc, last, out = _main("--config=configs/demo.py:runlocal", f"--workdir={tmp_path}",
                        "--config.schedule.total_steps=0")
  assert rc == validation.EXIT_BAD_INPUT
  assert last == "error: config.schedule.total_steps=0: expected a positive integer", out
  assert "final mIoU" not in out and not (tmp_path / "checkpoints").exists()


def test_workdir_that_is_a_file_is_named(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("x")
  rc, last, out = _main("--config=configs/demo.py:runlocal", f"--workdir={afile}")
  assert rc == validation.EXIT_BAD_INPUT
  assert last.startswith(f"error: --workdir={str(afile)!r} is a file: expected a directory"), out


# ---- config validation (in process) -----------------------------------------------------------

@pytest.mark.parametrize("key, value", [
    ("schedule.total_steps", 0), ("eval.every_steps", 0), ("checkpoint.every_steps", -1),
    ("log.every_steps", 0), ("data.batch_size", 0), ("checkpoint.max_to_keep", 0),
])
def test_step_counts_must_be_positive(key, value):
  config = demo_config()
  group, name = key.split(".")
  config[group][name] = value
  with pytest.raises(validation.ConfigError,
                     match=f"^config.{key}={value}: expected a positive integer$"):
    config_schema.check_config(config)


def test_unknown_scope_and_mismatch_fraction_are_named():
  config = demo_config()
  config.init_from_scope = "everything"
  with pytest.raises(validation.ConfigError, match="config.init_from_scope='everything'"):
    config_schema.check_config(config)
  config = demo_config()
  config.init_from_max_mismatch = 2.0
  with pytest.raises(validation.ConfigError, match=r"config.init_from_max_mismatch=2.0: .*\[0, 1\]"):
    config_schema.check_config(config)
  config_schema.check_config(demo_config())  # The shipped config passes.


def test_per_device_selection_with_the_global_batch_loss_is_named():
  config = demo_config()
  config.contrast.top_k = "sort"
  with pytest.raises(validation.ConfigError, match=r"config.contrast.top_k='sort': .*bisect"):
    config_schema.check_config(config)
  config.contrast.global_batch = False  # each device its own loss: any selection works
  config_schema.check_config(config)


def test_predict_output_dir_under_a_file_fails_before_the_model_runs(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("x")
  inputs = tmp_path / "in"
  inputs.mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(inputs / "a.png")
  config = demo_config()
  config.mode = "predict"
  config.predict.input_dir = str(inputs)
  config.predict.output_dir = str(afile / "out")
  with pytest.raises(validation.ConfigError, match=f"config.predict.output_dir=.*is under the "
                     f"file '{afile}'"):
    config_schema.check_config(config)
  # predict_folder itself checks it too, before building the model (an empty workdir would
  # otherwise fail later with "no checkpoint").
  with pytest.raises(validation.ConfigError, match="config.predict.output_dir"):
    predict.predict_folder(config, str(tmp_path / "work"))


# ---- checkpoints -------------------------------------------------------------------------------

def _truncate_largest_file(step_dir: pathlib.Path) -> pathlib.Path:
  files = [p for p in step_dir.rglob("*") if p.is_file()]
  biggest = max(files, key=lambda p: p.stat().st_size)
  with open(biggest, "r+b") as f:
    f.truncate(biggest.stat().st_size // 3)
  return biggest


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(workdir, tmp_path, caplog):
  from pixcon_jax import setup  # pylint: disable=g-import-not-at-top
  run = _copy(workdir, tmp_path)
  _truncate_largest_file(run / "checkpoints" / "2" / "state")
  config = demo_config()
  exp, state, it = _built(config)
  manager = checkpointing.make_manager(str(run), config)
  with caplog.at_level(logging.WARNING):
    restored, _, step = checkpointing.restore_latest_readable(manager, setup.abstract_state(exp), it)
  assert step == 1 and int(restored.step) == int(state.step) + 1
  assert "checkpoint of step 2 is unreadable" in caplog.text
  assert (run / "checkpoints" / "2.unreadable").is_dir()  # Kept for a look, out of the way.
  # The run can save step 2 again.
  checkpointing.save(manager, 2, restored, it)
  manager.wait_until_finished()
  assert sorted(manager.all_steps()) == [1, 2]
  manager.close()


def test_no_readable_checkpoint_names_the_folder(workdir, tmp_path):
  from pixcon_jax import setup  # pylint: disable=g-import-not-at-top
  run = _copy(workdir, tmp_path)
  for step in ("1", "2"):
    _truncate_largest_file(run / "checkpoints" / step / "state")
  config = demo_config()
  exp, state, it = _built(config)
  manager = checkpointing.make_manager(str(run), config)
  with pytest.raises(validation.ConfigError, match=r"no readable checkpoint under .*checkpoints "
                     r"\(steps \[2, 1\] set aside"):
    checkpointing.restore_latest_readable(manager, setup.abstract_state(exp), it)
  manager.close()


def test_resume_with_other_widths_names_keys_and_shapes(workdir, tmp_path):
  from pixcon_jax import setup, train  # pylint: disable=g-import-not-at-top
  run = _copy(workdir, tmp_path)
  config = demo_config(widths=(4, 8, 16, 24))
  exp, state, it = _built(config)
  manager = checkpointing.make_manager(str(run), config)
  with pytest.raises(validation.ConfigError) as e:
    checkpointing.restore_latest_readable(
        manager, setup.abstract_state(exp), it,
        explain_shapes=lambda: train.config_differences(config, str(run)))
  manager.close()
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1", "2"]  # Untouched.
  msg = str(e.value)
  assert "holds a checkpoint (step 2) of another model" in msg
  assert "in the checkpoint vs" in msg and "32" in msg and "24" in msg
  assert "config.model.overrides.widths ([4, 8, 16, 32] there, [4, 8, 16, 24] now)" in msg
  assert "Use another --workdir" in msg
  assert "strict" not in msg


# ---- init_from ---------------------------------------------------------------------------------

def _save_variables(path, state):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  variables = jax.tree.map(np.asarray, {"params": state.params, "batch_stats": state.batch_stats})
  ocp.PyTreeCheckpointer().save(str(path), variables)


def test_init_from_another_architecture_fails_unless_partial(tmp_path, caplog):
  from pixcon_jax import train  # pylint: disable=g-import-not-at-top
  _, other, _ = _built(demo_config(widths=(4, 8, 16, 24), stem_width=4))
  _save_variables(tmp_path / "other", other)
  config = demo_config()
  config.init_from = str(tmp_path / "other")
  config.init_from_scope = "full"
  exp, state, _ = _built(config)
  with pytest.raises(validation.ConfigError) as e:
    train.apply_init_from(exp, state)
  msg = str(e.value)
  assert f"config.init_from={config.init_from!r} does not fit 'hrnet_w18_contrast'" in msg
  assert "more than config.init_from_max_mismatch=0.05" in msg
  assert "config.init_from_scope=partial" in msg
  # Explicitly partial: loads what matches and reports the rest at WARNING.
  config.init_from_scope = "partial"
  with caplog.at_level(logging.WARNING):
    loaded = train.apply_init_from(exp, state)
  assert "init_from shape_mismatch" in caplog.text
  assert any(r.levelno == logging.WARNING and "shape_mismatch" in r.getMessage()
             for r in caplog.records)
  assert jax.tree.structure(loaded.params) == jax.tree.structure(state.params)


def test_init_from_within_the_mismatch_fraction_loads(tmp_path):
  from pixcon_jax import train  # pylint: disable=g-import-not-at-top
  config = demo_config()
  exp, state, _ = _built(config)
  _save_variables(tmp_path / "same", state)
  config.init_from = str(tmp_path / "same")
  config.init_from_scope = "full"
  loaded = train.apply_init_from(exp, state)
  np.testing.assert_array_equal(jax.tree.leaves(loaded.params)[0], jax.tree.leaves(state.params)[0])


def test_init_from_missing_path_is_the_last_line(tmp_path):
  """Checked with the config, before orbax starts (its threads failed again at exit)."""
  rc, last, out = _main("--config=configs/demo.py:runlocal", f"--workdir={tmp_path / 'w'}",
                        "--config.init_from=/nonexistent")
  assert rc == validation.EXIT_BAD_INPUT
  assert last.startswith("error: config.init_from='/nonexistent': no such file or directory"), out
  assert "Traceback" not in out and "RuntimeError" not in out


def test_init_from_folder_without_a_checkpoint_is_named(tmp_path):
  from pixcon_jax import train  # pylint: disable=g-import-not-at-top
  (tmp_path / "empty").mkdir()
  config = demo_config()
  config.init_from = str(tmp_path / "empty")
  exp, state, _ = _built(config)
  with pytest.raises(validation.MissingInputError,
                     match=f"config.init_from='{tmp_path / 'empty'}': no orbax checkpoint with "
                     "'params' found"):
    train.apply_init_from(exp, state)


# ---- signals -----------------------------------------------------------------------------------

def test_stopped_by_sigterm_has_a_nonzero_documented_exit_code():
  stopped = checkpointing.Stopped("SIGTERM", 4, "/runs/a")
  assert stopped.exit_code == checkpointing.EXIT_STOPPED == 128 + signal.SIGTERM == 143
  assert str(stopped) == ("SIGTERM received: saved the checkpoint of step 4 in /runs/a; rerun "
                          "the same command to resume (exit code 143)")
  assert checkpointing.Stopped("preemption notice", 4, "/a").exit_code == 143
  assert checkpointing.Stopped("SIGINT", 4, "/a").exit_code == 130
  assert "143" in (REPO / "README.md").read_text()


def test_main_exits_143_with_one_line_when_training_stopped(tmp_path):
  """main's handling of the loop's Stopped (the loop itself: test_train_loop's SIGTERM run)."""
  script = (
      "import sys\n"
      "from absl import app\n"
      "from pixcon_jax import checkpointing, main\n"
      "def stopped(config, workdir):\n"
      "  raise checkpointing.Stopped('SIGTERM', 4, workdir)\n"
      "main.run_mode = stopped\n"
      "app.run(main.main, flags_parser=main.parse_flags)\n")
  p = subprocess.run([sys.executable, "-c", script, "--nohugepages",
                      "--config=configs/demo.py:runlocal", f"--workdir={tmp_path}"], cwd=REPO,
                     env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)),
                     capture_output=True, text=True, timeout=120)
  assert p.returncode == 143, p.stderr[-3000:]
  assert p.stderr.strip().splitlines()[-1] == (
      f"stopped: SIGTERM received: saved the checkpoint of step 4 in {tmp_path}; rerun the same "
      f"command to resume (exit code 143)")


# ---- predict, convert_checkpoint, prepare_data -------------------------------------------------

def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path, caplog):
  wide = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)
  Image.fromarray(wide).save(tmp_path / "g16.png")
  with caplog.at_level(logging.WARNING):
    rgb = predict.read_image(str(tmp_path / "g16.png"))
  assert rgb.dtype == np.uint8 and rgb.shape == (16, 16, 3)
  np.testing.assert_array_equal(rgb[..., 0], (wide // 257).astype(np.uint8))  # not all 255
  assert "g16.png is I;16 grayscale" in caplog.text and "scaled to 8 bits" in caplog.text


def test_prepare_data_redoes_an_extraction_of_a_replaced_zip(tmp_path, caplog):
  from pixcon_jax.data import prepare  # pylint: disable=g-import-not-at-top
  manual, downloads = tmp_path / "manual", tmp_path / "data" / "downloads"
  manual.mkdir()
  with zipfile.ZipFile(manual / "data.zip", "w") as z:
    z.writestr("a.txt", "incomplete")
  extracted = downloads / "extracted" / "ZIP.data.zip"
  # First run: TFDS extracts (simulated) after the stamp is written.
  assert not prepare.refresh_stale_extraction(str(manual), str(downloads))
  extracted.mkdir(parents=True)
  # Same archive: the extraction is reused.
  assert not prepare.refresh_stale_extraction(str(manual), str(downloads))
  assert extracted.is_dir()
  # The zip is replaced by a good one: the old extraction goes, with a warning naming it.
  with zipfile.ZipFile(manual / "data.zip", "w") as z:
    z.writestr("a.txt", "complete")
    z.writestr("b.txt", "the file that was missing")
  with caplog.at_level(logging.WARNING):
    assert prepare.refresh_stale_extraction(str(manual), str(downloads))
  assert not extracted.exists()
  assert "extracted from other archives" in caplog.text and "data.zip" in caplog.text
  # An extraction of unknown origin (no stamp) is redone too.
  extracted.mkdir(parents=True)
  (downloads / prepare.STAMP_FILE).unlink()
  assert prepare.refresh_stale_extraction(str(manual), str(downloads))


def test_resource_tracker_note_about_shared_memory_is_silenced():
  # A child interpreter leaks a shared-memory block as grain's pool does at exit.
  leak = ("from multiprocessing import shared_memory\n"
          "s = shared_memory.SharedMemory(create=True, size=64)\n"
          "s.close()\n")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
  loud = subprocess.run([sys.executable, "-c", leak], env=env, capture_output=True, text=True,
                        timeout=60)
  assert "leaked shared_memory" in loud.stderr  # Python still warns without the filter.
  log_filters.quiet_resource_tracker(env)
  assert env["PYTHONWARNINGS"] == log_filters.RESOURCE_TRACKER_FILTER
  log_filters.quiet_resource_tracker(env)  # idempotent
  assert env["PYTHONWARNINGS"] == log_filters.RESOURCE_TRACKER_FILTER
  quiet = subprocess.run([sys.executable, "-c", leak], env=env, capture_output=True, text=True,
                         timeout=60)
  assert quiet.returncode == 0 and "leaked" not in quiet.stderr, quiet.stderr


_CLOSE_SCRIPT = """
import multiprocessing, sys
from absl import flags
flags.FLAGS.mark_as_parsed()
from pixcon_jax import data as data_lib
cfg = data_lib.default_data_config("synthetic")
cfg.synthetic_size, cfg.synthetic_num_train, cfg.crop_size = (32, 64), 8, (32, 32)
cfg.worker_count = 1
def make():
  return data_lib.make_train_iterator(cfg, data_lib.default_augment_config(),
                                      batch_size_per_process=2, seed=0, process_index=0,
                                      process_count=1)
def main():  # locals, as in train_and_evaluate
  a = make(); next(a)
  b = make(); b.set_state(a.get_state()); next(b)  # as a resumed run does
  print("workers before:", len(multiprocessing.active_children()), flush=True)
  for it in (a, b, b):  # twice is harmless
    data_lib.close_iterator(it)
  print("workers after:", len(multiprocessing.active_children()), flush=True)
if __name__ == "__main__":
  main()
"""


def test_closed_loader_iterators_leave_no_workers_or_exit_noise(tmp_path):
  script = tmp_path / "close_loaders.py"
  script.write_text(_CLOSE_SCRIPT)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
  p = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True,
                     env=dict(env, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)), timeout=120)
  assert p.returncode == 0, p.stderr[-3000:]
  before = int(p.stdout.split("workers before:")[1].split()[0])
  assert before >= 1 and "workers after: 0" in p.stdout, p.stdout
  for noise in ("handle is closed", "leaked shared_memory", "Traceback", "Exception ignored"):
    assert noise not in p.stderr, p.stderr[-3000:]


# ---- logs --------------------------------------------------------------------------------------

def test_orbax_and_grain_info_lines_are_filtered_but_warnings_kept():
  absl_logger = logging.getLogger("absl")
  before = list(absl_logger.filters)
  try:
    log_filters.quiet_library_logs()
    log_filters.quiet_library_logs()  # idempotent
    filters = [f for f in absl_logger.filters if f not in before]
    assert len(filters) == 1

    def record(path, level):
      return logging.LogRecord("absl", level, path, 1, "m", None, None)

    orbax_file = os.path.join(os.sep, "venv", "orbax", "checkpoint", "manager.py")
    grain_file = os.path.join(os.sep, "venv", "grain", "_src", "python", "x.py")
    ours = str(REPO / "pixcon_jax" / "train.py")
    assert not absl_logger.filter(record(orbax_file, logging.INFO))
    assert not absl_logger.filter(record(grain_file, logging.INFO))
    assert absl_logger.filter(record(orbax_file, logging.WARNING))
    assert absl_logger.filter(record(ours, logging.INFO))
    assert logging.getLogger("orbax").level == logging.WARNING
  finally:
    for f in list(absl_logger.filters):
      if f not in before:
        absl_logger.removeFilter(f)


def test_unprepared_dataset_is_an_input_error_naming_the_folder_and_the_fix(tmp_path):
  """main ends an InputError in one `error:` line (exit 2); a missing TFDS folder is one."""
  from pixcon_jax import validation  # pylint: disable=g-import-not-at-top
  from pixcon_jax.data import datasets  # pylint: disable=g-import-not-at-top
  source = datasets.make_source({"dataset": "cityscapes", "data_dir": str(tmp_path / "none")},
                               "train")
  with pytest.raises(validation.MissingInputError) as e:
    len(source)
  assert str(tmp_path / "none") in str(e.value) and "prepare_data.py" in str(e.value)
  # Only our instruction: not TFDS's hints about download_and_prepare or TFRECORD folders.
  assert "TFRECORD" not in str(e.value) and "download_and_prepare" not in str(e.value)


# ==== issue 28, rows 9-16 and 18: eval / predict fallback, scripts, SIGTERM at any time ======
# Each bad input ends in exit 2 and one `error:` line naming the flag, key or file (no
# traceback); the signal in exit 143 and one `stopped:` line.

def _script(name, *args, timeout=180):
  """`python scripts/NAME ARGS` -> (exit code, last non-empty line of stderr, stdout+stderr)."""
  p = subprocess.run([sys.executable, str(REPO / "scripts" / name), *map(str, args)], cwd=REPO,
                     env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)),
                     capture_output=True, text=True, timeout=timeout)
  lines = [line for line in p.stderr.splitlines() if line.strip()]
  return p.returncode, (lines[-1] if lines else ""), p.stdout + p.stderr


def _broken_newest(workdir, tmp_path):
  """A copy of the module's run whose newest checkpoint (step 2) has a truncated file."""
  run = _copy(workdir, tmp_path)
  _truncate_largest_file(run / "checkpoints" / "2" / "state")
  return run


def _inference(config):
  from pixcon_jax import setup  # pylint: disable=g-import-not-at-top
  return setup.for_inference(config)


# Rows 9 and 10: modes eval and predict read their weights with checkpointing.load_variables,
# which falls back as a resumed training does (checkpointing.newest_readable).

def test_eval_falls_back_from_a_truncated_newest_checkpoint(workdir, tmp_path, caplog):
  import json  # pylint: disable=g-import-not-at-top
  from pixcon_jax import evaluate  # pylint: disable=g-import-not-at-top
  run = _broken_newest(workdir, tmp_path)
  config = demo_config()
  config.mode = "eval"
  config.eval.max_batches = 1
  with caplog.at_level(logging.INFO):
    evaluate.evaluate_checkpoint(config, str(run))
  assert "checkpoint of step 2 is unreadable" in caplog.text
  assert (f"using the checkpoint of step 1 in {run / 'checkpoints'} (the newest readable; "
          f"step 2 is not)") in caplog.text
  (record,) = [json.loads(p.read_text()) for p in run.glob("eval_*.json")]
  assert record["step"] == 1 and record["weights"] == f"checkpoint {run / 'checkpoints'} step 1"
  # Modes eval and predict only read the run: nothing is renamed or deleted.
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1", "2"]


def test_predict_runs_on_the_previous_checkpoint_and_reports_it(workdir, tmp_path):
  run = _broken_newest(workdir, tmp_path)
  inputs = tmp_path / "in"
  inputs.mkdir()
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(inputs / "a.png")
  config = demo_config()
  config.mode = "predict"
  config.predict.input_dir = str(inputs)
  config.predict.output_dir = str(tmp_path / "out")
  report = predict.predict_folder(config, str(run))
  assert report["weights"] == f"checkpoint {run / 'checkpoints'} step 1"
  assert [w["input"] for w in report["written"]] == ["a.png"]


def test_no_readable_checkpoint_for_eval_is_named(workdir, tmp_path):
  run = _copy(workdir, tmp_path)
  for step in ("1", "2"):
    _truncate_largest_file(run / "checkpoints" / step / "state")
  config = demo_config()
  exp = _inference(config)
  with pytest.raises(validation.ConfigError, match=r"^no readable checkpoint under .*checkpoints "
                     r"\(steps \[2, 1\] unreadable\); delete that folder"):
    checkpointing.load_variables(config, str(run), model=exp.eval_model, mesh=exp.mesh)


# Row 11: an output folder that cannot be created fails before anything is loaded.

def test_predict_output_dir_that_cannot_be_created_is_one_line(tmp_path):
  inputs = tmp_path / "in"
  inputs.mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(inputs / "a.png")
  rc, last, out = _main("--config=configs/demo.py:runlocal", f"--workdir={tmp_path / 'w'}",
                        "--config.mode=predict", f"--config.predict.input_dir={inputs}",
                        "--config.predict.output_dir=/proc/pixcon_pred")
  assert rc == validation.EXIT_BAD_INPUT, out[-3000:]
  assert last == ("error: config.predict.output_dir='/proc/pixcon_pred': cannot create a folder "
                  "in '/proc' (No such file or directory): give a writable folder"), out[-3000:]
  assert "Traceback" not in out and not (tmp_path / "w").exists()


def test_predict_checks_its_output_dir_before_building_the_model(tmp_path, monkeypatch):
  inputs = tmp_path / "in"
  inputs.mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(inputs / "a.png")
  config = demo_config()
  config.mode = "predict"
  config.predict.input_dir = str(inputs)
  config.predict.output_dir = "/proc/pixcon_pred"

  def no_model(*args, **kwargs):
    raise AssertionError("the model was built before the output folder was checked")

  monkeypatch.setattr(segment.setup, "for_inference", no_model)
  with pytest.raises(validation.ConfigError, match="config.predict.output_dir='/proc/pixcon_pred'"):
    predict.predict_folder(config, str(tmp_path / "w"))
  # A folder that can be created passes, and the check leaves nothing behind.
  validation.check_output_dir(str(tmp_path / "new" / "deeper"), "config.predict.output_dir")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


# Rows 12 and 16: scripts/prepare_data.py.

def _zip(path, members):
  with zipfile.ZipFile(path, "w") as z:
    for name, data in members.items():
      z.writestr(name, data)


def test_prepare_data_truncated_zip_is_one_line_and_leaves_nothing(tmp_path):
  manual, data = tmp_path / "manual", tmp_path / "data"
  manual.mkdir()
  _zip(manual / "leftImg8bit_trainvaltest.zip", {"leftImg8bit/train/a/x.png": b"x" * 1000})
  _zip(manual / "gtFine_trainvaltest.zip", {"gtFine/train/a/y.png": os.urandom(20000)})
  whole = (manual / "gtFine_trainvaltest.zip").read_bytes()
  (manual / "gtFine_trainvaltest.zip").write_bytes(whole[:len(whole) // 2])
  rc, last, out = _script("prepare_data.py", "--dataset=cityscapes", f"--manual_dir={manual}",
                          f"--data_dir={data}")
  assert rc == validation.EXIT_BAD_INPUT, out[-3000:]
  assert last.startswith(f"error: --manual_dir={manual}: gtFine_trainvaltest.zip is truncated or "
                         f"not a zip archive"), out[-3000:]
  assert last.endswith("download it again") and "Traceback" not in out
  assert not data.exists()


def test_prepare_data_corrupt_member_removes_the_partial_extraction(tmp_path):
  """A zip whose directory reads but whose data does not: TFDS fails while extracting."""
  from pixcon_jax.data import prepare  # pylint: disable=g-import-not-at-top
  manual, data = tmp_path / "manual", tmp_path / "data"
  manual.mkdir()
  data.mkdir()
  (data / "keep.txt").write_text("a file of the user's")
  _zip(manual / "leftImg8bit_trainvaltest.zip",
       {"leftImg8bit/train/a/a_000000_000000_leftImg8bit.png": b"x" * 1000})
  _zip(manual / "gtFine_trainvaltest.zip",
       {"gtFine/train/a/a_000000_000000_gtFine_labelIds.png": b"y" * 100000})
  corrupt = bytearray((manual / "gtFine_trainvaltest.zip").read_bytes())
  corrupt[200:260] = b"z" * 60  # inside the member's data: its CRC fails on extraction
  (manual / "gtFine_trainvaltest.zip").write_bytes(bytes(corrupt))
  with pytest.raises(validation.ConfigError, match=r"an archive does not extract .*"
                     r"gtFine_trainvaltest.zip.*Bad CRC-32.*download it again; removed"):
    prepare.prepare_dataset("cityscapes", manual_dir=str(manual), data_dir=str(data))
  assert [p.name for p in data.iterdir()] == ["keep.txt"]  # the extraction went, the user's file stays


def test_prepare_data_missing_zip_is_one_line(tmp_path):
  rc, last, out = _script("prepare_data.py", "--dataset", "cityscapes", "--manual_dir", tmp_path,
                          "--data_dir", tmp_path / "d")
  assert rc == validation.EXIT_BAD_INPUT, out[-3000:]
  assert last.startswith(
      "error: Cityscapes: missing ['leftImg8bit_trainvaltest.zip', 'gtFine_trainvaltest.zip'] in "
      f"manual directory '{tmp_path}'"), out[-3000:]
  assert "Traceback" not in out and not (tmp_path / "d").exists()


# Rows 13-15: scripts/convert_checkpoint.py.

def test_convert_checkpoint_archive_of_unrelated_arrays_names_keys_and_models(tmp_path):
  np.savez(tmp_path / "other.npz", first=np.zeros(3), second=np.ones((2, 2)))
  rc, last, out = _script("convert_checkpoint.py", "--model=hrnet_w48_contrast",
                          f"--torch={tmp_path / 'other.npz'}", f"--out={tmp_path / 'o'}")
  assert rc == validation.EXIT_BAD_INPUT, out[-3000:]
  assert last.startswith(f"error: --torch={tmp_path / 'other.npz'} does not fit "
                         "--model=hrnet_w48_contrast: 0 of its 2 keys are arrays of that model; "
                         "2 keys are not, e.g. ['first', 'second']"), last
  assert "Registered models: deeplab_v3, " in last and "hrnet_w48_ocr_contrast" in last
  assert "Traceback" not in out and not (tmp_path / "o").exists()


def test_convert_checkpoint_names_a_non_zip_posing_as_npz(tmp_path):
  fake = tmp_path / "weights.npz"
  fake.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))  # a PNG renamed
  rc, last, out = _script("convert_checkpoint.py", "--model", "hrnet_w18_contrast", "--torch",
                          fake, "--out", tmp_path / "o")
  assert rc == validation.EXIT_BAD_INPUT, out[-3000:]
  assert last == (f"error: --torch={fake} is not an .npz archive (not a zip file); give the "
                  f"state_dict saved with numpy.savez, or the .pth itself")
  assert "allow_pickle" not in out and "Traceback" not in out


def test_convert_checkpoint_text_file_as_pth_without_torch_is_one_line(tmp_path, monkeypatch):
  notes = tmp_path / "notes.pth"
  notes.write_text("my notes\n")
  rc, last, out = _script("convert_checkpoint.py", "--torch", notes, "--out", tmp_path / "o")
  assert rc == validation.EXIT_BAD_INPUT, out[-3000:]
  assert last == (f"error: --torch={notes} is not a PyTorch checkpoint (neither a zip nor a "
                  f"pickle written by torch.save); give the official .pth, or an .npz of its "
                  f"state_dict")
  # A real-looking .pth (a pickle) without torch installed: the fix is named, as an InputError.
  script = helpers.load_script("convert_checkpoint")
  pth = tmp_path / "model.pth"
  pth.write_bytes(b"\x80\x04N.")  # pickle.dumps(None)
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
  with pytest.raises(validation.ConfigError, match=r"reading a \.pth needs PyTorch, which is not "
                     r"installed \(pip install torch\); or give an \.npz"):
    script.load_checkpoint(pth)


def test_script_flag_errors_are_one_line_with_exit_2(tmp_path):
  """absl's own flag errors (exit 1 under app.run) follow the contract through cli.run."""
  rc, last, out = _script("convert_checkpoint.py", "--num_classes=many", "--torch=x.npz",
                          f"--out={tmp_path}")
  assert rc == validation.EXIT_BAD_INPUT and "Traceback" not in out, out[-3000:]
  assert last.startswith("error: flag --num_classes=many: ") and last.endswith("see --helpshort")


def test_cli_fail_and_run_share_one_rule(capsys):
  from absl import app  # pylint: disable=g-import-not-at-top
  from pixcon_jax import cli  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit) as e:
    cli.fail("config.x=1:\n  expected   2")
  assert e.value.code == validation.EXIT_BAD_INPUT
  assert capsys.readouterr().err == "error: config.x=1: expected 2\n"
  with pytest.raises(app.UsageError, match=r"^--crop=256,x: expected 2 comma-separated integers"):
    cli.int_list(["256", "x"], "crop", length=2)
  assert cli.int_list(["0", "2"], "workers", minimum=0) == [0, 2]
  with pytest.raises(SystemExit) as e:
    cli.ArgumentParser(prog="bench").parse_args(["--nope"])
  assert e.value.code == validation.EXIT_BAD_INPUT
  assert capsys.readouterr().err.startswith("error: unrecognized arguments: --nope; see --help")


# Row 18: SIGTERM at any time.

def test_stopped_before_any_checkpoint_says_so():
  stopped = checkpointing.Stopped("SIGTERM", None, "/runs/a", saved=False)
  assert stopped.exit_code == 143
  assert str(stopped) == ("SIGTERM received: stopped before the first checkpoint, so /runs/a "
                          "holds none; rerun the same command to start again (exit code 143)")
  assert str(checkpointing.Stopped("SIGTERM", 30, "/runs/a", saved=False)) == (
      "SIGTERM received: stopped before a new checkpoint could be saved; the latest is step 30 "
      "in /runs/a; rerun the same command to resume from it (exit code 143)")


class _FakeManager:
  def __init__(self, latest):
    self.latest, self.closed = latest, False

  def wait_until_finished(self):
    pass

  def latest_step(self):
    return self.latest

  def close(self):
    self.closed = True


def test_a_data_worker_lost_during_a_requested_stop_is_the_stop():
  from pixcon_jax import train  # pylint: disable=g-import-not-at-top

  def dead_worker():
    raise RuntimeError("Worker process was terminated unexpectedly with exit code -15")
    yield  # pylint: disable=unreachable

  stop = checkpointing.StopRequest()
  with pytest.raises(RuntimeError, match="terminated unexpectedly"):  # no stop asked: a bug
    train._next_or_stop(dead_worker(), stop, _FakeManager(None), "/runs/a")
  stop._handle(signal.SIGTERM, None)  # as the signal does
  manager = _FakeManager(None)
  with pytest.raises(checkpointing.Stopped, match="before the first checkpoint") as e:
    train._next_or_stop(dead_worker(), stop, manager, "/runs/a")
  assert e.value.exit_code == 143 and manager.closed
  assert train._next_or_stop(iter([7]), stop, manager, "/runs/a") == 7


_WORKER_SCRIPT = """
import multiprocessing, os, signal, time
from absl import flags
flags.FLAGS.mark_as_parsed()
from pixcon_jax import checkpointing
from pixcon_jax import data as data_lib
cfg = data_lib.default_data_config("synthetic")
cfg.synthetic_size, cfg.synthetic_num_train, cfg.crop_size = (32, 64), 8, (32, 32)
cfg.worker_count = 1
def main():
  stop = checkpointing.StopRequest().install()  # the trainer's handler
  it = data_lib.make_train_iterator(cfg, data_lib.default_augment_config(),
                                    batch_size_per_process=2, seed=0, process_index=0,
                                    process_count=1)
  next(it)
  workers = multiprocessing.active_children()
  os.killpg(0, signal.SIGTERM)  # as a job scheduler stops a job: the whole process group
  time.sleep(1.0)
  print("requested", stop.requested, "workers", len(workers),
        "alive", all(w.is_alive() for w in workers), flush=True)
  for _ in range(3):
    next(it)
  print("batches after the signal: 3", flush=True)
  data_lib.close_iterator(it)
if __name__ == "__main__":
  main()
"""


def test_data_workers_ignore_sigterm_to_the_process_group(tmp_path):
  script = tmp_path / "workers.py"
  script.write_text(_WORKER_SCRIPT)
  p = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True,
                     env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)),
                     timeout=180, start_new_session=True)  # its own process group
  assert p.returncode == 0, p.stderr[-3000:]
  assert "requested True workers 1 alive True" in p.stdout, p.stdout + p.stderr[-3000:]
  assert "batches after the signal: 3" in p.stdout


SIGNAL_RUN = [  # configs/demo.py:runlocal shrunk
    # Without contrast (a model without projection head): the step compiles in half the time,
    # and stopping does not depend on the loss.
    "--config.model.name=hrnet_w18", "--config.contrast.enabled=False",
    "--config.model.overrides.widths=(4,8,16,32)", "--config.model.overrides.stem_width=8",
    "--config.model.overrides.layer1_planes=4", "--config.model.proj_dim=8",
    "--config.data.crop_size=(32,32)", "--config.data.batch_size=2",
    "--config.data.synthetic_size=(32,64)", "--config.data.eval_pad_size=(32,64)",
    "--config.data.synthetic_num_train=8", "--config.data.synthetic_num_val=2",
    "--config.data.eval_batch_size=2", "--config.data.worker_count=1",
    "--config.memory.pixel_queue_size=16", "--config.schedule.total_steps=50",
    "--config.eval.every_steps=50", "--config.checkpoint.every_steps=50",
    "--config.eval.num_summary_images=0",
    # The stop is acted on at step 4: steps 2-4 need batches from the worker after the signal
    # (with one batch prefetched), so a worker killed by it fails the run.
    "--config.data.prefetch=1", "--config.checkpoint.preemption_check_every_steps=4",
]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


def _train_and_signal(workdir, cache, marker, *, timeout=600):
  """Trains with SIGNAL_RUN; SIGTERM to its process group once stderr shows `marker`.

  Returns (exit code, last non-empty line of stderr, stderr).
  """
  import time  # pylint: disable=g-import-not-at-top
  log_path = workdir.parent / f"{workdir.name}.log"
  env = helpers.subprocess_env(cache_dir=cache)
  with open(log_path, "w") as log:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pixcon_jax.main", "--nohugepages",
         "--config=configs/demo.py:runlocal", f"--workdir={workdir}", *SIGNAL_RUN],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < timeout:
      if marker in log_path.read_text():
        os.killpg(proc.pid, signal.SIGTERM)  # the trainer and its data worker, as a scheduler
        break
      time.sleep(0.02)
    proc.wait(timeout=timeout)
  err = log_path.read_text()
  lines = [line for line in err.splitlines() if line.strip()]
  return proc.returncode, (lines[-1] if lines else ""), err


def test_sigterm_during_the_first_step_saves_a_checkpoint_and_exits_143(tmp_path, compile_cache):
  run = tmp_path / "run"
  # Logged once the first batch is read, before the train step is compiled and run.
  rc, last, err = _train_and_signal(run, compile_cache, "step 1: batch ready")
  assert rc == checkpointing.EXIT_STOPPED, err[-3000:]
  assert last == (f"stopped: SIGTERM received: saved the checkpoint of step 4 in {run}; rerun "
                  f"the same command to resume (exit code 143)"), err[-3000:]
  assert "Traceback" not in err and (run / "checkpoints" / "4").is_dir()


def test_sigterm_while_the_first_batch_loads_exits_143(tmp_path, compile_cache):
  run = tmp_path / "run"
  # Logged just before the loop asks the (just started) data worker for the first batch.
  rc, last, err = _train_and_signal(run, compile_cache, "training from step 0")
  assert rc == checkpointing.EXIT_STOPPED, err[-3000:]
  # The worker ignores the signal and step 4 is saved; had the signal reached the worker
  # before it could ignore it, the stop says that no checkpoint exists.
  assert last in (
      f"stopped: SIGTERM received: saved the checkpoint of step 4 in {run}; rerun the same "
      f"command to resume (exit code 143)",
      f"stopped: SIGTERM received: stopped before the first checkpoint, so {run} holds none; "
      f"rerun the same command to start again (exit code 143)"), err[-3000:]
  assert "Traceback" not in err
