"""What a run builds from its config before it reads any data or weights.

Two layers, so that eval and predict never build what only training uses:
- `for_inference(config, mesh=None) -> Experiment`: the mesh, the dataset's `DatasetInfo` and
  the evaluation model (running BN statistics), checked against the dataset and the devices.
- `for_training(config, mesh=None) -> TrainingExperiment`: the same plus the train model
  (cross-replica BN over 'data'), the optimizer, the batch sizes per process / device and N,
  the number of training images; `initial_state` and `abstract_state` then give the train state.

The mesh defaults to this run's devices (`sharding.make_mesh()`); any other mesh -- e.g. of
compile-only TPU or GPU devices from `jax.experimental.topologies` -- gives the experiment for
that target: models, batch split and state are derived from the mesh alone.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from pixcon_jax import data as data_lib
from pixcon_jax import models
from pixcon_jax import sharding
from pixcon_jax import train_step as train_step_lib
from pixcon_jax.models import conv as conv_lib


@dataclasses.dataclass(frozen=True)
class Experiment:
  """What evaluation and prediction need, built once from a config (`for_inference`).

  Attributes:
    config: the experiment config (checked by `config_schema.check_config`).
    mesh: 1-D mesh over every device, axis 'data' (`sharding.make_mesh`).
    info: the configured dataset (classes, palette, splits, sizes).
    eval_model: the model in inference form: BN uses running statistics, no axis name.
      `eval_model.apply(variables, image [B, H, W, 3], train=False)` -> output dict.
  """
  config: ml_collections.ConfigDict
  mesh: Mesh
  info: data_lib.DatasetInfo
  eval_model: nn.Module


@dataclasses.dataclass(frozen=True)
class TrainingExperiment(Experiment):
  """An `Experiment` plus what training adds (`for_training`).

  Attributes:
    train_model: the model in training form: BN statistics all-reduced over 'data'.
    tx: the optimizer (`train_step.make_optimizer`: SGD, momentum, poly LR).
    num_train_images: N of the training split (rows of the region memory).
    batch_per_process: `config.data.batch_size` / process count (images each host loads).
    batch_per_device: `config.data.batch_size` / device count.
  """
  train_model: nn.Module
  tx: optax.GradientTransformation
  num_train_images: int
  batch_per_process: int
  batch_per_device: int


def num_train_images(config: ml_collections.ConfigDict, info: data_lib.DatasetInfo) -> int:
  """N of the training split (region memory rows); synthetic sizes come from the config."""
  if config.data.get("num_train_images"):
    return int(config.data.num_train_images)
  if config.data.dataset == "synthetic" and config.data.get("synthetic_num_train"):
    return int(config.data.synthetic_num_train)
  return int(info.num_train_images)


def build_model(config: ml_collections.ConfigDict, *, train: bool,
                platform: str | None = None) -> nn.Module:
  """The configured model; cross-replica BN over 'data' for training, running stats otherwise.

  `platform` is that of the devices it runs on (`sharding.mesh_platform`), None for the default
  backend: it picks the conv algorithm of "auto" (`models.build_model`).
  """
  overrides = dict(config.model.get("overrides", {}) or {})
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
  overrides.setdefault("proj_dim", config.model.proj_dim)
  overrides.setdefault("proj_type", config.model.proj_type)
  return models.build_model(
      config.model.name, num_classes=config.model.num_classes, dtype=jnp.dtype(config.model.dtype),
      bn_axis_name=sharding.DATA_AXIS if train else None,
      conv_impl=conv_lib.check_impl(config.model.get("conv_impl", "auto"),
                                    where="config.model.conv_impl"),
      platform=platform, **overrides)


def for_inference(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Experiment:
  """Checks the config against the dataset and the mesh's devices; builds the eval model.

  Args:
    config: the experiment config.
    mesh: the devices to run (or compile) for, axis 'data'; default `sharding.make_mesh()`.
  Raises:
    ValueError naming the config key when `model.num_classes` is not the dataset's, or when
    `data.eval_batch_size` does not split evenly over the processes.
  """
  info = data_lib.get_dataset_info(config.data.dataset)
  if config.model.num_classes != info.num_classes:
    raise ValueError(f"config.model.num_classes={config.model.num_classes} but dataset "
                     f"{config.data.dataset!r} has {info.num_classes} classes")
  mesh = sharding.make_mesh() if mesh is None else mesh
  processes = sharding.mesh_process_count(mesh)
  if config.data.eval_batch_size % processes:
    raise ValueError(f"config.data.eval_batch_size={config.data.eval_batch_size} must be a "
                     f"multiple of the process count {processes}")
  return Experiment(config=config, mesh=mesh, info=info,
                    eval_model=build_model(config, train=False,
                                           platform=sharding.mesh_platform(mesh)))


def for_training(config: ml_collections.ConfigDict,
                 mesh: Mesh | None = None) -> TrainingExperiment:
  """`for_inference(config, mesh)` plus the train model, the optimizer and the batch sizes.

  Raises:
    ValueError naming `config.data.batch_size` when it does not split evenly over the mesh.
  """
  exp = for_inference(config, mesh)
  per_process, per_device = sharding.batch_sizes(
      config.data.batch_size, num_processes=sharding.mesh_process_count(exp.mesh),
      num_devices=exp.mesh.size)
  return TrainingExperiment(
      **{f.name: getattr(exp, f.name) for f in dataclasses.fields(Experiment)},
      train_model=build_model(config, train=True, platform=sharding.mesh_platform(exp.mesh)),
      tx=train_step_lib.make_optimizer(config),
      num_train_images=num_train_images(config, exp.info),
      batch_per_process=per_process, batch_per_device=per_device)


def _state_kwargs(exp: TrainingExperiment) -> dict:
  c = exp.config
  return dict(image_shape=tuple(c.data.crop_size) + (3,), num_classes=c.model.num_classes,
              num_train_images=exp.num_train_images)


def initial_state(exp: TrainingExperiment) -> train_step_lib.TrainState:
  """A fresh train state replicated on the mesh (before any resume / init_from)."""
  return train_step_lib.create_train_state(
      exp.config, exp.train_model, exp.tx, exp.mesh, rng=jax.random.PRNGKey(exp.config.seed),
      **_state_kwargs(exp))


def abstract_state(exp: TrainingExperiment) -> train_step_lib.TrainState:
  """ShapeDtypeStructs (replicated shardings) of `initial_state(exp)`: the restore target.

  Nothing is allocated, so a resume never initialises a state it would throw away.
  """
  return train_step_lib.abstract_train_state(exp.config, exp.train_model, exp.tx, exp.mesh,
                                             **_state_kwargs(exp))
