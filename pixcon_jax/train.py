"""The training loop: `train_and_evaluate(config, workdir)`.

grain input (per-process shards -> global arrays), the sharded train step, CLU writers
(TensorBoard + log) and ReportProgress, periodic evaluation (mIoU, per-class IoU under class
names, prediction images), orbax checkpoints of {state, data iterator} (latest few + best
mIoU), SIGTERM / preemption -> save and exit, exact resume, NaN/Inf stop.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np
from clu import metric_writers
from clu import periodic_actions
from etils import epath

from pixcon_jax import checkpointing
from pixcon_jax import data as data_lib
from pixcon_jax import evaluate as evaluate_lib
from pixcon_jax import inference
from pixcon_jax import models
from pixcon_jax import paths
from pixcon_jax import precision
from pixcon_jax import setup
from pixcon_jax import sharding
from pixcon_jax import train_step as train_step_lib
from pixcon_jax import validation
from pixcon_jax.contrast import health as contrast_health


# Datasets of the paper's experiments, which all start from ImageNet weights (Sec. 4.1).
REAL_DATASETS = ("cityscapes", "pascal_context", "coco_stuff")
README_SECTION = "README.md, 'Cityscapes end to end'"


def from_scratch_warning(config: ml_collections.ConfigDict) -> str | None:
  """The one warning line of a new run on a real dataset without `init_from`, else None."""
  dataset = config.data.get("dataset", "")
  if config.get("init_from") or dataset not in REAL_DATASETS:
    return None
  model = config.model.name
  backbone = "HRNetV2-W48" if model.startswith("hrnet") else "ResNet-101"
  return (f"config.init_from is not set: {model} trains on {dataset} from random weights, while "
          f"the paper starts from ImageNet {backbone} weights; convert them with "
          f"scripts/convert_checkpoint.py --backbone_only and pass config.init_from "
          f"(see {README_SECTION}).")


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN/Inf; the run stops keeping its last good checkpoint."""


def apply_init_from(exp: setup.TrainingExperiment,
                    state: train_step_lib.TrainState) -> train_step_lib.TrainState:
  """Loads converted weights (`config.init_from`) into a fresh state: full model or backbone.

  Scope 'backbone' or 'full' fails when more than `config.init_from_max_mismatch` of the
  model's arrays in scope are missing from the checkpoint or have other shapes (another
  architecture would otherwise train on from random weights); 'partial' loads whatever
  matches and lists the rest at WARNING.
  """
  c = exp.config
  scope = c.init_from_scope
  pretrained = checkpointing.load_pretrained(c.init_from)
  variables = jax.tree.map(np.asarray, {"params": state.params, "batch_stats": state.batch_stats})
  merged, report = checkpointing.merge_pretrained(
      variables, pretrained, scope="full" if scope == "partial" else scope,
      backbone_prefix=models.BACKBONE_PREFIX)
  bad = report["missing"] + report["shape_mismatch"]
  in_scope = len(report["loaded"]) + len(bad)
  limit = float(c.get("init_from_max_mismatch", 0.0))
  if scope != "partial" and (not report["loaded"] or len(bad) > limit * in_scope):
    raise validation.ConfigError(
        f"config.init_from={c.init_from!r} does not fit {c.model.name!r} (scope {scope!r}): "
        f"{len(bad)} of {in_scope} arrays are missing or have other shapes (e.g. "
        f"{'; '.join(bad[:3])}), more than config.init_from_max_mismatch={limit}. Convert the "
        f"checkpoint for this model and config.model.overrides, or set "
        f"config.init_from_scope=partial to load only the matching arrays.")
  logging.info("init_from %s (%s): loaded %d arrays; %d missing, %d unexpected, %d shape "
               "mismatches", c.init_from, scope, len(report["loaded"]),
               len(report["missing"]), len(report["unexpected"]), len(report["shape_mismatch"]))
  for key in ("missing", "unexpected", "shape_mismatch"):
    if report[key]:
      logging.log(logging.WARNING if key != "unexpected" else logging.INFO,
                  "init_from %s (%d, not loaded): %s", key, len(report[key]), report[key][:20])
  rep = sharding.replicated(exp.mesh)
  params = jax.device_put(merged["params"], rep)
  batch_stats = jax.device_put(merged["batch_stats"], rep)
  # The momentum buffers start at zero either way; re-init keeps the tree structure.
  opt_state = jax.jit(exp.tx.init, out_shardings=rep)(params)
  return state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state)


CONFIG_FILE = "config.json"  # The run's config, written at its start (names keys on a mismatch).


def save_run_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes `workdir/config.json` (process 0) unless the run already has one."""
  path = epath.Path(workdir) / CONFIG_FILE
  if jax.process_index() == 0 and not path.exists():
    path.write_text(config.to_json_best_effort(indent=1))


def config_differences(config: ml_collections.ConfigDict, workdir: str) -> str:
  """' Config keys that differ from the run's config.json: model.x (a vs b); ...' or ''."""
  path = epath.Path(workdir) / CONFIG_FILE
  try:
    saved = _flatten(json.loads(path.read_text()))
  except (OSError, ValueError):
    return ""
  now = _flatten(json.loads(config.to_json_best_effort()))
  keys = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)
          and k.split(".")[0] in ("model", "memory", "data", "contrast")]
  if not keys:
    return ""
  return (" Config keys that differ from the run's " + CONFIG_FILE + ": " + "; ".join(
      f"config.{k} ({saved.get(k)!r} there, {now.get(k)!r} now)" for k in keys[:6]) + ".")


# ------------------------------------------------------------------------------------------
# Evaluation and summaries.

def make_eval_iterator(exp: setup.Experiment):
  """This process's share of the evaluation split, in batches (`config.data.eval_batch_size`)."""
  c = exp.config
  return data_lib.make_eval_iterator(
      c.data, c.augment, batch_size_per_process=c.data.eval_batch_size // jax.process_count(),
      process_index=jax.process_index(), process_count=jax.process_count())


def _colorize(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
  """[..., H, W] ids -> [..., H, W, 3] uint8; 255 (ignore) is black."""
  lut = np.zeros((256, 3), np.uint8)
  lut[:len(palette)] = palette
  return lut[np.clip(label, 0, 255).astype(np.int64)]


Predictor = Callable[[Any, np.ndarray], jax.Array]


def make_summary_predictor(exp: setup.Experiment) -> Predictor:
  """Jitted `(variables, image [B, H, W, 3]) -> logits [B, H, W, C]`: one pass at full size.

  For the prediction images of the periodic evaluation (not the evaluation protocol): the
  logits at the head's stride resized to the image, under the configured matmul precision.
  """
  apply_fn = inference.logits_apply_fn(exp.eval_model)
  return jax.jit(precision.with_matmul_precision(
      functools.partial(inference.predict_scores, apply_fn,
                        settings=inference.InferenceSettings()),
      precision.matmul_precision(exp.config)))


def prediction_images(exp: setup.Experiment, predictor: Predictor, variables: Any,
                      batch: Mapping[str, np.ndarray], num: int) -> np.ndarray:
  """[num, H, 3 W, 3] uint8 panels: input | ground truth | prediction (dataset palette).

  Runs on this process's first local device only (a local computation on every process),
  with single-device copies of the replicated variables.
  """
  image = np.asarray(batch["image"][:num], np.float32)
  label = np.asarray(batch["label"][:num])
  local = jax.tree.map(lambda x: x.addressable_data(0), variables)
  pred = np.asarray(jnp.argmax(predictor(local, image), axis=-1))
  lo = image.min(axis=(1, 2, 3), keepdims=True)
  hi = image.max(axis=(1, 2, 3), keepdims=True)
  shown = ((image - lo) / np.maximum(hi - lo, 1e-6) * 255).astype(np.uint8)
  if exp.config.augment.get("bgr", False):
    shown = shown[..., ::-1]
  palette = np.asarray(exp.info.palette)
  return np.concatenate([shown, _colorize(label, palette), _colorize(pred, palette)], axis=2)


def evaluate(exp: setup.Experiment, evaluator: evaluate_lib.Evaluator, predictor: Predictor,
             state: train_step_lib.TrainState, writer: metric_writers.MetricWriter,
             step: int) -> dict[str, Any]:
  """Validation mIoU / per-class IoU to the writers, plus a few prediction images."""
  c = exp.config
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  t0 = time.time()
  eval_iter = make_eval_iterator(exp)
  try:
    metrics = evaluator(variables, eval_iter, max_batches=c.eval.get("max_batches"))
  finally:
    data_lib.close_iterator(eval_iter)  # Else its workers linger until exit (see there).
  scalars = {f"eval/{k}": float(v) for k, v in metrics.items()
             if np.ndim(v) == 0 and np.isfinite(float(v))}
  scalars["eval/seconds"] = time.time() - t0
  writer.write_scalars(step, scalars)
  num = int(c.eval.get("num_summary_images", 0))
  if num > 0:
    first_iter = make_eval_iterator(exp)
    try:
      first = next(first_iter)
    finally:
      data_lib.close_iterator(first_iter)
    valid = np.asarray(first.get("valid", np.ones(len(first["image"]), bool)))
    first = {k: np.asarray(v)[valid] for k, v in first.items() if k in ("image", "label")}
    if len(first["image"]):
      writer.write_images(step, {"eval/predictions": prediction_images(exp, predictor, variables,
                                                                       first, num)})
  writer.flush()
  logging.info("step %d: eval mIoU %.4f (%.1fs)", step, float(metrics["miou"]),
               scalars["eval/seconds"])
  return metrics


# ------------------------------------------------------------------------------------------
# The loop.

def make_collapse_alarm(config: ml_collections.ConfigDict) -> contrast_health.CollapseAlarm | None:
  """The collapse alarm of a contrast run that logs the embedding's health, else None."""
  if not (config.contrast.get("enabled", False) and config.log.get("embedding_health", True)):
    return None
  return contrast_health.CollapseAlarm(
      threshold=float(config.log.get("collapse_gap", 0.05)),
      patience=int(config.log.get("collapse_patience", 4)),
      start_step=int(config.contrast.get("warmup_steps", 0)))


def _check_finite(metrics: Mapping[str, jax.Array], step: int, manager) -> None:
  loss = float(jax.device_get(metrics["loss"]))
  if not np.isfinite(loss):
    manager.wait_until_finished()
    last = manager.latest_step()
    raise NonFiniteLossError(
        f"non-finite loss ({loss}) at step {step}: stopping. No checkpoint was written after the "
        f"last good one (step {last}); lower config.optim.lr or check the data, then restart "
        f"from it.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       mesh: Mesh | None = None) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds a checkpoint) and evaluates.

  SIGTERM / SIGINT are caught from the start (setup and compiling included) and acted on at
  the next stop check of the loop (`checkpoint.preemption_check_every_steps`).

  `mesh` is the devices to train on (default: every device of the run, `sharding.make_mesh`).

  Returns:
    The final evaluation metrics (`miou`, `iou/<class>`, ...).
  Raises:
    checkpointing.Stopped after saving a checkpoint when a signal or preemption notice stopped
    the run early (its `exit_code` is what `main` exits with); without saving when the data
    workers went with the signal (its message names the latest checkpoint, if any).
    validation.InputError for a workdir or init_from that does not fit the config.
  """
  stop = checkpointing.StopRequest(
      every_steps=config.checkpoint.preemption_check_every_steps).install()
  try:
    return _train_and_evaluate(config, workdir, stop, mesh)
  finally:
    stop.uninstall()


def _next_or_stop(iterator: Any, stop: checkpointing.StopRequest, manager: Any,
                  workdir: Any) -> Any:
  """next(iterator); if it fails after a stop request (a data worker that the signal reached
  before it could ignore it), the stop it is: `Stopped` without a save."""
  try:
    return next(iterator)
  except Exception as e:  # pylint: disable=broad-except
    if not stop.requested:
      raise
    raise stop.stopped_without_save(manager, workdir) from e


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        stop: checkpointing.StopRequest, mesh: Mesh | None) -> dict[str, Any]:
  """`train_and_evaluate` with its stop request installed."""
  workdir = paths.resolve(workdir)  # A local directory or a gs:// URL.
  workdir.mkdir(parents=True, exist_ok=True)
  exp = setup.for_training(config, mesh)
  c = config
  total_steps = int(c.schedule.total_steps)
  logging.info("devices: %d (%d in this process), processes: %d; batch: %d global, %d per "
               "process, %d per device", exp.mesh.size,
               sharding.mesh_local_device_count(exp.mesh), sharding.mesh_process_count(exp.mesh),
               c.data.batch_size, exp.batch_per_process, exp.batch_per_device)

  train_iter = data_lib.make_train_iterator(
      c.data, c.augment, batch_size_per_process=exp.batch_per_process, seed=int(c.data.seed),
      process_index=jax.process_index(), process_count=jax.process_count())
  manager = checkpointing.make_manager(workdir, c)
  try:
    # A resume always wins over init_from: the checkpoint has the trained weights.
    resumed = checkpointing.restore_latest_readable(
        manager, setup.abstract_state(exp), train_iter,
        explain_shapes=lambda: config_differences(c, workdir))
    if resumed is not None:
      state, train_iter, latest = resumed
      logging.info("resumed from the checkpoint of step %d in %s", latest, workdir)
    else:
      warning = from_scratch_warning(c)
      if warning:
        logging.warning("%s", warning)
      state = setup.initial_state(exp)
      if c.get("init_from"):
        state = apply_init_from(exp, state)
    save_run_config(c, workdir)
  except BaseException:
    manager.close()  # Else orbax's background threads fail again at interpreter exit.
    raise
  start_step = int(jax.device_get(state.step))

  step_fn = train_step_lib.make_train_step(c, exp.train_model, exp.tx, exp.mesh)
  writer = metric_writers.create_default_writer(os.fspath(workdir),
                                                just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams({k: str(v) for k, v in _flatten(c.to_dict()).items()})
  hooks = [periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                           every_steps=c.log.every_steps)]
  if c.log.get("profile") and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(num_profile_steps=5, logdir=os.fspath(workdir)))
  evaluator = evaluate_lib.make_evaluator(c, exp.eval_model, exp.mesh,
                                          class_names=exp.info.class_names)
  predictor = make_summary_predictor(exp)

  eval_metrics: dict[str, Any] = {}
  alarm = make_collapse_alarm(c)
  prev: tuple[int, Any] | None = None
  acc, acc_n = None, 0
  step = start_step
  logging.info("training from step %d to %d", start_step, total_steps)
  try:
    while step < total_steps:
      step += 1
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = _next_or_stop(train_iter, stop, manager, workdir)
        if step == start_step + 1:
          logging.info("step %d: batch ready; compiling the train step", step)
        batch = sharding.host_local_to_global(
            {k: batch[k] for k in train_step_lib.TRAIN_BATCH_KEYS}, exp.mesh)
        state, metrics = step_fn(state, batch)
      # NaN check one step behind, so the host never waits for the step it just dispatched.
      if prev is not None:
        _check_finite(prev[1], prev[0], manager)
      prev = (step, metrics)
      acc = metrics if acc is None else jax.tree.map(jnp.add, acc, metrics)
      acc_n += 1
      for hook in hooks:
        hook(step)

      is_last = step == total_steps
      if step % c.log.every_steps == 0 or is_last:
        _check_finite(metrics, step, manager)
        means = jax.device_get(acc)
        scalars = {f"train/{k}": float(v) / acc_n for k, v in means.items()}
        if alarm is not None:
          warning = alarm.update(step, scalars)
          if warning:
            logging.warning(warning)
          scalars["train/embedding/collapse_alarm"] = alarm.flag
        writer.write_scalars(step, scalars)
        acc, acc_n = None, 0

      is_eval = step % c.eval.every_steps == 0 or is_last
      if is_eval:
        try:
          eval_metrics = evaluate(exp, evaluator, predictor, state, writer, step)
        except Exception as e:  # pylint: disable=broad-except  # as in _next_or_stop
          if not stop.requested:
            raise
          raise stop.stopped_without_save(manager, workdir) from e
      if step % c.checkpoint.every_steps == 0 or is_eval:
        _check_finite(metrics, step, manager)
        checkpointing.save(manager, step, state, train_iter,
                           metrics={checkpointing.BEST_METRIC: float(eval_metrics["miou"])}
                           if is_eval else None)
        logging.info("step %d: checkpoint saved", step)

      if not is_last and stop.should_stop(manager, step):
        _check_finite(metrics, step, manager)
        if step not in manager.all_steps():
          checkpointing.save(manager, step, state, train_iter)
        manager.wait_until_finished()
        logging.warning("%s received: saved the checkpoint of step %d in %s; exiting.",
                        stop.signal_name, step, workdir)
        writer.flush()
        manager.close()
        raise checkpointing.Stopped(stop.signal_name or "stop request", step, workdir)
  finally:
    data_lib.close_iterator(train_iter)
    manager.wait_until_finished()
    writer.flush()

  if not eval_metrics:
    # Resumed at or after the last step: evaluate what the checkpoint holds.
    eval_metrics = evaluate(exp, evaluator, predictor, state, writer, step)
  manager.close()
  writer.close()
  if jax.process_index() == 0:
    line = f"final mIoU: {float(eval_metrics['miou']):.4f}"
    logging.info(line)
    print(line, flush=True)
  return eval_metrics


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
