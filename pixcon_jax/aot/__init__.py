"""Compiling the steps for a TPU or GPU that is not attached (ahead-of-time, `scripts/aot_compile.py`).

- `targets`: `--target=tpu:v5e:2x2` / `cuda:h100:4` -> a `Target` (chip, HBM per chip) and its
  compile-only devices (`jax.experimental.topologies`); the GPU descriptions are the text files
  in `targets/`.
- `report`: compiles the real train and eval steps for those devices and reads XLA's memory
  analysis, FLOPs and the compiled HLO (native convolutions, no host transfers, allowed custom
  calls, matmul precision).

Needs the `[aot]` extra (libtpu, the CUDA PJRT plugin); without it `targets.devices` raises.
"""
