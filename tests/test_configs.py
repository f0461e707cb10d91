"""Every experiment config loads in all its variants, and its runlocal variant traces a train step."""
import importlib

import pytest


EXPERIMENTS = ("cityscapes_hrnet", "cityscapes_hrnet_ocr", "cityscapes_resnet101_deeplabv3",
               "cityscapes_resnet101_ocr", "pascal_context_hrnet_ocr", "coco_stuff_hrnet_ocr",
               "demo")


def _config(name, arg=None):
  return importlib.import_module(f"configs.{name}").get_config(arg)


@pytest.mark.parametrize("name", EXPERIMENTS)
@pytest.mark.parametrize("arg", [None, "runlocal", "official", "official,runlocal", "bf16",
                                 "official_mem", "official_mem,runlocal"])
def test_config_variants_load(name, arg):
  c = _config(name, arg)
  for group in ("model", "data", "augment", "optim", "schedule", "loss", "contrast", "memory",
                "eval", "checkpoint", "log"):
    assert group in c, group
  assert c.optim.momentum == 0.9 and c.optim.weight_decay == 5e-4 and c.schedule.power == 0.9
  words = set((arg or "").split(","))
  if "official" in words:
    assert c.contrast.recipe == "official" and c.contrast.weight == 0.1
    assert c.augment.bgr
    assert c.contrast.warmup_steps == 5000
  elif "official_mem" in words:
    # H_48_D_4_MEM.json: lambda 1 after 5000 steps, tau = base tau = 0.07, one view per class.
    assert c.contrast.recipe == "official_mem" and c.contrast.weight == 1.0
    assert c.contrast.warmup_steps == 5000 and c.augment.bgr and not c.contrast.global_batch
    assert (c.contrast.temperature, c.contrast.base_temperature) == (0.07, 0.07)
    assert (c.contrast.max_samples, c.contrast.max_views, c.memory.pixels_per_class) == (1024, 1, 10)
    # demo.py:runlocal keeps its own model and sizes (it drops the word before finalize).
    small = "runlocal" in words and name != "demo"
    assert c.memory.official_queue_size == (64 if small else 5000)
    assert (c.memory.official_label_stride, c.memory.official_pixel_ptr_step,
            c.memory.official_skip_class0, c.memory.official_enqueue_images) == (8, "one", True, 2)
  else:
    assert c.contrast.recipe == "paper" and c.contrast.weight == 1.0
    assert c.contrast.warmup_steps == 0 and c.contrast.temperature == 0.1
  if arg and "bf16" in arg:
    assert c.model.dtype == "bfloat16"


def test_paper_defaults_of_the_main_configs():
  c = _config("cityscapes_hrnet")
  assert (c.data.batch_size, tuple(c.data.crop_size), c.optim.lr) == (8, (512, 1024), 0.01)
  # Random pos./neg. sampling: the paper's semi-hard mining collapses the embedding from scratch
  # (docs/ABLATIONS.md, "Departures"); semi_hard is one override away.
  assert c.contrast.mining == "random" and c.contrast.anchor_sampling == "seg_aware_hard"
  assert c.contrast.hard_mining_ramp_steps == 0
  # The contrast set is the memory M (Sec. 3.2: "from the memory bank M").
  assert tuple(c.contrast.sources) == ("pixel_memory", "region_memory")
  assert (c.contrast.num_positives, c.contrast.num_negatives) == (1024, 2048)
  assert c.memory.pixels_per_class == 10 and c.memory.pixel_queue_size is None  # T = 10 N.
  p = _config("pascal_context_hrnet_ocr")
  assert (p.data.batch_size, tuple(p.data.crop_size), p.optim.lr, p.schedule.total_steps) == (
      16, (520, 520), 0.001, 60_000)


def test_unknown_arg_is_rejected():
  with pytest.raises(ValueError, match="unknown config arg"):
    _config("cityscapes_hrnet", "runlokal")
  with pytest.raises(ValueError, match="two recipes"):
    _config("cityscapes_hrnet", "official,official_mem")


def test_ablation_keys_reach_the_contrast_settings():
  from pixcon_jax import objective  # pylint: disable=g-import-not-at-top
  c = _config("cityscapes_hrnet")
  c.contrast.mining = "hardest"
  c.contrast.anchor_sampling = "random"
  c.contrast.scope = "intra"
  c.contrast.sources = ("batch",)
  s = objective.contrast_settings(c, num_classes=19)
  assert (s.mining, s.anchor_sampling, s.scope, s.sources) == ("hardest", "random", "intra",
                                                                ("batch",))
  assert not objective.uses_memory(c)


def test_batch_size_not_divisible_names_the_config_key():
  from pixcon_jax import sharding  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r"config\.data\.batch_size=6"):
    sharding.batch_sizes(6, num_processes=2, num_devices=4)
  assert sharding.batch_sizes(8, num_processes=2, num_devices=4) == (4, 2)


@pytest.mark.parametrize("name,arg", [(n, "runlocal") for n in EXPERIMENTS[:-1]] +
                         [("cityscapes_hrnet", "runlocal,official,bf16"),
                          ("cityscapes_hrnet", "runlocal,official_mem")])
def test_runlocal_train_step_traces(name, arg):
  """Builds model, state and the sharded step of each runlocal variant and lowers it (no compile)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from pixcon_jax import setup, sharding  # pylint: disable=g-import-not-at-top
  from pixcon_jax import train_step as ts  # pylint: disable=g-import-not-at-top
  c = _config(name, arg)
  c.data.batch_size = jax.device_count()
  exp = setup.for_training(c)
  state = ts.abstract_train_state(
      c, exp.train_model, exp.tx, exp.mesh, image_shape=tuple(c.data.crop_size) + (3,),
      num_classes=c.model.num_classes, num_train_images=8)
  b = c.data.batch_size
  h, w = c.data.crop_size
  data = sharding.data_sharded(exp.mesh)
  batch = {"image": jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32, sharding=data),
           "label": jax.ShapeDtypeStruct((b, h, w), jnp.int32, sharding=data),
           "image_id": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=data)}
  step = ts.make_train_step(c, exp.train_model, exp.tx, exp.mesh)
  lowered = step.lower(state, batch)
  out_state, metrics = lowered.out_info
  assert "contrast_loss" in metrics and "ce_loss" in metrics
  if "ocr" in name or "deeplab" in name:
    assert "aux_ce_loss" in metrics


def test_conv_impl_is_a_config_key_and_a_bad_value_names_it():
  from pixcon_jax import setup  # pylint: disable=g-import-not-at-top
  c = _config("demo", "runlocal")
  assert c.model.conv_impl == "auto"
  c.model.conv_impl = "matmul"  # Not the native op even for the runlocal model's tiny convs.
  assert setup.build_model(c, train=True).conv.keywords["conv_fn"].impl == "matmul"
  c.model.conv_impl = "fft"
  with pytest.raises(ValueError, match=r"config\.model\.conv_impl='fft'"):
    setup.build_model(c, train=False)


# A value that parses as each overridable field type (`--config.a.b=VALUE`).
_SAMPLE_VALUE = {int: "3", float: "0.5", bool: "false", str: "x", tuple: "(1, 2)", object: "None"}


def _leaf_paths(c, prefix=""):
  """Dotted paths of every non-ConfigDict value of `c` (placeholders included)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  for key in c.keys():
    value = c[key]
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaf_paths(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


@pytest.mark.parametrize("name", EXPERIMENTS)
@pytest.mark.parametrize("arg", [None, "runlocal", "official", "official_mem"])
def test_every_config_key_can_be_set_from_the_command_line(name, arg, parse_config_flags):
  # A key whose default is a plain None has no type, and config_flags refuses to override it
  # ("Type <class 'NoneType'> of field config.data.data_dir is not supported").
  c = _config(name, arg)
  spec = f"configs/{name}.py" + (f":{arg}" if arg else "")
  types = {path: _holder(c, path).get_type(path.rsplit(".", 1)[-1]) for path in _leaf_paths(c)}
  untyped = sorted(path for path, t in types.items() if t is type(None))
  assert not untyped, f"{spec}: keys with a plain None default: {untyped}"
  args = {path: _SAMPLE_VALUE.get(t, "x") for path, t in types.items()}
  overridden = parse_config_flags([f"--config={spec}"] +
                                  [f"--config.{path}={value}" for path, value in args.items()])
  parsed = {"3": 3, "0.5": 0.5, "false": False, "x": "x", "(1, 2)": (1, 2), "None": None}
  for path, value in args.items():
    got = _holder(overridden, path)[path.rsplit(".", 1)[-1]]
    assert got == parsed[value], (path, got, parsed[value])


def _holder(c, path):
  """The ConfigDict that holds the last component of a dotted `path`."""
  for group in path.split(".")[:-1]:
    c = c[group]
  return c
