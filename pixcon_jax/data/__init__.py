"""Datasets, transforms and grain pipelines.

Public API:
  get_dataset_info(name) -> DatasetInfo
  make_train_iterator(data_cfg, augment_cfg, *, batch_size_per_process, seed, process_index,
                      process_count, worker_count) -> iterator with get_state/set_state
  make_eval_iterator(data_cfg, augment_cfg, *, batch_size_per_process, process_index,
                     process_count, worker_count) -> iterator of padded batches with `valid`
  num_eval_batches(num_examples, batch_size_per_process, process_count) -> int
  make_train_loader(source, *, crop_size, augment, batch_size_per_process, seed, ...) -> DataLoader
  make_source(data_cfg, split) -> random-access source of un-augmented records
  default_data_config(dataset), default_augment_config()
"""
from pixcon_jax.data.config_defaults import default_augment_config
from pixcon_jax.data.config_defaults import default_data_config
from pixcon_jax.data.datasets import DATASETS
from pixcon_jax.data.datasets import DatasetInfo
from pixcon_jax.data.datasets import get_dataset_info
from pixcon_jax.data.datasets import make_source
from pixcon_jax.data.pipeline import close_iterator
from pixcon_jax.data.pipeline import make_eval_iterator
from pixcon_jax.data.pipeline import make_train_iterator
from pixcon_jax.data.pipeline import make_train_loader
from pixcon_jax.data.pipeline import num_eval_batches
