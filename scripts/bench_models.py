"""Parameter counts and forward FLOPs of the registered models.

Usage: python scripts/bench_models.py [--models hrnet_w48,hrnet_w48_contrast] [--size 1024,2048]
                                      [--no_compile]

Prints one JSON line per model: `params` (all), `backbone_params`, and `flops`
of one inference forward on a [1, H, W, 3] image from XLA's cost analysis
(a multiply-add counts 2). Nothing is allocated: variables and the image are
ShapeDtypeStructs. By default the cost comes from the compiled executable
(`jit(f).lower(...).compile().cost_analysis()`); `--no_compile` reads the
un-optimised HLO instead, which is much faster on CPU and counts the same convs.
Reference: HRNetV2-W48 backbone 65.3M parameters, `hrnet_w48_contrast` 70.7M.
"""
from __future__ import annotations

import functools
import json
import time
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from pixcon_jax import cli
from pixcon_jax import models
import xla_cost

_MODELS = flags.DEFINE_list("models", None, "models to measure (default: every registered one)")
_SIZE = flags.DEFINE_list("size", ["1024", "2048"], "input height,width")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 19, "classes")
_NO_COMPILE = flags.DEFINE_bool("no_compile", False, "cost analysis of the lowered HLO only")


def measure(name: str, size: tuple[int, int], num_classes: int, compile_: bool) -> dict[str, Any]:
  """Parameter counts and forward FLOPs of one model."""
  model = models.build_model(name, num_classes=num_classes)
  image = jax.ShapeDtypeStruct((1, *size, 3), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), image)
  params = shapes["params"]
  count = lambda tree: int(sum(x.size for x in jax.tree.leaves(tree)))
  start = time.time()
  lowered = jax.jit(functools.partial(model.apply, train=False)).lower(shapes, image)
  cost = xla_cost.cost((lowered.compile() if compile_ else lowered).cost_analysis())
  prefix = models.BACKBONE_PREFIX
  return {"model": name, "params": count(params), "backbone_params": count(params.get(prefix, {})),
          "flops": cost.get("flops"), "gflops": round(cost.get("flops", 0.0) / 1e9, 1),
          "input": [1, *size, 3], "compiled": compile_,
          "seconds": round(time.time() - start, 1)}


def main(argv: list[str]) -> None:
  del argv
  size = tuple(cli.int_list(_SIZE.value, "size", length=2))
  for name in _MODELS.value or models.model_names():
    print(json.dumps(measure(name, size, _NUM_CLASSES.value, not _NO_COMPILE.value)), flush=True)


if __name__ == "__main__":
  cli.run(main)
