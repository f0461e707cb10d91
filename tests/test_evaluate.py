"""Inference protocol and sharded evaluation: slide == whole, flip equivariance, batch/device
independence of the dataset-level confusion matrix, and a converted official HRNet-W48."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixcon_jax import evaluate
from pixcon_jax import inference
from pixcon_jax import metrics
from pixcon_jax import sharding

REPO = pathlib.Path(__file__).resolve().parents[1]
C = 5


class ToyNet(nn.Module):
  """conv -> avg-pool by `stride` -> 1x1 classifier: logits at 1/stride like a real head."""
  stride: int = 2
  kernel: int = 3

  @nn.compact
  def __call__(self, image, train=False):
    x = nn.Conv(8, (self.kernel, self.kernel), padding="SAME")(image)
    x = nn.relu(x)
    if self.stride > 1:
      x = nn.avg_pool(x, (self.stride, self.stride), (self.stride, self.stride))
    return {"logits": nn.Conv(C, (1, 1))(x), "embedding": x}


def _init(model, shape=(1, 16, 24, 3), seed=0):
  return model.init(jax.random.PRNGKey(seed), jnp.zeros(shape))


def _images(b=2, h=16, w=24, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((b, h, w, 3)), jnp.float32)


def test_window_starts_cover_and_end_flush():
  assert inference.window_starts(10, 16, 8) == [0]
  assert inference.window_starts(20, 8, 8) == [0, 8, 12]
  assert inference.window_starts(24, 8, 8) == [0, 8, 16]
  assert inference.window_starts(17, 8, 4) == [0, 4, 8, 9]


@pytest.mark.parametrize("crop", [(16, 24), (32, 40)])
def test_slide_on_image_that_fits_one_window_equals_whole(crop):
  model = ToyNet(stride=2)
  variables = _init(model)
  apply_fn = inference.logits_apply_fn(model)
  image = _images()
  whole = inference.InferenceSettings(mode="whole", scales=(1.0, 1.5), flip=True)
  slide = inference.InferenceSettings(mode="slide", scales=(1.0,), flip=True, crop_size=crop,
                                     stride=(4, 4))
  a = inference.predict_scores(apply_fn, variables, image,
                              settings=inference.InferenceSettings(mode="whole", flip=True))
  b = inference.predict_scores(apply_fn, variables, image, settings=slide)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert inference.predict_scores(apply_fn, variables, image, settings=whole).shape == (2, 16, 24, C)


def test_overlapping_slide_of_pointwise_model_equals_whole():
  # A 1x1 network sees no context, so averaged overlapping windows must equal one pass.
  model = ToyNet(stride=1, kernel=1)
  variables = _init(model)
  apply_fn = inference.logits_apply_fn(model)
  image = _images(h=20, w=30)
  whole = inference.predict_scores(apply_fn, variables, image,
                                  settings=inference.InferenceSettings())
  slide = inference.predict_scores(
      apply_fn, variables, image,
      settings=inference.InferenceSettings(mode="slide", crop_size=(8, 12), stride=(5, 7)))
  np.testing.assert_allclose(np.asarray(slide), np.asarray(whole), rtol=1e-5, atol=1e-5)


def test_flip_of_flip_equivariant_model_equals_plain():
  # Pointwise conv + 2x2 average pool on even sizes commutes with a horizontal flip, and the
  # align_corners resize is symmetric, so flip inference = 2 x plain (same argmax).
  model = ToyNet(stride=2, kernel=1)
  variables = _init(model)
  apply_fn = inference.logits_apply_fn(model)
  image = _images(h=16, w=24)
  for scales in [(1.0,), (0.75, 1.25)]:
    plain = inference.predict_scores(apply_fn, variables, image,
                                    settings=inference.InferenceSettings(scales=scales))
    flip = inference.predict_scores(apply_fn, variables, image,
                                   settings=inference.InferenceSettings(scales=scales, flip=True))
    np.testing.assert_allclose(np.asarray(flip), 2 * np.asarray(plain), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.argmax(flip, -1), np.argmax(plain, -1))


def test_softmax_aggregation_sums_probabilities():
  model = ToyNet()
  variables = _init(model)
  apply_fn = inference.logits_apply_fn(model)
  s = inference.predict_scores(apply_fn, variables, _images(),
                              settings=inference.InferenceSettings(scales=(1.0, 0.5), flip=True,
                                                                  aggregate="softmax"))
  np.testing.assert_allclose(np.asarray(s).sum(-1), 4.0, rtol=1e-5)


def _np_resize_align_corners(x, size):
  """Bilinear resize with align_corners=True in float64 numpy: [B, H, W, C] -> [B, h, w, C].

  Output pixel o of an axis of n -> m samples input coordinate o * (n - 1) / (m - 1)
  (coordinate 0 when m == 1), interpolating linearly between its two neighbours.
  """
  x = np.asarray(x, np.float64)
  for axis, m in ((1, size[0]), (2, size[1])):
    n = x.shape[axis]
    src = np.arange(m) * ((n - 1) / (m - 1) if m > 1 else 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n - 1)
    i1 = np.minimum(i0 + 1, n - 1)
    shape = [1, 1, 1, 1]
    shape[axis] = m
    frac = (src - i0).reshape(shape)
    x = np.take(x, i0, axis=axis) * (1 - frac) + np.take(x, i1, axis=axis) * frac
  return x


def test_multiscale_flip_logits_equal_an_independent_numpy_reference():
  # The official `ms_test`: per scale, resize the image to (int(H s), int(W s)) (align_corners),
  # run the network on it and on its mirror (flipped back), resize each to (H, W) and sum.
  model = ToyNet(stride=2, kernel=3)  # A 3x3 conv: the flipped pass really differs.
  variables = _init(model)
  apply = jax.jit(lambda x: model.apply(variables, x)["logits"])
  image = _images(b=1, h=13, w=18, seed=3)
  scales = (0.75, 1.5)
  h, w = image.shape[1:3]
  expected = np.zeros((1, h, w, C))
  for s in scales:
    x = _np_resize_align_corners(image, (int(h * s), int(w * s))).astype(np.float32)
    expected += _np_resize_align_corners(np.asarray(apply(x)), (h, w))
    mirrored = np.asarray(apply(np.ascontiguousarray(x[:, :, ::-1])))[:, :, ::-1]
    expected += _np_resize_align_corners(mirrored, (h, w))
  got = inference.predict_scores(inference.logits_apply_fn(model), variables, image,
                                settings=inference.InferenceSettings(scales=scales, flip=True))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)
  # The scales matter on this model: ignoring them (two passes at scale 1) is far off.
  unscaled = inference.predict_scores(inference.logits_apply_fn(model), variables, image,
                                     settings=inference.InferenceSettings(scales=(1.0, 1.0),
                                                                         flip=True))
  assert np.abs(np.asarray(unscaled) - expected).max() > 100 * 1e-4


def test_settings_from_config_protocols():
  import ml_collections
  cfg = ml_collections.ConfigDict(dict(mode="whole", scales=(1.0,), flip=False,
                                       crop_size=(512, 1024), stride=(256, 512), protocol="paper"))
  s = inference.settings_from_config(cfg)
  assert s.scales == (0.75, 1.0, 1.25, 1.5, 1.75, 2.0) and s.flip
  cfg.protocol = "official"
  assert inference.settings_from_config(cfg).scales[0] == 0.5
  cfg.protocol = None
  cfg.mode = "slide"
  s = inference.settings_from_config(cfg)
  assert s.scales == (1.0,) and not s.flip and s.crop_size == (512, 1024) and s.stride == (256, 512)
  cfg.mode = "tiles"
  with pytest.raises(ValueError, match="config.eval.mode"):
    inference.settings_from_config(cfg)


def _dataset(n=6, h=16, w=24, seed=0):
  rng = np.random.default_rng(seed)
  image = rng.standard_normal((n, h, w, 3)).astype(np.float32)
  label = rng.integers(0, C, (n, h, w)).astype(np.int32)
  label[rng.random((n, h, w)) < 0.15] = 255
  return image, label


def _batches(image, label, batch_size):
  """Eval-pipeline-like padded batches: the last one padded with valid=False and label 255."""
  n = image.shape[0]
  for i in range(0, n, batch_size):
    im, lb = image[i:i + batch_size], label[i:i + batch_size]
    k = im.shape[0]
    valid = np.arange(batch_size) < k
    # Padding examples carry garbage labels: `valid` alone must exclude them.
    im = np.concatenate([im, np.ones((batch_size - k,) + im.shape[1:], np.float32)])
    lb = np.concatenate([lb, np.zeros((batch_size - k,) + lb.shape[1:], np.int32)])
    yield {"image": im, "label": lb, "valid": valid}


def _reference_cm(apply_fn, variables, image, label, settings):
  scores = inference.predict_scores(apply_fn, variables, jnp.asarray(image), settings=settings)
  return metrics.confusion_matrix_numpy(np.argmax(np.asarray(scores), -1), label, C)


SETTINGS = inference.InferenceSettings(scales=(0.75, 1.0), flip=True)


def test_evaluator_equals_reference_for_any_batch_size():
  model = ToyNet()
  variables = _init(model)
  image, label = _dataset()
  ref = _reference_cm(inference.logits_apply_fn(model), variables, image, label, SETTINGS)
  ev = evaluate.Evaluator(inference.logits_apply_fn(model), sharding.make_mesh(), num_classes=C,
                          settings=SETTINGS, class_names=[f"c{i}" for i in range(C)])
  for bs in (1, 4, 6):
    cm, n = ev.confusion_matrix(variables, _batches(image, label, bs))
    np.testing.assert_array_equal(cm, ref)
    assert n == 6
  out = ev(variables, _batches(image, label, 4))
  np.testing.assert_allclose(out["miou"], metrics.metrics_from_confusion_matrix(ref)["miou"])
  assert "iou/c0" in out and out["num_images"] == 6


_EIGHT_DEVICES = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    sys.path.insert(0, {tests!r})
    import test_evaluate as t
    from pixcon_jax import evaluate, inference, sharding
    assert jax.device_count() == 8, jax.devices()
    model = t.ToyNet()
    variables = t._init(model)
    image, label = t._dataset()
    ev = evaluate.Evaluator(inference.logits_apply_fn(model), sharding.make_mesh(),
                            num_classes=t.C, settings=t.SETTINGS)
    out = {{}}
    for bs in (3, 8, 16):  # 3: host-side padding to 8 devices; 16: mostly padding
      cm, n = ev.confusion_matrix(variables, t._batches(image, label, bs))
      out[bs] = [cm.tolist(), n]
    print("RESULT" + json.dumps(out))
""")


def test_evaluator_on_eight_devices_matches_single_device():
  model = ToyNet()
  variables = _init(model)
  image, label = _dataset()
  ref = _reference_cm(inference.logits_apply_fn(model), variables, image, label, SETTINGS)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES.format(tests=str(REPO / "tests"))],
                        env=env, capture_output=True, text=True, timeout=300, cwd=str(REPO))
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][0]
  for bs, (cm, n) in json.loads(line[len("RESULT"):]).items():
    np.testing.assert_array_equal(np.asarray(cm), ref, err_msg=f"batch size {bs}")
    assert n == 6


# ------------------------------------------------------------------------------------------
# Converted official models (stand-in weights of tests/golden/weights.py).

TINY_HRNET = dict(widths=(8, 16, 32, 64), stage_modules=(1, 1, 1), num_blocks=1, stem_width=16,
                  layer1_planes=8, layer1_blocks=1, proj_dim=16)


def _torch_spec_of(variable_shapes):
  """The official-style state_dict spec [(torch key, torch shape)] of a model's variables."""
  import flax
  from pixcon_jax import convert
  spec = []
  for path, leaf in flax.traverse_util.flatten_dict(flax.core.unfreeze(variable_shapes)).items():
    shape = tuple(leaf.shape)
    if path[-1] == "kernel" and len(shape) == 4:
      shape = (shape[3], shape[2], shape[0], shape[1])  # HWIO -> OIHW
    elif path[-1] == "kernel" and len(shape) == 2:
      shape = shape[::-1]
    spec.append((convert.torch_leaf_name(path), shape))
  return spec


def _fake_cityscapes_split(first_image, first_label, n=3, h=64, w=128):
  """A few 64x128 images: the first given, others random; ignore strips; one padding example."""
  rng = np.random.default_rng(7)
  image = rng.standard_normal((n + 1, h, w, 3)).astype(np.float32)
  label = rng.integers(0, 19, (n + 1, h, w)).astype(np.int32)
  image[0], label[0] = first_image, first_label
  label[:, :4] = 255  # ego-vehicle-like ignore strip
  valid = np.array([True] * n + [False])
  return {"image": image, "label": label, "valid": valid}


def test_tiny_converted_hrnet_multiscale_flip_evaluation(golden_dir):
  from pixcon_jax import checkpointing, convert, models
  from golden_parity import models as parity_models
  model = models.build_model("hrnet_w48_contrast", num_classes=19, **TINY_HRNET)
  spec = _torch_spec_of(checkpointing.variable_shapes(model))
  state_dict = parity_models.golden_weights_module(golden_dir).torch_style_weights(spec, 0.5)
  variables, report = convert.convert_for_model("hrnet_w48_contrast", state_dict, num_classes=19,
                                                **TINY_HRNET)
  assert len(report.mapped) == len(spec)
  apply_fn = inference.logits_apply_fn(model)
  batch = _fake_cityscapes_split(np.zeros((64, 128, 3), np.float32), np.zeros((64, 128), np.int32))
  settings = inference.InferenceSettings(scales=(0.75, 1.0), flip=True)
  ev = evaluate.Evaluator(apply_fn, sharding.make_mesh(), num_classes=19, settings=settings)
  cm, n = ev.confusion_matrix(variables, [batch])
  # Jitted, unsharded reference (an eager HRNet dispatches thousands of ops one by one).
  predict = jax.jit(lambda v, x: inference.predict_scores(apply_fn, v, x, settings=settings))
  scores = predict(variables, jnp.asarray(batch["image"][:3]))
  ref = metrics.confusion_matrix_numpy(np.argmax(np.asarray(scores), -1), batch["label"][:3], 19)
  np.testing.assert_array_equal(cm, ref)
  assert n == 3 and cm.sum() == 3 * 60 * 128


@pytest.mark.slow
def test_converted_official_w48_multiscale_flip_evaluation(golden_dir):
  """Full-width W48 from the golden spec: scale-1 predictions equal the official logits' argmax,
  and the multi-scale + flip protocol runs on a fake Cityscapes-like split (~3 compiles)."""
  from pixcon_jax import convert, models
  from pixcon_jax.models import layers
  from golden_parity import models as parity_models
  meta = json.loads((golden_dir / "hrnet_w48_contrast.json").read_text())
  with np.load(golden_dir / "hrnet_w48_contrast.npz") as f:
    ref = {k: f[k] for k in f.files}
  state_dict = parity_models.golden_weights_module(golden_dir).torch_style_weights(
      meta["state_dict_spec"], meta["weights"]["conv_gain"])
  variables, _ = convert.convert_for_model("hrnet_w48_contrast", state_dict, num_classes=19)
  model = models.build_model("hrnet_w48_contrast", num_classes=19)
  apply_fn = inference.logits_apply_fn(model)
  image0 = ref["input"].transpose(0, 2, 3, 1)[0]
  official = layers.resize_bilinear(jnp.asarray(ref["seg"].transpose(0, 2, 3, 1)), (64, 128))
  label0 = np.argmax(np.asarray(official), -1)[0].astype(np.int32)
  batch = _fake_cityscapes_split(image0, label0)
  mesh = sharding.make_mesh()

  single = evaluate.Evaluator(apply_fn, mesh, num_classes=19,
                              settings=inference.InferenceSettings())
  out = single(variables, [{k: v[:1] for k, v in batch.items()}])
  # Same network, same weights, same upsampling: only near-ties may differ.
  assert out["pixel_accuracy"] > 0.999, out

  multi = evaluate.Evaluator(apply_fn, mesh, num_classes=19,
                             settings=inference.InferenceSettings(scales=(0.75, 1.0), flip=True))
  cm, n = multi.confusion_matrix(variables, [batch])
  assert n == 3 and cm.sum() == 3 * 60 * 128
  m = metrics.metrics_from_confusion_matrix(cm)
  assert 0.0 < m["miou"] <= 1.0 and np.isfinite(m["pixel_accuracy"])


def test_evaluate_checkpoint_from_init_from_writes_json_and_events(tmp_path):
  """Mode eval on the demo config (synthetic split) with converted-style weights."""
  sys.path.insert(0, str(REPO / "tests"))
  from test_predict import demo_config
  config = demo_config(tmp_path, scales=(1.0,), flip=True, max_batches=1)
  workdir = tmp_path / "work"
  out = evaluate.evaluate_checkpoint(config, str(workdir))
  files = list(workdir.glob("eval_*.json"))
  assert len(files) == 1, files
  record = json.loads(files[0].read_text())
  assert record["protocol"]["scales"] == [1.0] and record["protocol"]["flip"]
  np.testing.assert_allclose(record["metrics"]["miou"], out["miou"])
  cm = np.asarray(record["confusion_matrix"])
  np.testing.assert_allclose(metrics.metrics_from_confusion_matrix(cm)["miou"], out["miou"])
  assert record["weights"].startswith("init_from")
  assert list(workdir.glob("events.out.tfevents*")), "no TensorBoard events written"


def test_evaluate_checkpoint_without_weights_is_a_clear_error(tmp_path):
  sys.path.insert(0, str(REPO / "tests"))
  from test_predict import demo_config
  config = demo_config(tmp_path)
  config.init_from = None
  with pytest.raises(FileNotFoundError, match="init_from"):
    evaluate.evaluate_checkpoint(config, str(tmp_path / "work"))


# ------------------------------------------------------------------------------------------
# scripts/visualize_embeddings.py (Figure 4).

def _visualize_module():
  import importlib.util
  spec = importlib.util.spec_from_file_location("visualize_embeddings",
                                                REPO / "scripts" / "visualize_embeddings.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules["visualize_embeddings"] = module
  spec.loader.exec_module(module)
  return module


def test_tsne_keeps_separated_clusters_apart():
  vis = _visualize_module()
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(3, 16)) * 3
  x = np.concatenate([c + 0.3 * rng.normal(size=(30, 16)) for c in centres])
  labels = np.repeat(np.arange(3), 30)
  y = vis.tsne(x, iters=250)  # scikit-learn's (the [viz] extra)
  means = np.stack([y[labels == k].mean(0) for k in range(3)])
  nearest = np.argmin(((y[:, None] - means[None]) ** 2).sum(-1), axis=1)
  assert (nearest == labels).mean() == 1.0
  stats = vis.cluster_statistics(x, labels)
  assert stats["separation_ratio"] > 1.0 and 0 < stats["intra_class_cosine"] <= 1.0


def test_visualize_embeddings_writes_png_and_statistics(tmp_path):
  sys.path.insert(0, str(REPO / "tests"))
  from test_predict import demo_config
  from PIL import Image
  vis = _visualize_module()
  config = demo_config(tmp_path)
  workdir = tmp_path / "work"
  result = vis.run(config, str(workdir), num_batches=1, per_class=20, iters=100)
  png = Image.open(result["png"])
  assert png.size[0] > 100 and png.mode == "RGB"
  assert {"intra_class_distance", "intra_class_cosine"} <= set(result["statistics"])
  json.dumps(result)
  assert list(workdir.glob("events.out.tfevents*"))


def test_visualize_embeddings_without_the_viz_extra_is_one_line_exit_2(tmp_path):
  """scikit-learn hidden (a module that fails to import): one `error:` line naming the extra."""
  hide = tmp_path / "hide"
  hide.mkdir()
  (hide / "sklearn.py").write_text("raise ImportError('hidden', name='sklearn')\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(hide), str(REPO)]))
  res = subprocess.run([sys.executable, str(REPO / "scripts" / "visualize_embeddings.py"),
                        "--config=configs/demo.py:runlocal", f"--workdir={tmp_path / 'w'}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 2, res.stderr[-2000:]
  assert res.stderr.strip().splitlines()[-1] == (
      "error: scripts/visualize_embeddings.py needs the [viz] extra (scikit-learn, matplotlib), "
      "sklearn is missing: pip install -e \".[viz]\"")
  assert "Traceback" not in res.stderr and not (tmp_path / "w").exists()


_TWO_PROCESS_WORKER = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax
    pid, port = int(sys.argv[1]), sys.argv[2]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address="127.0.0.1:" + port, num_processes=2,
                               process_id=pid)
    sys.path.insert(0, {tests!r})
    import test_evaluate as t
    from pixcon_jax import evaluate, inference, sharding
    model = t.ToyNet()
    variables = t._init(model)
    image, label = t._dataset()
    ev = evaluate.Evaluator(inference.logits_apply_fn(model), sharding.make_mesh(),
                            num_classes=t.C, settings=t.SETTINGS)
    # Global batches of 4, padded; each process feeds its contiguous half (pad-and-mask:
    # both processes run the same number of batches).
    batches = ({{k: v[2 * pid:2 * pid + 2] for k, v in b.items()}}
               for b in t._batches(image, label, 4))
    cm, n = ev.confusion_matrix(variables, batches)
    print("RESULT" + json.dumps([cm.tolist(), n]))
""")


def test_evaluator_on_two_processes_sums_across_hosts(tmp_path):
  import socket
  model = ToyNet()
  variables = _init(model)
  image, label = _dataset()
  ref = _reference_cm(inference.logits_apply_fn(model), variables, image, label, SETTINGS)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
  script = tmp_path / "worker.py"
  script.write_text(_TWO_PROCESS_WORKER.format(tests=str(REPO / "tests")))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, str(script), str(i), port], env=env, cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
    line = [l for l in out.splitlines() if l.startswith("RESULT")][0]
    cm, n = json.loads(line[len("RESULT"):])
    np.testing.assert_array_equal(np.asarray(cm), ref)
    assert n == 6


def test_stride_larger_than_crop_is_rejected():
  with pytest.raises(ValueError, match="stride"):
    inference.InferenceSettings(mode="slide", crop_size=(8, 8), stride=(8, 9))


def test_sharded_sliding_window_evaluation_equals_reference():
  model = ToyNet()
  variables = _init(model)
  image, label = _dataset(n=3)
  settings = inference.InferenceSettings(mode="slide", scales=(1.0, 1.5), flip=True,
                                        crop_size=(12, 16), stride=(8, 10))
  ref = _reference_cm(inference.logits_apply_fn(model), variables, image, label, settings)
  ev = evaluate.Evaluator(inference.logits_apply_fn(model), sharding.make_mesh(), num_classes=C,
                          settings=settings)
  cm, n = ev.confusion_matrix(variables, _batches(image, label, 2))
  np.testing.assert_array_equal(cm, ref)
  assert n == 3
