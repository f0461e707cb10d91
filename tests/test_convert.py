"""PyTorch state_dict <-> Flax variables: round trip, error reports, backbone-only conversion."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixcon_jax import convert
from pixcon_jax.models import build_backbone
from pixcon_jax.models import build_model

TINY = dict(widths=(2, 4, 6, 8), stage_modules=(1, 1, 1), num_blocks=1, stem_width=4,
            layer1_planes=2, layer1_blocks=1, proj_dim=4, ocr_channels=4, ocr_key_channels=2)


@pytest.fixture(scope="module")
def tiny():
  """(model, concrete variables with random values, their torch-style state_dict)."""
  model = build_model("hrnet_w48_ocr_contrast", num_classes=3, **TINY)
  shapes = convert.variable_shapes(model)
  rng = np.random.default_rng(0)
  flat = {path: rng.standard_normal(s.shape).astype(np.float32)
          for path, s in flax.traverse_util.flatten_dict(shapes).items()}
  # Running variances must be positive for the forward to be finite.
  flat = {path: np.abs(v) + 0.5 if path[-1] == "var" else v for path, v in flat.items()}
  variables = flax.traverse_util.unflatten_dict(flat)
  return model, shapes, variables, convert.flax_to_state_dict(variables)


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
  shapes = convert.variable_shapes(backbone)
  backbone_sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
  out, _ = convert.convert_state_dict(backbone_sd, shapes)
  _assert_trees_equal(out["params"], variables["params"]["backbone"])


def test_converted_model_runs(tiny, quick_jit):
  model, shapes, _, sd = tiny
  out, _ = convert.convert_state_dict(sd, shapes)
  image = jnp.ones((1, 32, 32, 3))
  res = quick_jit(lambda v, x: model.apply(v, x, train=False), out, image)
  assert res["logits"].shape == (1, 8, 8, 3) and bool(jnp.all(jnp.isfinite(res["logits"])))
