"""Parity of the networks against the official PyTorch outputs (`model_eval`, `backbone_train`).

A case is a JSON in tests/golden with an .npz beside it. The stand-in weights
are rebuilt from the JSON's `state_dict_spec` with the golden folder's
`weights.torch_style_weights` (its `weights.py`, beside the case JSON),
converted with `pixcon_jax.convert` and run on the stored NCHW input transposed
to NHWC. Each compared array gives one row: `case`, `output`, `max_abs_diff`,
`tolerance = 1e-4 * max(1, max|ref|)`, `ok`.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import pathlib
from types import ModuleType
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from pixcon_jax import convert
from pixcon_jax import models

# Official output names -> keys of our output dict.
_OUTPUT_KEYS = {"seg": "logits", "seg_aux": "aux_logits", "embed": "embedding"}


@functools.cache
def golden_weights_module(golden_dir: pathlib.Path | str) -> ModuleType:
  """The `weights.py` of a golden folder (e.g. tests/golden), imported from its path."""
  path = pathlib.Path(golden_dir).resolve() / "weights.py"
  if not path.is_file():
    raise ValueError(f"golden weights.py not found at {path}")
  spec = importlib.util.spec_from_file_location("pixcon_golden_weights", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _load_case(path: pathlib.Path | str) -> tuple[dict[str, Any], dict[str, np.ndarray],
                                                  dict[str, np.ndarray]]:
  """(meta, reference arrays, stand-in state_dict) of a case JSON."""
  path = pathlib.Path(path)
  meta = json.loads(path.read_text())
  with np.load(path.with_suffix(".npz")) as f:
    ref = {k: f[k] for k in f.files}
  state_dict = golden_weights_module(path.parent).torch_style_weights(
      meta["state_dict_spec"], meta["weights"]["conv_gain"])
  return meta, ref, state_dict


def _row(case: str, output: str, ours: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
  ours = np.asarray(ours, np.float32)
  if ours.shape != ref.shape:
    return {"case": case, "output": output, "ok": False,
            "error": f"shape {list(ours.shape)} != reference {list(ref.shape)}"}
  diff = float(np.max(np.abs(ours.astype(np.float64) - ref)))
  tol = 1e-4 * max(1.0, float(np.max(np.abs(ref))))
  return {"case": case, "output": output, "max_abs_diff": diff, "tolerance": tol,
          "ok": bool(diff <= tol)}


def _compiled(fn: Any, *args: Any) -> Any:
  """`jax.jit(fn)` compiled for `args`; on CPU with LLVM optimisations off.

  One forward of a full-width HRNet is ~2 GFLOP at the fixture sizes, but its
  unrolled graph takes XLA:CPU several times longer to optimise than to run, so
  the backend optimisation level is lowered there. It changes the fusion code,
  not the float32 arithmetic (parity diffs move by < 1e-7).
  """
  lowered = jax.jit(fn).lower(*args)
  if jax.default_backend() == "cpu":
    return lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
  return lowered.compile()


def _nchw(x: jax.Array) -> np.ndarray:
  return np.asarray(x).transpose(0, 3, 1, 2)


def _shapes(module: Any, image: np.ndarray) -> Any:
  return jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False),
                        jax.ShapeDtypeStruct(image.shape, jnp.float32))


def run_model_eval(case_json_path: pathlib.Path | str, *,
                   conv_impl: str = "auto") -> list[dict[str, Any]]:
  """A full model in inference mode: the official outputs and the `backbone.i` intermediates.

  `conv_impl` picks the convolution algorithm (`models.conv`); every one must pass.
  """
  meta, ref, state_dict = _load_case(case_json_path)
  case = meta.get("name", pathlib.Path(case_json_path).stem)
  name = meta.get("model") or meta["name"]
  num_classes = int(meta["outputs"]["seg"][1])
  model = models.build_model(name, num_classes=num_classes, conv_impl=conv_impl)
  image = ref["input"].transpose(0, 2, 3, 1)
  variables, _ = convert.convert_state_dict(state_dict, _shapes(model, image))
  out = _compiled(functools.partial(model.apply, train=False), variables, image)(variables, image)

  rows = []
  for key in meta["npz_keys"]:
    if key in meta.get("input_keys", ["input"]):
      continue
    if key in _OUTPUT_KEYS:
      ours = out.get(_OUTPUT_KEYS[key])
    elif key.startswith("backbone."):
      i = int(key.split(".")[1])
      ours = out["features"][i] if i < len(out["features"]) else None
    else:
      ours = None
    if ours is None:
      rows.append({"case": case, "output": key, "ok": False, "error": "no such output in our model"})
      continue
    rows.append(_row(case, key, _nchw(ours), ref[key]))
  return rows


def _backbone_name(meta: dict[str, Any]) -> str:
  overrides = meta.get("config", {}).get("overrides", {})
  if "network.backbone" in overrides:
    return overrides["network.backbone"]
  return str(meta["model"]).split()[0]


def run_backbone_train(case_json_path: pathlib.Path | str, *,
                       conv_impl: str = "auto") -> list[dict[str, Any]]:
  """A backbone alone in training mode: outputs with batch statistics and updated BN buffers."""
  meta, ref, state_dict = _load_case(case_json_path)
  case = meta.get("name", pathlib.Path(case_json_path).stem)
  backbone = models.build_backbone(_backbone_name(meta), conv_impl=conv_impl)
  image = ref["input"].transpose(0, 2, 3, 1)
  variables, _ = convert.convert_state_dict(state_dict, _shapes(backbone, image))
  apply = _compiled(functools.partial(backbone.apply, train=True, mutable=["batch_stats"]),
                    variables, image)
  features, updated = apply(variables, image)
  stats = flax.traverse_util.flatten_dict(flax.core.unfreeze(updated["batch_stats"]))

  rows = []
  for key in meta["npz_keys"]:
    if key in meta.get("input_keys", ["input"]):
      continue
    if key.startswith("backbone."):
      i = int(key.split(".")[1])
      rows.append(_row(case, key, _nchw(features[i]), ref[key]))
    elif key.startswith("updated."):
      module, _, leaf = key[len("updated."):].rpartition(".")
      path = (*module.split("."), {"running_mean": "mean", "running_var": "var"}[leaf])
      if path not in stats:
        rows.append({"case": case, "output": key, "ok": False,
                     "error": f"no batch_stats at {'/'.join(path)}"})
        continue
      rows.append(_row(case, key, np.asarray(stats[path]), ref[key]))
    else:
      rows.append({"case": case, "output": key, "ok": False, "error": "unknown reference key"})
  return rows
