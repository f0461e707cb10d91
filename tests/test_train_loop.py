"""End-to-end: the demo runlocal config (tiny HRNet) trains, evaluates, writes TensorBoard events,
stops cleanly on SIGTERM, survives SIGKILL, and resumes exactly (bitwise equal params).

Every run is a subprocess of `python -m pixcon_jax.main`; they share a persistent compilation
cache so restarts do not recompile.
"""
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

import helpers

REPO = pathlib.Path(__file__).resolve().parents[1]
TOTAL_STEPS = 16
STOP_CHECK_EVERY = 2

TINY = [
    "--config.model.overrides.widths=(8,16,32,64)", "--config.model.overrides.stem_width=16",
    "--config.model.overrides.layer1_planes=8", "--config.model.proj_dim=16",
    "--config.data.crop_size=(64,64)", "--config.data.batch_size=4",
    "--config.data.synthetic_size=(64,96)", "--config.data.eval_pad_size=(64,96)",
    "--config.data.synthetic_num_train=32", "--config.data.synthetic_num_val=4",
    "--config.data.eval_batch_size=4", "--config.data.worker_count=0",
    f"--config.schedule.total_steps={TOTAL_STEPS}", "--config.log.every_steps=1",
    "--config.eval.every_steps=8", "--config.checkpoint.every_steps=4",
    "--config.eval.num_summary_images=2", "--config.memory.pixel_queue_size=64",
    # Contrast warm-up as in the official recipe, so the test sees lambda switch on.
    "--config.contrast.warmup_steps=3",
    # A forced collapse: every gap is below 2, so the collapse alarm goes off at the 3rd logged
    # step from the warm-up on (step 5).
    "--config.log.collapse_gap=2.0", "--config.log.collapse_patience=3",
    # Stop requests are looked for at steps 2, 4, 6, ... only (checkpoints at 4, 8, ...).
    f"--config.checkpoint.preemption_check_every_steps={STOP_CHECK_EVERY}",
]


def _env(cache_dir):
  return helpers.subprocess_env(cache_dir=cache_dir)


def _cmd(workdir):
  return [sys.executable, "-m", "pixcon_jax.main", "--config=configs/demo.py:runlocal",
          f"--workdir={workdir}", *TINY]


def _steps(workdir):
  ck = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in ck.glob("*") if p.name.isdigit()) if ck.is_dir() else []


def _run(workdir, cache_dir, log_name, *, signal_at=None, sig=None, timeout=900):
  """Runs training; with `signal_at`, sends `sig` once a checkpoint >= signal_at exists."""
  log = open(pathlib.Path(workdir).parent / f"{log_name}.log", "w")
  proc = subprocess.Popen(_cmd(workdir), cwd=REPO, env=_env(cache_dir), stdout=subprocess.PIPE,
                          stderr=log, text=True)
  if signal_at is not None:
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < timeout:
      if any(s >= signal_at for s in _steps(workdir)):
        proc.send_signal(sig)
        break
      time.sleep(0.05)
  out, _ = proc.communicate(timeout=timeout)
  log.close()
  return proc.returncode, out


def _final_params(workdir, step):
  """The saved TrainState at `step`, every leaf as a host numpy array."""
  from pixcon_jax import checkpointing  # pylint: disable=g-import-not-at-top
  return checkpointing.restore_as_numpy(
      str(pathlib.Path(workdir) / "checkpoints" / str(step) / "state"))


def _events(workdir):
  """{tag: [(step, value or image bytes)]} from the TensorBoard event files."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = {}
  for f in sorted(pathlib.Path(workdir).glob("events.out.tfevents.*")):
    for e in tf.compat.v1.train.summary_iterator(str(f)):
      for v in e.summary.value:
        if v.HasField("tensor"):
          t = tf.make_ndarray(v.tensor)
          if t.size == 0:  # hparams plugin entries.
            continue
          value = t if t.dtype == object else float(np.asarray(t).reshape(-1)[0])
        elif v.HasField("image"):
          value = v.image.encoded_image_string
        else:
          value = v.simple_value
        out.setdefault(v.tag, []).append((e.step, value))
  return out


@pytest.fixture(scope="module")
def runs():
  """Run A uninterrupted; run B: SIGTERM, restart, SIGKILL, restart to the end."""
  # A private directory: concurrent pytest sessions rotate /tmp/pytest-of-<user> and could
  # delete a shared basetemp under these minutes-long runs.
  root = pathlib.Path(tempfile.mkdtemp(prefix="pixcon_train_loop_"))
  cache = root / "jax_cache"
  a, b = root / "a", root / "b"
  t0 = time.time()
  rc_a, out_a = _run(a, cache, "a")
  t_a = time.time() - t0
  rc_term, out_term = _run(b, cache, "b_term", signal_at=4, sig=signal.SIGTERM)
  steps_after_term = _steps(b)
  # Killed once the next periodic checkpoint after the SIGTERM stop is written.
  rc_kill, _ = _run(b, cache, "b_kill", signal_at=max(steps_after_term) + 1, sig=signal.SIGKILL)
  steps_after_kill = _steps(b)
  rc_b, out_b = _run(b, cache, "b_final")
  print(f"run A {t_a:.0f}s; total {time.time() - t0:.0f}s")
  yield dict(a=a, b=b, rc_a=rc_a, out_a=out_a, rc_term=rc_term, out_term=out_term,
              steps_after_term=steps_after_term, rc_kill=rc_kill,
              steps_after_kill=steps_after_kill, rc_b=rc_b, out_b=out_b, root=root)
  shutil.rmtree(root, ignore_errors=True)


def _log(runs, name):
  return (runs["root"] / f"{name}.log").read_text()[-5000:]


def test_demo_runlocal_trains_and_prints_final_miou(runs):
  assert runs["rc_a"] == 0, _log(runs, "a")
  assert "final mIoU: " in runs["out_a"], runs["out_a"]
  assert _steps(runs["a"])[-1] == TOTAL_STEPS


def test_tensorboard_has_losses_miou_per_class_iou_and_images(runs):
  ev = _events(runs["a"])
  for tag in ("train/loss", "train/ce_loss", "train/contrast_loss", "train/lr", "train/grad_norm",
              "eval/miou", "eval/iou/road", "eval/iou/car", "eval/predictions"):
    assert tag in ev, (tag, sorted(ev))
  assert len(ev["train/loss"]) == TOTAL_STEPS
  assert [s for s, _ in ev["eval/miou"]] == [8, 16]
  assert all(0.0 <= v <= 1.0 for _, v in ev["eval/miou"])


def test_sigterm_saves_and_exits_cleanly(runs):
  # 143 = checkpointing.EXIT_STOPPED: "saved, rerun to resume", unlike 0 = finished.
  assert runs["rc_term"] == 143, _log(runs, "b_term")
  assert "final mIoU" not in runs["out_term"]
  assert runs["steps_after_term"] and runs["steps_after_term"][-1] < TOTAL_STEPS, runs
  assert "SIGTERM received" in _log(runs, "b_term")
  # The stop is taken at a check step, and that step is saved.
  assert runs["steps_after_term"][-1] % STOP_CHECK_EVERY == 0, runs["steps_after_term"]


def test_sigkill_then_resume_is_bitwise_identical(runs):
  assert runs["rc_kill"] == -signal.SIGKILL, (runs["rc_kill"], _log(runs, "b_kill"))
  assert runs["steps_after_kill"][-1] < TOTAL_STEPS, runs["steps_after_kill"]
  assert runs["rc_b"] == 0, _log(runs, "b_final")
  assert "final mIoU: " in runs["out_b"]
  a = _final_params(runs["a"], TOTAL_STEPS)
  b = _final_params(runs["b"], TOTAL_STEPS)
  import jax  # pylint: disable=g-import-not-at-top
  la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
  # The memory bank and RNG are part of the state, so they are compared above too.
  assert any("memory" in jax.tree_util.keystr(p) for p, _ in la)


def test_contrast_on_after_warmup_and_after_resume(runs):
  ev_b = _events(runs["b"])
  weights = dict(ev_b["train/contrast_weight"])
  resumed_at = runs["steps_after_term"][-1]
  assert all(weights[s] == 0.0 for s in weights if s <= 3), weights
  assert all(weights[s] == 1.0 for s in weights if s > 3), weights
  assert any(s > resumed_at for s in weights)
  losses = dict(ev_b["train/contrast_loss"])
  assert all(losses[s] > 0 for s in losses if s > resumed_at)


def test_collapse_alarm_logs_one_line_and_a_tensorboard_flag(runs):
  log = (runs["root"] / "a.log").read_text()
  lines = [line for line in log.splitlines() if "embedding collapse:" in line]
  assert len(lines) == 1 and "docs/ABLATIONS.md" in lines[0], lines
  flag = dict(_events(runs["a"])["train/embedding/collapse_alarm"])
  assert all(flag[s] == (1.0 if s >= 5 else 0.0) for s in flag), flag
  assert sorted(flag) == list(range(1, TOTAL_STEPS + 1))


def test_eval_mode_reproduces_the_final_miou(runs):
  """`config.mode=eval` on the finished workdir gives the loop's final mIoU (same protocol)."""
  import json  # pylint: disable=g-import-not-at-top
  final = float(runs["out_a"].split("final mIoU: ")[1].split()[0])
  proc = subprocess.run(_cmd(runs["a"]) + ["--config.mode=eval"], cwd=REPO,
                        env=_env(runs["root"] / "jax_cache"), capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-5000:]
  files = list(pathlib.Path(runs["a"]).glob("eval_*.json"))
  assert files, sorted(p.name for p in pathlib.Path(runs["a"]).iterdir())
  miou = json.loads(files[0].read_text())
  miou = miou.get("miou", miou.get("metrics", {}).get("miou"))
  assert abs(float(miou) - final) < 1e-4, (miou, final)


def test_init_from_merges_backbone_only_or_full_model():
  """`config.init_from` weights: 'backbone' touches only the backbone subtree, 'full' all."""
  from pixcon_jax import checkpointing  # pylint: disable=g-import-not-at-top
  variables = {"params": {"backbone": {"conv": {"kernel": np.zeros((3, 3))}},
                          "cls_head": {"kernel": np.zeros((2, 5))}},
               "batch_stats": {"backbone": {"bn": {"mean": np.zeros(3)}}}}
  # A backbone-only (ImageNet) checkpoint stores the backbone at its root.
  backbone = {"params": {"conv": {"kernel": np.ones((3, 3))}, "fc": {"kernel": np.ones(4)}},
              "batch_stats": {"bn": {"mean": np.ones(3)}}}
  merged, report = checkpointing.merge_pretrained(variables, backbone, scope="backbone")
  assert merged["params"]["backbone"]["conv"]["kernel"].sum() == 9
  assert merged["batch_stats"]["backbone"]["bn"]["mean"].sum() == 3
  assert merged["params"]["cls_head"]["kernel"].sum() == 0
  assert report["unexpected"] == ["params/backbone/fc/kernel"]
  # A full official checkpoint with another class count: the classifier is skipped, reported.
  full = {"params": {"backbone": {"conv": {"kernel": np.ones((3, 3))}},
                     "cls_head": {"kernel": np.ones((2, 19))}}, "batch_stats": {}}
  merged, report = checkpointing.merge_pretrained(variables, full, scope="full")
  assert merged["params"]["cls_head"]["kernel"].shape == (2, 5)
  assert len(report["shape_mismatch"]) == 1 and report["loaded"] == ["params/backbone/conv/kernel"]


def test_load_pretrained_reads_numpy_without_guessing_shardings(tmp_path):
  """Converted weights load as host numpy, so no device layout of the saving machine is assumed
  (orbax warns, and may fail on another topology, when it restores jax arrays without a target)."""
  import warnings  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from pixcon_jax import checkpointing  # pylint: disable=g-import-not-at-top
  saved = {"params": {"conv": {"kernel": jnp.arange(6.0).reshape(2, 3)}},
           "batch_stats": {"bn": {"mean": jnp.ones(3, jnp.float32)}}}
  ocp.PyTreeCheckpointer().save(str(tmp_path / "w"), saved)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # Any orbax UserWarning fails the test.
    loaded = checkpointing.load_pretrained(str(tmp_path / "w"))
  leaves = jax.tree.leaves(loaded)
  assert leaves and all(type(x) is np.ndarray for x in leaves), [type(x) for x in leaves]
  np.testing.assert_array_equal(loaded["params"]["conv"]["kernel"], np.arange(6.0).reshape(2, 3))
  np.testing.assert_array_equal(loaded["batch_stats"]["bn"]["mean"], np.ones(3))
  with pytest.raises(FileNotFoundError, match="init_from=.*no orbax checkpoint"):
    checkpointing.load_pretrained(str(tmp_path / "missing"))


def _compile_quick(jitted, *args):
  """The compiled `jitted(*args)`, at XLA:CPU backend optimisation level 0 (tiny nets: compile-bound)."""
  import jax  # pylint: disable=g-import-not-at-top
  lowered = jitted.lower(*args)
  if jax.default_backend() == "cpu":
    return lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
  return lowered.compile()


LEARN_STEPS = 120


def test_tiny_model_learns_the_synthetic_scenes():
  """A few hundred tiny CE steps: the loss falls and val mIoU rises well above the untrained net's.

  The demo's synthetic scenes with the generic tiny HRNet (`configs/common.apply_runlocal`), CE
  only; the baseline is the same initialisation evaluated before its first step. A sign error
  in the update, a dead optimizer or a loss detached from the params fails both checks (loss
  and mIoU measured: 3.3 -> 1.0 and 0.02 -> 0.27 over 200 steps). About 1-2 min on 2 shared cores.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from configs import common, demo  # pylint: disable=g-import-not-at-top
  from pixcon_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from pixcon_jax import inference, metrics, setup, sharding, train  # pylint: disable=g-import-not-at-top
  from pixcon_jax import train_step as ts  # pylint: disable=g-import-not-at-top
  config = common.apply_runlocal(demo.get_config("runlocal"))
  config.model.name = "hrnet_w18"  # CE only: no projection head.
  config.contrast.enabled = False
  config.data.batch_size = 4
  config.schedule.total_steps = LEARN_STEPS
  exp = setup.for_training(config)
  mesh = sharding.make_mesh(jax.devices()[:1])
  state = setup.initial_state(exp)
  train_iter = data_lib.make_train_iterator(config.data, config.augment, batch_size_per_process=4,
                                            seed=int(config.data.seed))
  val = list(train.make_eval_iterator(exp))

  apply_fn = inference.logits_apply_fn(exp.eval_model)
  settings = inference.settings_from_config(config.eval)
  predict = jax.jit(lambda v, x: jnp.argmax(inference.predict_scores(apply_fn, v, x,
                                                                    settings=settings), -1))
  predict = _compile_quick(predict, {"params": state.params, "batch_stats": state.batch_stats},
                           jnp.asarray(val[0]["image"]))

  def val_miou(s) -> float:
    variables = {"params": s.params, "batch_stats": s.batch_stats}
    cm = sum(metrics.confusion_matrix_numpy(np.asarray(predict(variables, jnp.asarray(b["image"]))),
                                            b["label"], config.model.num_classes,
                                            b["valid"][:, None, None]) for b in val)
    return float(metrics.metrics_from_confusion_matrix(cm)["miou"])

  untrained = val_miou(state)
  step = None
  losses = []
  for _ in range(LEARN_STEPS):
    batch = next(train_iter)
    batch = sharding.host_local_to_global({k: batch[k] for k in ts.TRAIN_BATCH_KEYS}, mesh)
    if step is None:
      step = _compile_quick(ts.make_train_step(config, exp.train_model, exp.tx, mesh, donate=False),
                            state, batch)
    state, m = step(state, batch)
    losses.append(m["loss"])
  losses = np.asarray(jax.device_get(losses))
  trained = val_miou(state)
  first, last = float(losses[:10].mean()), float(losses[-20:].mean())
  print(f"loss {first:.3f} -> {last:.3f}; val mIoU {untrained:.3f} -> {trained:.3f}")
  assert np.all(np.isfinite(losses)), losses
  assert last < 0.5 * first, (first, last)
  assert trained > untrained + 0.12, (untrained, trained)
