"""Orbax checkpoints: train state + grain iterator state in one composite; preemption; weights.

A checkpoint at step s holds the `TrainState` after s steps and the data iterator positioned
at the batch of step s + 1, written together (a composite item, finalised atomically by
orbax's rename of its temporary directory), so a restart resumes with the same batch, LR,
optimizer state, memory bank and RNG. Kept: the latest `max_to_keep` plus the best-mIoU one.

Weights without a train state are read here too: `config.init_from` (converted official
weights, `load_pretrained` / `merge_pretrained`) and, for modes eval and predict, the model's
variables of a run's latest checkpoint (`load_variables`).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Callable, Mapping

from etils import epath
import flax
import grain.python as grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from pixcon_jax import paths
from pixcon_jax import validation

STATE = "state"
DATA = "data"
BEST_METRIC = "miou"


def variable_shapes(model: Any, image_size: tuple[int, int] = (64, 64)) -> Any:
  """The model's variables as ShapeDtypeStructs, without allocating them: a read target.

  Args:
    model: a segmentation model (linen module) taking `image [1, H, W, 3]`.
    image_size: (H, W) of the traced input; variable shapes do not depend on it.
  Returns:
    {"params": ..., "batch_stats": ...} of `jax.ShapeDtypeStruct`s (init with `train=False`).
  """
  image = jax.ShapeDtypeStruct((1, *image_size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), image)


def make_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """CheckpointManager under `workdir/checkpoints` for the composite {state, data}."""
  ck = config.checkpoint
  policies = [ocm.LatestN(n=int(ck.max_to_keep))]
  if ck.get("keep_best", True):
    policies.append(ocm.BestN(get_metric_fn=lambda m: float(m[BEST_METRIC]), n=1,
                              keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=ocm.AnyPreservationPolicy(policies),
      enable_async_checkpointing=bool(ck.get("async_save", True)),
      # Saves are decided by the loop (period, evaluation, preemption, end), never skipped.
      save_interval_steps=1, create=True, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(
      paths.resolve(workdir) / "checkpoints", options=options,
      item_handlers={STATE: ocp.StandardCheckpointHandler(),
                     DATA: grain.PyGrainCheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iter: Any, *,
         metrics: Mapping[str, float] | None = None) -> None:
  """Saves {state, data} at `step` (async unless disabled; finalised atomically)."""
  args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                               DATA: grain.PyGrainCheckpointSave(data_iter)})
  saved = manager.save(step, args=args, metrics=dict(metrics) if metrics else None, force=True)
  if not saved and step not in manager.all_steps():
    raise RuntimeError(f"orbax did not save the checkpoint of step {step}")


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            data_iter: Any) -> tuple[Any, Any]:
  """Restores the state onto the shardings of `abstract_state` and the iterator in place."""
  restored = manager.restore(step, args=ocp.args.Composite(**{
      STATE: ocp.args.StandardRestore(abstract_state),
      DATA: grain.PyGrainCheckpointRestore(data_iter)}))
  return restored[STATE], restored[DATA]


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def _path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
  """A pytree path as plain names: a dataclass field and the dict key it is saved as agree."""
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def shape_differences(manager: ocp.CheckpointManager, step: int, abstract_state: Any
                      ) -> tuple[list[str], list[str]]:
  """Compares the checkpoint's state arrays with the configured ones, from metadata only.

  Returns:
    (arrays of both with other shapes, arrays of only one side), each entry as
    'path: checkpoint shape vs config shape'.
  """
  saved = manager.item_metadata(step)[STATE]
  saved_shapes = {_path_names(p): tuple(m.shape) for p, m in
                  jax.tree_util.tree_flatten_with_path(saved)[0] if hasattr(m, "shape")}
  wanted = {_path_names(p): tuple(leaf.shape) for p, leaf in
            jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  differ, one_side = [], []
  for name in sorted(set(saved_shapes) | set(wanted)):
    got, want = saved_shapes.get(name), wanted.get(name)
    if got != want:
      (differ if got is not None and want is not None else one_side).append(
          f"{'/'.join(name)}: {got if got is not None else 'absent'} in the checkpoint vs "
          f"{want if want is not None else 'absent'} from the config")
  return differ, one_side


def _set_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Renames the unreadable step's folder (kept for inspection) so that it can be saved anew."""
  src = epath.Path(manager.directory) / str(step)
  dst = src.parent / f"{step}.unreadable"
  n = 1
  while dst.exists():
    n += 1
    dst = src.parent / f"{step}.unreadable{n}"
  if jax.process_index() == 0 and src.exists():
    src.rename(dst)
  return str(dst)


def newest_readable(steps: Any, read: Callable[[int], Any], *, directory: Any,
                    set_aside: Callable[[int], str] | None = None) -> tuple[Any, int] | None:
  """`read(step)` of the newest step that reads back: the one fallback of train, eval, predict.

  Args:
    steps: the checkpoint steps there are (any order).
    read: reads one step; raises `validation.InputError` when the step is readable but does
      not fit the config (another model: no fallback), anything else when it does not read
      back (a truncated file), and then the previous step is tried.
    directory: the checkpoints' folder, for the messages.
    set_aside: called with each unreadable step (training moves it out of the way, so that the
      step can be saved anew); returns where it went. None: the folder is left as it is.
  Returns:
    (what `read` returned, step), or None when there is no step.
  Raises:
    validation.InputError from `read`; validation.ConfigError when no step reads back.
  """
  unreadable = []
  for step in sorted(steps, reverse=True):
    try:
      return read(step), step
    except validation.InputError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # any read error: try an older one
      moved = f"moved it to {set_aside(step)} and " if set_aside is not None else ""
      logging.warning("checkpoint of step %d is unreadable (%s); %strying the previous one",
                      step, _first_line(e), moved)
      unreadable.append(step)
  if unreadable:
    what = "set aside as *.unreadable" if set_aside is not None else "unreadable"
    raise validation.ConfigError(
        f"no readable checkpoint under {directory} (steps {unreadable} {what}); delete that "
        f"folder or use another --workdir to start afresh")
  return None


def restore_latest_readable(manager: ocp.CheckpointManager, abstract_state: Any, data_iter: Any,
                            *, explain_shapes: Callable[[], str] = lambda: ""
                            ) -> tuple[Any, Any, int] | None:
  """Restores the newest checkpoint that reads back, skipping (and setting aside) broken ones.

  Args:
    abstract_state: ShapeDtypeStructs with shardings of the configured state.
    explain_shapes: called when the shapes differ; returns extra text for the message (e.g.
      the config keys that differ from the run's saved config).
  Returns:
    (state, data iterator, step), or None when the workdir has no checkpoint.
  Raises:
    ConfigError when the newest readable checkpoint has other shapes than the config (a
    workdir of another model), or when no checkpoint reads back.
  """
  workdir = os.path.dirname(str(manager.directory))

  def other_model(step, differences):
    return validation.ConfigError(
        f"--workdir={workdir} holds a checkpoint (step {step}) of another model: "
        f"{len(differences)} arrays differ, e.g. {'; '.join(differences[:3])}."
        f"{explain_shapes()} Use another --workdir for this config (or the config that run was "
        f"trained with).")

  def read(step):
    differ, one_side = shape_differences(manager, step, abstract_state)  # unreadable: raises
    if differ:
      raise other_model(step, differ)
    try:
      return restore(manager, step, abstract_state, data_iter)
    except Exception as e:  # pylint: disable=broad-except
      if one_side:  # Another state structure (e.g. memory settings), not a broken file.
        raise other_model(step, one_side) from e
      raise

  def set_aside(step):
    moved = _set_aside(manager, step)
    manager.reload()  # Forget the step set aside, so that it can be saved anew.
    return moved

  found = newest_readable(manager.all_steps(), read, directory=manager.directory,
                          set_aside=set_aside)
  if found is None:
    return None
  (state, data_iter), step = found
  return state, data_iter, step


def best_step(manager: ocp.CheckpointManager) -> int | None:
  """Step of the best-mIoU checkpoint, if any checkpoint has metrics."""
  return manager.best_step()


# ------------------------------------------------------------------------------------------
# Stop requests: SIGTERM and TPU preemption notices.

EXIT_STOPPED = 128 + signal.SIGTERM  # 143, as a shell reports a SIGTERM'd process.
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130 after Ctrl-C.


class Stopped(Exception):
  """Training stopped early by a signal or preemption notice, after saving a checkpoint.

  `exit_code` (143, or 130 for SIGINT) lets a job wrapper tell "preempted, rerun to resume"
  from "finished" (0).
  """

  def __init__(self, signal_name: str, step: int | None, workdir: str, *, saved: bool = True):
    """`step`: the checkpoint saved now (`saved`), else the latest one there is (None: none)."""
    self.exit_code = EXIT_INTERRUPTED if signal_name == "SIGINT" else EXIT_STOPPED
    if saved:
      what = (f"saved the checkpoint of step {step} in {workdir}; rerun the same command to "
              f"resume")
    elif step is None:
      what = (f"stopped before the first checkpoint, so {workdir} holds none; rerun the same "
              f"command to start again")
    else:
      what = (f"stopped before a new checkpoint could be saved; the latest is step {step} in "
              f"{workdir}; rerun the same command to resume from it")
    super().__init__(f"{signal_name} received: {what} (exit code {self.exit_code})")
    self.step = step


class StopRequest:
  """A flag set by SIGTERM (and SIGINT), polled by the loop every `every_steps` steps.

  The handler only sets the flag: saving from inside a signal handler could interleave with
  a half-dispatched step. On several hosts the flag is OR-reduced over processes
  (`should_stop`) so that all of them save the same step together. That reduction is a
  device computation queued behind the step just dispatched, so it blocks the host until
  the device is done; polling every `every_steps` steps keeps the host that many steps ahead
  the rest of the time.
  """

  def __init__(self, every_steps: int = 1):
    if int(every_steps) < 1:
      raise ValueError("config.checkpoint.preemption_check_every_steps must be a positive "
                       f"integer, got {every_steps!r}")
    self.every_steps = int(every_steps)
    self._event = threading.Event()
    self.signal_name: str | None = None
    self._previous = {}
    self._preemption_watch_failed = False

  def install(self) -> "StopRequest":
    if threading.current_thread() is not threading.main_thread():
      logging.warning("not in the main thread: SIGTERM handler not installed")
      return self
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def uninstall(self) -> None:
    for sig, prev in self._previous.items():
      signal.signal(sig, prev)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name
    self._event.set()

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  def stopped_without_save(self, manager: ocp.CheckpointManager, workdir: Any) -> Stopped:
    """The `Stopped` for a run that cannot save now (its data workers went with the signal)."""
    manager.wait_until_finished()
    latest = manager.latest_step()
    manager.close()
    return Stopped(self.signal_name or "stop request", latest, str(workdir), saved=False)

  def should_stop(self, manager: ocp.CheckpointManager, step: int) -> bool:
    """True (on every process alike) after a signal or at a TPU preemption sync point.

    Only steps that are multiples of `every_steps` look (all processes run the same steps,
    so they agree); the others return False without touching the devices.
    """
    if step % self.every_steps:
      return False
    local = self.requested
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      local = bool(np.any(multihost_utils.process_allgather(np.asarray(local))))
    preempted = self._reached_preemption(manager, step // self.every_steps)
    if preempted and self.signal_name is None:
      self.signal_name = "preemption notice"
    return local or preempted

  def _reached_preemption(self, manager: ocp.CheckpointManager, check: int) -> bool:
    """jax's preemption sync point (TPU maintenance notices; needs jax.distributed).

    jax sets the sync point to one past the largest counter any process last passed and
    answers True only when called with exactly that counter, so it is given the number of
    the check (consecutive integers), not the step: a step counter would skip the point.
    """
    if self._preemption_watch_failed:
      return False
    try:
      return bool(manager.reached_preemption(check))
    except Exception as e:  # pylint: disable=broad-except
      # Not fatal to training, but the run would no longer save before a maintenance event.
      self._preemption_watch_failed = True
      logging.warning("checking for TPU preemption notices failed (%s: %s); no longer "
                      "checking: a preemption notice will not save a checkpoint before this "
                      "process is stopped (SIGTERM still does).", type(e).__name__, e)
      return False


# ------------------------------------------------------------------------------------------
# Initialisation from converted weights (config.init_from).

def restore_as_numpy(path: str) -> Any:
  """Reads an orbax PyTree checkpoint directory with every leaf as a host numpy array.

  Without a target orbax restores jax arrays onto the shardings recorded at save time (and
  warns that this is unsafe on another topology: a checkpoint converted on one CPU, read on a
  TPU pod); numpy leaves need no devices at all.
  """
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def load_pretrained(path: str) -> dict[str, Any]:
  """Reads an orbax checkpoint of {params, batch_stats} (scripts/convert_checkpoint.py) as numpy."""
  root = paths.resolve(path)  # A local directory or a gs:// URL.
  path = os.fspath(root)
  if not root.exists():
    raise validation.MissingInputError(
        f"config.init_from={path!r}: no such file or directory, so no orbax checkpoint to load; "
        f"give the --out folder of scripts/convert_checkpoint.py")
  candidates = [os.fspath(p) for p in (root, root / "default", root / STATE)]
  last_error = None
  for p in candidates:
    if not paths.resolve(p).is_dir():
      continue
    try:
      tree = restore_as_numpy(p)
    except Exception as e:  # pylint: disable=broad-except
      last_error = e
      continue
    if isinstance(tree, Mapping) and "params" in tree:
      return dict(tree)  # Already host numpy (restore_as_numpy).
  raise validation.MissingInputError(
      f"config.init_from={path!r}: no orbax checkpoint with 'params' found (tried {candidates}; "
      f"last error: {_first_line(last_error) if last_error else None}); give the --out folder of "
      f"scripts/convert_checkpoint.py")


def merge_pretrained(variables: Mapping[str, Any], pretrained: Mapping[str, Any], *,
                     scope: str, backbone_prefix: str = "backbone") -> tuple[dict[str, Any], dict[str, list[str]]]:
  """Overwrites matching leaves of `variables` ({params, batch_stats}) with `pretrained`.

  Args:
    scope: 'full' (every matching leaf) or 'backbone' (only leaves under `backbone_prefix`;
      a backbone-only checkpoint may hold the backbone at its root or under the prefix).
  Returns:
    (merged variables, report {'loaded', 'missing', 'unexpected', 'shape_mismatch'}) with
    '/'-joined paths.
  """
  if scope not in ("full", "backbone"):
    raise validation.ConfigError(f"config.init_from_scope must be 'full' or 'backbone', got {scope!r}")
  report = {"loaded": [], "missing": [], "unexpected": [], "shape_mismatch": []}

  def flat(tree, prefix=()):
    out = {}
    if isinstance(tree, Mapping):
      for k, v in tree.items():
        out.update(flat(v, prefix + (str(k),)))
    else:
      out[prefix] = tree
    return out

  merged = {}
  for col in ("params", "batch_stats"):
    target = flat(variables.get(col, {}))
    source = flat(pretrained.get(col, {}))
    if scope == "backbone" and source and not any(k[0] == backbone_prefix for k in source):
      source = {(backbone_prefix,) + k: v for k, v in source.items()}
    new = dict(target)
    for k, v in source.items():
      name = col + "/" + "/".join(k)
      if scope == "backbone" and k[0] != backbone_prefix:
        continue
      if k not in target:
        report["unexpected"].append(name)
      elif tuple(np.shape(v)) != tuple(np.shape(target[k])):
        report["shape_mismatch"].append(f"{name} {np.shape(v)} vs {np.shape(target[k])}")
      else:
        new[k] = np.asarray(v, dtype=np.asarray(target[k]).dtype) if not hasattr(
            target[k], "sharding") else np.asarray(v, dtype=target[k].dtype)
        report["loaded"].append(name)
    for k in target:
      if (scope == "full" or k[0] == backbone_prefix) and k not in source:
        report["missing"].append(col + "/" + "/".join(k))
    tree: dict[str, Any] = {}
    for k, v in new.items():
      node = tree
      for part in k[:-1]:
        node = node.setdefault(part, {})
      node[k[-1]] = v
    merged[col] = tree
  return merged, report


# ------------------------------------------------------------------------------------------
# Inference weights (modes eval and predict): the model's variables only.

INFERENCE_COLLECTIONS = ("params", "batch_stats")


def check_complete(variables: Mapping[str, Any], model: Any, name: str) -> None:
  """Raises ConfigError (a ValueError) naming every missing or mis-shaped variable of `model`.

  Args:
    variables: {"params", "batch_stats"} (arrays of any kind; other collections are ignored).
    model: the model they are for (its shapes come from `variable_shapes`).
    name: where the variables came from, for the message.
  """
  want = flax.traverse_util.flatten_dict(
      {k: v for k, v in flax.core.unfreeze(variable_shapes(model)).items()
       if k in INFERENCE_COLLECTIONS})
  have = flax.traverse_util.flatten_dict(
      {k: dict(v) for k, v in variables.items() if k in INFERENCE_COLLECTIONS})
  missing = ["/".join(p) for p in want if p not in have]
  bad = [f"{'/'.join(p)} {tuple(np.shape(have[p]))} != {tuple(want[p].shape)}"
         for p in want if p in have and tuple(np.shape(have[p])) != tuple(want[p].shape)]
  if missing or bad:
    raise validation.ConfigError(f"{name} does not fit the model: {len(missing)} missing "
                     f"{missing[:10]}, {len(bad)} shape mismatches {bad[:10]}")


def load_variables(config: ml_collections.ConfigDict, workdir: str, *, model: Any,
                   mesh: jax.sharding.Mesh) -> tuple[dict[str, Any], str, int]:
  """Inference variables: the latest checkpoint in `workdir`, else `config.init_from`.

  Args:
    config: the experiment config (`init_from`).
    workdir: run directory (checkpoints under `workdir/checkpoints`), local or gs://.
    model: the eval model the variables are for (`setup.Experiment.eval_model`).
    mesh: the variables are replicated on it.
  Returns:
    ({"params", "batch_stats"} replicated on the mesh, description of the source, step; 0
    for `init_from`).
  The newest checkpoint that reads back is used (`newest_readable`, as a resumed training
  does), and the step is logged.
  Raises:
    validation.MissingInputError naming both places when neither has weights; ConfigError when
    the weights do not fit `model` or no checkpoint reads back.
  """
  ckpt_dir = paths.resolve(workdir) / "checkpoints"
  steps = []
  if ckpt_dir.is_dir():
    with ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
        read_only=True)) as mngr:
      steps = list(mngr.all_steps())
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  if steps:
    # Only {params, batch_stats} of the saved TrainState, restored partially and straight onto
    # the mesh: the optimizer state and the memory bank are never read, so a checkpoint of any
    # contrast / memory setting (e.g. an ablation's baseline) evaluates with any config.
    shapes = variable_shapes(model)
    target = {k: jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep),
                              shapes.get(k, {})) for k in INFERENCE_COLLECTIONS}

    def read(step):
      path = ckpt_dir / str(step) / STATE
      variables = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True))
      variables = {k: variables.get(k, {}) for k in INFERENCE_COLLECTIONS}
      check_complete(variables, model, f"checkpoint {path}")  # another model: no fallback
      return variables

    # A run's folder is only read here: an unreadable step is skipped, not moved.
    variables, step = newest_readable(steps, read, directory=ckpt_dir)
    newest = max(steps)
    logging.info("using the checkpoint of step %d in %s%s", step, ckpt_dir,
                 "" if step == newest else f" (the newest readable; step {newest} is not)")
    return variables, f"checkpoint {ckpt_dir} step {step}", int(step)
  if config.get("init_from"):
    variables = load_pretrained(config.init_from)
    variables = {k: variables.get(k, {}) for k in INFERENCE_COLLECTIONS}
    check_complete(variables, model, f"config.init_from={config.init_from!r}")
    return jax.device_put(variables, rep), f"init_from {config.init_from}", 0
  raise validation.MissingInputError(
      f"no checkpoint under {ckpt_dir} and config.init_from is not set: nothing to evaluate")
