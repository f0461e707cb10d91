"""Experiment configs: one file per experiment, loaded by path (`--config=configs/<name>.py`).

A package so that the experiment files share `configs/common.py` by a plain import
(`from configs import common`): ml_collections executes a config file by path, and the
`configs` package is found from the repository root (the working directory of
`python -m pixcon_jax.main`, pytest's `pythonpath`) or from the installed project
(`pip install -e .` packages it next to `pixcon_jax`).
"""
