"""TrainState, optimizer, state initialisation and the sharded train step.

The step is `jax.jit(jax.shard_map(...))` over the mesh axis 'data': the state is
replicated, the batch split along its leading axis. Collectives are explicit:
cross-replica BN inside the model (`bn_axis_name='data'`), psums of the loss
normalisers, the gradient pmean, the all-gather of the memory keys. See `objective.py`
for why the per-device losses are shares of the global-batch loss.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from pixcon_jax import objective as objective_lib
from pixcon_jax import precision as precision_lib
from pixcon_jax import sharding
from pixcon_jax.contrast import memory as memory_lib
from pixcon_jax.contrast import official_mem

PyTree = Any
TrainStep = Callable[["TrainState", dict[str, jax.Array]], tuple["TrainState", dict[str, jax.Array]]]

# Keys of a batch the train step consumes; others (e.g. file names) stay on the host.
TRAIN_BATCH_KEYS = ("image", "label", "image_id")
WEIGHT_DECAY_ON = ("all", "kernels")  # config.optim.weight_decay_on: torch SGD (all) | kernels only.


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs, besides the data-iterator state.

  Attributes:
    step: int32 scalar, number of steps taken.
    params: model parameters (float32).
    batch_stats: BN running statistics (float32).
    opt_state: optax state (SGD momentum buffers, schedule count).
    memory: the contrast MemoryBank pytree, or None without memory.
    rng: uint32 [2] base key; step `s` uses `fold_in(rng, s)`, so it never changes.
  """
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: optax.OptState
  memory: Any
  rng: jax.Array


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Polynomial ("poly") LR decay: lr * (1 - step / total_steps) ** power (paper Sec. 4.1)."""
  return optax.polynomial_schedule(
      init_value=config.optim.lr, end_value=config.schedule.end_lr,
      power=config.schedule.power, transition_steps=config.schedule.total_steps)


def _decay_mask(params: PyTree, mode: str) -> PyTree:
  if mode == "all":
    return jax.tree.map(lambda _: True, params)
  if mode == "kernels":
    return jax.tree.map(lambda p: p.ndim > 1, params)
  raise ValueError(f"config.optim.weight_decay_on={mode!r}: expected one of {WEIGHT_DECAY_ON}")


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """SGD with momentum and coupled weight decay, as `torch.optim.SGD(weight_decay=...)`.

  torch adds `wd * p` to the gradient before the momentum buffer; `add_decayed_weights`
  placed before `sgd` does exactly that (on every parameter, BN and biases included,
  with `weight_decay_on='all'`, the official behaviour).
  """
  mode = config.optim.get("weight_decay_on", "all")
  return optax.chain(
      optax.add_decayed_weights(config.optim.weight_decay,
                                mask=functools.partial(_decay_mask, mode=mode)),
      optax.sgd(make_schedule(config), momentum=config.optim.momentum,
                nesterov=config.optim.get("nesterov", False)),
  )


def _pixels_per_class(config: ml_collections.ConfigDict) -> int:
  return config.memory.get("pixels_per_class", 10) if "memory" in config else 10


def init_memory(config: ml_collections.ConfigDict, *, num_classes: int, num_train_images: int,
                rng: jax.Array | None = None):
  """The initial MemoryBank for the paper's recipe, the released queues, or None without memory.

  The bank carries an empty `pending` update of the global batch's shape: the step writes the
  previous step's keys at its start (see `contrast/memory.py`, "Deferred writes"). The released
  queues (`recipe='official_mem'`) start as random unit vectors drawn from `rng`.
  """
  if objective_lib.uses_official_queues(config):
    return official_mem.init_queues(rng, num_classes=num_classes, dim=config.model.proj_dim,
                                    queue_size=config.memory.official_queue_size)
  if not objective_lib.uses_memory(config):
    return None
  m = config.memory
  pixel_queue_size = m.pixel_queue_size
  if pixel_queue_size is None:
    # Paper Sec. 4.1: T = 10 N per class.
    pixel_queue_size = 10 * num_train_images
  bank = memory_lib.init_memory(
      num_classes=num_classes, dim=config.model.proj_dim, pixel_queue_size=pixel_queue_size,
      region_mode=m.region_mode, num_images=num_train_images,
      region_queue_size=m.region_queue_size)
  return bank.replace(pending=memory_lib.empty_update(
      batch_size=config.data.batch_size, num_classes=num_classes,
      pixels_per_class=_pixels_per_class(config), dim=config.model.proj_dim))


def create_train_state(config: ml_collections.ConfigDict, model: nn.Module,
                       tx: optax.GradientTransformation, mesh: Mesh, *, image_shape: tuple[int, ...],
                       num_classes: int, num_train_images: int, rng: jax.Array) -> TrainState:
  """Initialises the replicated train state directly on the mesh.

  Args:
    model: the (train) model; init runs with `train=False`, so its BN axis is never bound.
    image_shape: (H, W, 3) of one training crop.
    rng: uint32 [2] key; split into the init key and the state's base key.
  """
  init_rng, state_rng = jax.random.split(rng)

  def init(init_rng, state_rng):
    variables = model.init({"params": init_rng, "dropout": init_rng},
                           jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
        memory=init_memory(config, num_classes=num_classes, num_train_images=num_train_images,
                           rng=jax.random.fold_in(init_rng, 1)),
        rng=state_rng)

  return jax.jit(init, out_shardings=sharding.replicated(mesh))(init_rng, state_rng)


def abstract_train_state(config, model, tx, mesh, **kwargs) -> TrainState:
  """`jax.ShapeDtypeStruct`s (with replicated shardings) of the train state, for restoring."""
  shapes = jax.eval_shape(
      lambda r: create_train_state(config, model, tx, mesh, rng=r, **kwargs),
      jax.random.PRNGKey(0))
  rep = sharding.replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), shapes)


def make_train_step(config: ml_collections.ConfigDict, model: nn.Module,
                    tx: optax.GradientTransformation, mesh: Mesh, *,
                    num_classes: int | None = None, donate: bool = True) -> TrainStep:
  """Returns the jitted step `(state, batch) -> (state, metrics)`.

  Args:
    model: built with `bn_axis_name='data'` (cross-replica BN) and the compute dtype.
    tx: from `make_optimizer(config)`.
    mesh: 1-D mesh over 'data'; the batch's leading axis is split over it.
    num_classes: defaults to `config.model.num_classes`.
    donate: donate the input state's buffers (the caller must not reuse it).
  The returned step takes `batch` with `image [B, H, W, 3]`, `label [B, H, W]`, `image_id [B]`
  (global arrays, B = config.data.batch_size) and returns metrics (replicated scalars):
  `loss`, `ce_loss`, [`aux_ce_loss`], [`contrast_loss`, `contrast_weight`,
  `valid_anchor_fraction`], `lr`, `grad_norm`. Its dots and convs run at
  `config.model.matmul_precision` (`precision.py`).
  """
  axis = sharding.DATA_AXIS
  num_classes = num_classes or config.model.num_classes
  objective = objective_lib.make_objective(config, num_classes=num_classes, axis_name=axis)
  schedule = make_schedule(config)
  use_memory = objective_lib.uses_memory(config)
  use_queues = objective_lib.uses_official_queues(config)
  queue_settings = (objective_lib.official_queue_settings(config, num_classes=num_classes)
                    if use_queues else {})
  pixels_per_class = _pixels_per_class(config)

  def step_fn(state: TrainState, batch: dict[str, jax.Array]):
    # One key per step, shared by every device (contrast sampling and memory updates must
    # agree everywhere); dropout masks differ per image through the image's position in the
    # global batch (`layers.Dropout2d`), so they do not depend on the device count either.
    step_rng = jax.random.fold_in(state.rng, state.step)
    contrast_rng, memory_rng, dropout_rng = jax.random.split(step_rng, 3)

    n_dev = lax.psum(1, axis)
    memory = state.memory
    if use_memory:
      # The previous step's keys are written first, so that the bank's in-place update precedes
      # every read of it (written last, XLA copies the bank to keep the old value for the loss).
      memory = memory_lib.flush(memory)

    def loss_fn(params):
      outputs, new_vars = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
          mutable=["batch_stats"], rngs={"dropout": dropout_rng})
      share, (metrics, keys) = objective(outputs, batch, memory, contrast_rng, state.step)
      # N x share is this device's estimate of the global-batch loss (the per-GPU mean of DDP).
      return n_dev * share, (new_vars["batch_stats"], metrics, keys)

    # Differentiate a per-device (varying) view of the replicated params, so each device gets
    # the gradient of its own loss, then average them over devices. (Differentiating the
    # invariant params directly would psum implicitly in the transpose.)
    local_params = jax.tree.map(lambda p: lax.pcast(p, axis, to="varying"), state.params)
    grads, (batch_stats, metrics, keys) = jax.grad(loss_fn, has_aux=True)(local_params)
    grads = lax.pmean(grads, axis)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if use_memory:
      # This step's loss used the bank as it was before the step; its keys wait as the bank's
      # pending update until the next step flushes them. Keys are sampled per device and
      # all-gathered (global order), so every replica stays identical and equal to a
      # single-device `enqueue` of the global batch.
      memory = memory.replace(pending=memory_lib.sample_keys_distributed(
          *keys, memory_rng, num_classes=memory.num_classes, pixels_per_class=pixels_per_class,
          axis_name=axis))
    if use_queues:
      # The released order: this step's loss read the queues, then its keys are written
      # (every replica writes the same all-gathered update).
      memory = official_mem.enqueue(memory, *keys, memory_rng, axis_name=axis, **queue_settings)
    metrics = dict(metrics, lr=schedule(state.step), grad_norm=optax.tree.norm(grads))
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state, memory=memory)
    return new_state, metrics

  step_fn = precision_lib.with_matmul_precision(step_fn, precision_lib.matmul_precision(config))
  sharded = jax.shard_map(step_fn, mesh=mesh, in_specs=(P(), P(axis)), out_specs=(P(), P()))
  return jax.jit(sharded, donate_argnums=(0,) if donate else ())
