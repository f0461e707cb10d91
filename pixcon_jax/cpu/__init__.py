"""XLA:CPU machinery: what makes a run on CPU cores fast, and is never engaged anywhere else.

- `xla_flags`: `runs_on_cpu`, the one gate of the process-level tuning, and XLA:CPU's dots on
  Eigen instead of YNNPACK (an `XLA_FLAGS` entry).
- `host_memory`: the restart with glibc's malloc on transparent huge pages.
- `conv`: im2col and Winograd convolutions, and the per-shape choice among them.
- `fusion`: the fusion barrier on residual outputs.

Only the entry points (`main`, `scripts/bench_*.py`) reach `xla_flags` and `host_memory`, before
any JAX backend starts, and only where `runs_on_cpu` holds; only `models.build_model` reaches
`conv` and `fusion`, for models built for the "cpu" platform (the mesh's, not the default
backend) or an explicit `conv_impl`. This package imports nothing else of pixcon_jax.
"""
