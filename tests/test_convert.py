"""PyTorch state_dict <-> Flax variables: round trip, error reports, backbone-only conversion."""
import importlib.util
import os
import pathlib
import pickle
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from pixcon_jax import checkpointing
from pixcon_jax import convert
from pixcon_jax.models import build_backbone
from pixcon_jax.models import build_model

TINY = dict(widths=(2, 4, 6, 8), stage_modules=(1, 1, 1), num_blocks=1, stem_width=4,
            layer1_planes=2, layer1_blocks=1, proj_dim=4, ocr_channels=4, ocr_key_channels=2)


@pytest.fixture(scope="module")
def tiny():
  """(model, concrete variables with random values, their torch-style state_dict)."""
  model = build_model("hrnet_w48_ocr_contrast", num_classes=3, **TINY)
  shapes = checkpointing.variable_shapes(model)
  rng = np.random.default_rng(0)
  flat = {path: rng.standard_normal(s.shape).astype(np.float32)
          for path, s in flax.traverse_util.flatten_dict(shapes).items()}
  # Running variances must be positive for the forward to be finite.
  flat = {path: np.abs(v) + 0.5 if path[-1] == "var" else v for path, v in flat.items()}
  variables = flax.traverse_util.unflatten_dict(flat)
  return model, shapes, variables, helpers.flax_to_state_dict(variables)


def _assert_trees_equal(a, b):
  fa, fb = (flax.traverse_util.flatten_dict(flax.core.unfreeze(t)) for t in (a, b))
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=str(k))


def test_round_trip_through_torch_layout(tiny):
  _, shapes, variables, sd = tiny
  assert sd["backbone.conv1.weight"].shape == (4, 3, 3, 3)  # OIHW
  assert "backbone.bn1.running_var" in sd and "proj_head.proj.1.0.weight" in sd
  torch_sd = {f"module.{k}": v for k, v in sd.items()}  # DataParallel prefix
  torch_sd.update({k.rpartition(".")[0] + ".num_batches_tracked": np.zeros((), np.int64)
                   for k in sd if k.endswith("running_mean")})
  out, report = convert.convert_state_dict(torch_sd, shapes)
  _assert_trees_equal(out, variables)
  assert len(report.mapped) == len(sd) and not report.skipped
  assert len(report.dropped) == sum(k.endswith("running_mean") for k in sd)


def test_missing_key_error_lists_the_key(tiny):
  _, shapes, _, sd = tiny
  sd = dict(sd)
  del sd["ocr_distri_head.object_context_block.f_up.0.weight"]
  del sd["backbone.stage4.0.fuse_layers.3.0.2.1.running_var"]
  with pytest.raises(ValueError, match="missing keys") as err:
    convert.convert_state_dict(sd, shapes)
  assert "ocr_distri_head.object_context_block.f_up.0.weight" in str(err.value)
  assert "backbone.stage4.0.fuse_layers.3.0.2.1.running_var" in str(err.value)


def test_shape_mismatch_error_names_key_and_both_shapes(tiny):
  _, shapes, _, sd = tiny
  sd = dict(sd, **{"cls_head.weight": np.zeros((5, 4, 1, 1), np.float32)})
  with pytest.raises(ValueError, match=r"cls_head.weight: torch \[5, 4, 1, 1\].*expects "
                                       r"\[1, 1, 4, 3\]"):
    convert.convert_state_dict(sd, shapes)


def test_ignorable_keys_are_reported_as_skipped_and_others_rejected(tiny):
  _, shapes, _, sd = tiny
  extra = {"segment_queue": np.zeros((3, 5, 4), np.float32),
           "segment_queue_ptr": np.zeros((3,), np.int64),
           "pixel_queue": np.zeros((3, 5, 4), np.float32),
           "backbone.incre_modules.0.0.conv1.weight": np.zeros((2, 2, 1, 1), np.float32),
           "backbone.final_layer.0.bias": np.zeros((2,), np.float32)}
  _, report = convert.convert_state_dict({**sd, **extra}, shapes)
  assert sorted(report.skipped) == sorted(extra)
  assert "skipped: pixel_queue" in report.summary()
  with pytest.raises(ValueError, match=r"unexpected keys \(1\): decoder.extra.weight"):
    convert.convert_state_dict({**sd, "decoder.extra.weight": np.zeros((2, 2, 1, 1))}, shapes)


def test_backbone_only_maps_imagenet_keys_into_backbone_subtree(tiny):
  model, shapes, variables, sd = tiny
  backbone_sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
  backbone_sd["classifier.weight"] = np.zeros((10, 8), np.float32)
  backbone_sd["downsamp_modules.0.0.weight"] = np.zeros((4, 2, 3, 3), np.float32)
  out, report = convert.convert_state_dict(backbone_sd, shapes, backbone_only=True)
  assert set(out["params"]) == {"backbone"} and set(out["batch_stats"]) == {"backbone"}
  assert sorted(report.skipped) == ["classifier.weight", "downsamp_modules.0.0.weight"]
  _assert_trees_equal(out["params"]["backbone"], variables["params"]["backbone"])
  # Overlaid on other (e.g. freshly initialised) variables, only the backbone changes.
  base = jax.tree.map(np.zeros_like, variables)
  merged = convert.merge_variables(base, out)
  _assert_trees_equal(merged["params"]["backbone"], variables["params"]["backbone"])
  assert not np.any(merged["params"]["cls_head"]["kernel"])
  del backbone_sd["conv1.weight"]
  with pytest.raises(ValueError, match=r"missing keys \(1\): conv1.weight"):
    convert.convert_state_dict(backbone_sd, shapes, backbone_only=True)


def test_bare_backbone_converts_without_prefix(tiny):
  _, _, variables, sd = tiny
  backbone = build_backbone("hrnet48", **{k: v for k, v in TINY.items()
                                          if k not in ("proj_dim", "ocr_channels",
                                                       "ocr_key_channels")})
  shapes = checkpointing.variable_shapes(backbone)
  backbone_sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
  out, _ = convert.convert_state_dict(backbone_sd, shapes)
  _assert_trees_equal(out["params"], variables["params"]["backbone"])


def test_converted_model_runs(tiny, quick_jit):
  model, shapes, _, sd = tiny
  out, _ = convert.convert_state_dict(sd, shapes)
  image = jnp.ones((1, 32, 32, 3))
  res = quick_jit(lambda v, x: model.apply(v, x, train=False), out, image)
  assert res["logits"].shape == (1, 8, 8, 3) and bool(jnp.all(jnp.isfinite(res["logits"])))


# ---- official `save_net` checkpoints: {"config_dict": ..., "state_dict": {"module.": ...}} -----

REPO = pathlib.Path(__file__).resolve().parents[1]
# A stand-in for torch (not a test dependency): `torch.load` of a pickled official checkpoint
# whose tensors are numpy arrays, wrapped to answer `.detach().cpu().numpy()`.
_FAKE_TORCH = """
import pickle
class _Tensor:
  def __init__(self, a): self._a = a
  def detach(self): return self
  def cpu(self): return self
  def numpy(self): return self._a
def load(path, map_location=None, weights_only=True):
  with open(path, "rb") as f:
    obj = pickle.load(f)
  obj["state_dict"] = {k: _Tensor(v) for k, v in obj["state_dict"].items()}
  return obj
"""


def _official_config(model_name):
  """The part of the official Configer tree that `save_net` stores and we read."""
  return {"data": {"num_classes": 3, "input_mode": "BGR"},
          "network": {"backbone": "hrnet48", "model_name": model_name}}


@pytest.fixture()
def official_pth(tmp_path, tiny):
  """(path of a fake official .pth of the tiny hrnet_w48_ocr_contrast, dir holding fake torch)."""
  _, _, _, sd = tiny
  ckpt = {"config_dict": _official_config("hrnet_w48_ocr_contrast"),
          "state_dict": {f"module.{k}": v for k, v in sd.items()}}
  path = tmp_path / "hrnet_ocr_contrast_max_performance.pth"
  path.write_bytes(pickle.dumps(ckpt))
  fake = tmp_path / "fake_torch"
  (fake / "torch").mkdir(parents=True)
  (fake / "torch" / "__init__.py").write_text(_FAKE_TORCH)
  return path, fake


def _load_script():
  return helpers.load_script("convert_checkpoint")


def test_official_checkpoint_converts_for_the_model_its_config_dict_names(official_pth, tiny,
                                                                          monkeypatch):
  path, fake = official_pth
  # The stand-in is set into sys.modules (and taken out again after the test): left there, it
  # would break every later import that asks whether torch is loaded (scipy, via keras/sklearn).
  spec = importlib.util.spec_from_file_location("torch", fake / "torch" / "__init__.py")
  fake_torch = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(fake_torch)
  monkeypatch.setitem(sys.modules, "torch", fake_torch)
  state_dict, config_dict = _load_script().load_checkpoint(path)
  assert all(k.startswith("module.") for k in state_dict)
  name = convert.resolve_model_name(None, config_dict, source=path.name)
  assert name == "hrnet_w48_ocr_contrast"
  assert convert.resolve_model_name(name, config_dict, source=path.name) == name
  _, _, variables, _ = tiny
  out, _ = convert.convert_for_model(name, state_dict, num_classes=3, **TINY)
  _assert_trees_equal(out, variables)


def test_model_name_of_official_names_and_missing_records():
  assert convert.checkpoint_model_name(_official_config("spatial_ocrnet")) == "ocr_r101"
  assert convert.checkpoint_model_name({"network": {"backbone": "hrnet48"}}) is None
  assert convert.checkpoint_model_name(None) is None
  assert convert.resolve_model_name("deeplab_v3", None, source="x.npz") == "deeplab_v3"
  with pytest.raises(ValueError, match="x.npz records no model.*pass --model"):
    convert.resolve_model_name(None, None, source="x.npz")
  with pytest.raises(ValueError, match=r"holds model spatial_ocrnet \(registered here as "
                                       r"ocr_r101\).*--model=ocr_r101"):
    convert.resolve_model_name("ocr_r101_contrast", _official_config("spatial_ocrnet"),
                               source="x.pth")


def test_wrong_model_flag_is_one_line_naming_the_checkpoints_model(official_pth, tmp_path):
  path, fake = official_pth
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), str(REPO)]))
  res = subprocess.run(
      [sys.executable, str(REPO / "scripts" / "convert_checkpoint.py"),
       "--model=hrnet_w48_contrast", f"--torch={path}", f"--out={tmp_path / 'out'}"],
      capture_output=True, text=True, env=env, timeout=300, check=False)
  assert res.returncode != 0
  lines = res.stderr.strip().splitlines()
  assert len(lines) == 1, res.stderr
  assert lines[0] == (f"error: --model=hrnet_w48_contrast does not match {path.name}, which "
                      "holds model hrnet_w48_ocr_contrast (config_dict network.model_name); "
                      "pass --model=hrnet_w48_ocr_contrast or omit it")
  assert not (tmp_path / "out").exists()
