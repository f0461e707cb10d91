"""The config schema: what every key accepts, checked as a whole before anything runs.

`KEYS` maps each dotted key of `configs/common.py:base_config` (and of the data groups of
`data/config_defaults.py`) to a `Rule`: one line per key, built from a few constructors
(`integer`, `number`, `flag`, `one_of`, ...). Names come from the registries and constants of
the modules that use them (models, datasets, contrast choices, eval protocols, label formats),
so a new model or protocol is accepted without touching this file. `CROSS` holds the rules
between keys (classes vs dataset, contrast vs projection head, sources vs scope, mode-specific
keys...). `check_config` raises the first violation as a `validation.ConfigError` (or
`MissingInputError` for a path) whose message names the key, the value and what is accepted:
`config.optim.lr=-0.02: expected a number > 0`.

Every rule carries command-line values it must refuse (`Rule.wrong`, `Cross.wrong`):
tests/test_config_schema.py runs each through `main` and fails for a config key without a rule.
Adding a key to the configs means adding its line to `KEYS`.

The modules keep their own asserts; this schema is what keeps a user's value from reaching them.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
from typing import Any, Callable, Sequence

import ml_collections

from pixcon_jax import inference
from pixcon_jax import losses
from pixcon_jax import models
from pixcon_jax import precision
from pixcon_jax import predict
from pixcon_jax import sharding
from pixcon_jax import train_step
from pixcon_jax import validation
from pixcon_jax.contrast import choices
from pixcon_jax.contrast import official_mem
from pixcon_jax.data import datasets
from pixcon_jax.data import tfds_source
from pixcon_jax.data import transforms
from pixcon_jax.models import conv as conv_lib
from pixcon_jax.models import projection
from pixcon_jax.models import registry

# value -> None when accepted, else what is wrong with it ("expected a positive integer").
Check = Callable[[Any], "str | None"]


@dataclasses.dataclass(frozen=True)
class Rule:
  """What one key accepts.

  Attributes:
    check: value -> None if accepted, else the problem (after `config.key=value: `).
    wrong: command-line values (`--config.<key>=VALUE`) the check refuses: the schema test's
      cases (none for a key whose wrong values only a `Cross` rule sees).
    missing: `check` raises MissingInputError (a path that does not exist), not ConfigError.
  """
  check: Check
  wrong: tuple[str, ...]
  missing: bool = False


@dataclasses.dataclass(frozen=True)
class Cross:
  """A rule between keys: `check(config)` -> None, or (value, problem) of the key it names.

  Attributes:
    key: the key the error line names (the one to change).
    check: config -> None if consistent, else (the key's value, the problem).
    wrong: command-line overrides of configs/demo.py:runlocal that break the rule (the test).
    missing: raise MissingInputError rather than ConfigError.
  """
  key: str
  check: Callable[[ml_collections.ConfigDict], "tuple[Any, str] | None"]
  wrong: tuple[str, ...]
  missing: bool = False


# ---- per-key rule constructors ----------------------------------------------------------------

def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _optional(rule: Rule, optional: bool) -> Rule:
  if not optional:
    return rule
  return dataclasses.replace(rule, check=lambda v: None if v is None else rule.check(v))


def integer(least: int | None = None, *, optional: bool = False) -> Rule:
  """An int >= `least` (bools refused); `optional`: None too (a placeholder left unset)."""
  what = ("a positive integer" if least == 1 else "an integer" if least is None
          else f"an integer >= {least}")
  what += " or None" if optional else ""

  def check(v):
    if not _is_int(v) or (least is not None and v < least):
      return f"expected {what}"
    return None

  return _optional(Rule(check, wrong=(str(least - 1) if least is not None else "0.5",)), optional)


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False, optional: bool = False) -> Rule:
  """A float or int in the interval (`low_open`: low excluded; None: unbounded)."""
  if low is not None and high is not None:
    what = (f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")
  elif low is not None:
    what = f"a number {'>' if low_open else '>='} {low:g}"
  else:
    what = "a number"
  what += " or None" if optional else ""

  def check(v):
    ok = _is_number(v)
    ok = ok and (low is None or (v > low if low_open else v >= low))
    ok = ok and (high is None or (v < high if high_open else v <= high))
    return None if ok else f"expected {what}"

  if low is not None:
    wrong = f"{low:g}" if low_open else f"{low - 0.5:g}"
  elif high is not None:
    wrong = f"{high + 0.5:g}"
  else:
    wrong = "'x'"
  return _optional(Rule(check, wrong=(wrong,)), optional)


def flag() -> Rule:
  """True or False (a command-line value that is neither fails while parsing, naming the key)."""
  return Rule(lambda v: None if isinstance(v, bool) else "expected True or False",
              wrong=("maybe",))


def _near_miss(name: str) -> str:
  """`name` with one letter dropped: the typo the schema test feeds each name key."""
  i = max(1, len(name) // 2)
  return name[:i] + name[i + 1:]


def _one_of_problem(v: Any, names: Sequence[str], optional: bool) -> str:
  shown = ", ".join(names) + (", or None" if optional else "")
  close = difflib.get_close_matches(str(v), list(names), n=1) if isinstance(v, str) else []
  return f"expected one of {shown}" + (f" (did you mean {close[0]!r}?)" if close else "")


def one_of(names: Sequence[str] | Callable[[], Sequence[str]], *, optional: bool = False,
           empty_ok: bool = False) -> Rule:
  """A name among `names` (a sequence, or a function read at check time: a registry).

  `optional`: None (an unset placeholder) is accepted; `empty_ok`: so is ''.
  """
  get = names if callable(names) else (lambda: tuple(names))

  def check(v):
    if (optional and v is None) or (empty_ok and v == "") or (isinstance(v, str) and v in get()):
      return None
    return _one_of_problem(v, list(get()), optional)

  return Rule(check, wrong=(_near_miss(list(get())[0]),))


def pair(*, optional: bool = False) -> Rule:
  """(h, w) of positive ints (a size); `optional`: None too."""
  what = "(h, w) of positive integers" + (" or None" if optional else "")

  def check(v):
    if not (isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v)):
      return f"expected {what}"
    return None

  return _optional(Rule(check, wrong=("(0, 32)",)), optional)


def window() -> Rule:
  """A sliding-window size: None or () (unset), an int or (h, w), positive (`inference._pair`)."""
  def check(v):
    if v is None or v == () or (_is_int(v) and v > 0):
      return None
    if isinstance(v, (tuple, list)) and len(v) in (1, 2) and all(_is_int(x) and x > 0 for x in v):
      return None
    return "expected (h, w) of positive integers, an integer, or None"

  return Rule(check, wrong=("(-8, 8)",))


def interval() -> Rule:
  """(lo, hi) numbers with 0 < lo <= hi (a range to draw factors from)."""
  def check(v):
    if (isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_number(x) for x in v)
        and 0 < v[0] <= v[1]):
      return None
    return "expected (low, high) with 0 < low <= high"

  return Rule(check, wrong=("(2.0, 0.5)",))


def positive_numbers() -> Rule:
  """A non-empty sequence of numbers > 0 (scales)."""
  def check(v):
    if isinstance(v, (tuple, list)) and v and all(_is_number(x) and x > 0 for x in v):
      return None
    return "expected a non-empty sequence of numbers > 0"

  return Rule(check, wrong=("(1.0, -0.5)",))


def subset_of(names: Sequence[str]) -> Rule:
  """A non-empty sequence of distinct names among `names`."""
  def check(v):
    if (isinstance(v, (tuple, list)) and v and len(set(v)) == len(v)
        and all(isinstance(x, str) and x in names for x in v)):
      return None
    return f"expected a non-empty tuple of distinct names among {', '.join(names)}"

  return Rule(check, wrong=(f"('{names[0]}', '{_near_miss(names[-1])}')",))


def text(pattern: str, what: str, wrong: str, *, optional: bool = False) -> Rule:
  """A string matching `pattern` (re.fullmatch), described as `what`; `optional`: None too."""
  def check(v):
    if isinstance(v, str) and re.fullmatch(pattern, v):
      return None
    return f"expected {what}"

  return _optional(Rule(check, wrong=(wrong,)), optional)


def any_text() -> Rule:
  """Any string (checked where it is used: a folder, by a cross rule)."""
  return Rule(lambda v: None if isinstance(v, str) else "expected a string", wrong=())


def existing_path(hint: str) -> Rule:
  """None, '' or a path that exists (local; a `scheme://` URL is left to its file system)."""
  def check(v):
    if v is None or v == "":
      return None
    if not isinstance(v, str):
      return "expected a path"
    if "://" not in v and not os.path.exists(os.path.expanduser(v)):
      return f"no such file or directory{hint}"
    return None

  return Rule(check, wrong=("/nonexistent_pixcon_path",), missing=True)


def mapping() -> Rule:
  """A ConfigDict (its keys are checked by a cross rule)."""
  return Rule(lambda v: None if isinstance(v, (dict, ml_collections.ConfigDict))
              else "expected a ConfigDict", wrong=())


# Named class weights of `objective.class_weights_from_config`.
NAMED_CLASS_WEIGHTS = tuple(sorted(losses.NAMED_CLASS_WEIGHTS))


def class_weights() -> Rule:
  """None, a name of weights ('cityscapes'), or a sequence of numbers >= 0 (one per class)."""
  def check(v):
    if v is None or (isinstance(v, str) and v in NAMED_CLASS_WEIGHTS):
      return None
    if (isinstance(v, (tuple, list)) and v and not isinstance(v, str)
        and all(_is_number(x) and x >= 0 for x in v)):
      return None
    close = (difflib.get_close_matches(v, NAMED_CLASS_WEIGHTS, n=1) if isinstance(v, str)
             else [])
    return (f"expected None, one of {', '.join(NAMED_CLASS_WEIGHTS)}, or a tuple of C numbers "
            f">= 0" + (f" (did you mean {close[0]!r}?)" if close else ""))

  return Rule(check, wrong=("cityscapez", "(1.0, -1.0)"))


# ---- the rules: one line per key ---------------------------------------------------------------

# A TFDS split: names with optional slices, joined by + ('train', 'train[:10%]+validation').
_ONE_SPLIT = r"[A-Za-z0-9_\-]+(\[[^\]]*\])?"
_SPLIT = rf"{_ONE_SPLIT}(\+{_ONE_SPLIT})*"
# A TFDS builder name with an optional config and version ('cityscapes/semantic_segmentation').
_TFDS_NAME = r"[a-z0-9_]+(/[a-z0-9_]+)?(:[0-9.*]+)?"

_INIT_FROM_HINT = (", so no orbax checkpoint to load; give the --out folder of "
                   "scripts/convert_checkpoint.py")

# A key added to configs/common.py or data/config_defaults.py needs its line here
# (tests/test_config_schema.py lists the keys without one).
KEYS: dict[str, Rule] = {
    "mode": one_of(validation.MODES),
    "seed": integer(0),
    "init_from": existing_path(_INIT_FROM_HINT),
    "init_from_scope": one_of(validation.INIT_FROM_SCOPES),
    "init_from_max_mismatch": number(0.0, 1.0),
    "model.name": one_of(models.model_names),
    "model.num_classes": integer(1),
    "model.dtype": one_of(registry.DTYPES),
    "model.matmul_precision": one_of(precision.PRECISIONS, optional=True),
    "model.proj_dim": integer(1),
    "model.proj_type": one_of(projection.PROJ_TYPES),
    "model.conv_impl": one_of(conv_lib.IMPLS),
    "model.overrides": mapping(),
    "data.dataset": one_of(datasets.DATASETS),
    "data.data_dir": existing_path("; give the --data_dir of scripts/prepare_data.py"),
    "data.tfds_name": text(_TFDS_NAME, "a TFDS name such as cityscapes/semantic_segmentation, "
                           "or None", "Cityscapes Semantic", optional=True),
    "data.train_split": text(_SPLIT, "a split name such as train or train[:10%]", "train[:10%"),
    "data.eval_split": text(_SPLIT, "a split name such as validation", "validation]"),
    "data.batch_size": integer(1),
    "data.crop_size": pair(),
    "data.num_train_images": integer(1, optional=True),
    "data.eval_batch_size": integer(1),
    "data.eval_pad_size": pair(optional=True),
    "data.eval_resize": pair(optional=True),
    "data.worker_count": integer(0),
    "data.prefetch": integer(1),
    "data.read_threads": integer(1),
    "data.seed": integer(0),
    "data.unknown_label": one_of(tfds_source.UNKNOWN_LABEL_MODES),
    "data.synthetic_size": pair(),
    "data.synthetic_num_train": integer(1),
    "data.synthetic_num_val": integer(1),
    "data.synthetic_seed": integer(0),
    "augment.scale_range": interval(),
    "augment.aspect_jitter": flag(),
    "augment.aspect_range": interval(),
    "augment.flip": flag(),
    "augment.brightness_shift": integer(0),
    "augment.brightness_prob": number(0.0, 1.0),
    "augment.color_jitter": flag(),
    "augment.color_jitter_strength": number(0.0, 1.0),
    "augment.normalize": one_of(transforms.NORMALIZATIONS),
    "augment.bgr": flag(),
    "augment.pad_image_value": one_of(transforms.PAD_IMAGE_VALUES),
    "optim.lr": number(0.0, low_open=True),
    "optim.momentum": number(0.0, 1.0, high_open=True),
    "optim.nesterov": flag(),
    "optim.weight_decay": number(0.0),
    "optim.weight_decay_on": one_of(train_step.WEIGHT_DECAY_ON),
    "schedule.total_steps": integer(1),
    "schedule.power": number(0.0),
    "schedule.end_lr": number(0.0),
    "loss.class_weights": class_weights(),
    "loss.aux_weight": number(0.0),
    "loss.ohem": flag(),
    "loss.ohem_threshold": number(0.0, 1.0, low_open=True),
    "loss.ohem_min_kept": integer(0),
    "contrast.enabled": flag(),
    "contrast.recipe": one_of(choices.RECIPES),
    "contrast.weight": number(0.0),
    "contrast.warmup_steps": integer(0),
    "contrast.hard_mining_ramp_steps": integer(0),
    "contrast.global_batch": flag(),
    "contrast.temperature": number(0.0, low_open=True),
    "contrast.base_temperature": number(0.0, low_open=True, optional=True),
    "contrast.sources": subset_of(choices.SOURCES),
    "contrast.scope": one_of(choices.SCOPES),
    "contrast.anchor_sampling": one_of(choices.ANCHOR_SAMPLINGS),
    "contrast.anchors_per_class": integer(1),
    "contrast.mining": one_of(choices.MININGS),
    "contrast.num_positives": integer(1),
    "contrast.num_negatives": integer(1),
    "contrast.semi_hard_fraction": number(0.0, 1.0, low_open=True),
    "contrast.semi_hard_at_least_k": flag(),
    "contrast.mining_temperature": number(0.0, low_open=True),
    "contrast.top_k": one_of(choices.TOP_K_IMPLS),
    "contrast.positive_pool": integer(1),
    "contrast.negative_pool": integer(1),
    "contrast.batch_pool_fraction": number(0.0, 1.0),
    "contrast.class_block": integer(1),
    "contrast.remat": flag(),
    "contrast.max_samples": integer(1),
    "contrast.max_views": integer(1),
    "memory.pixels_per_class": integer(1),
    "memory.pixel_queue_size": integer(1, optional=True),
    "memory.region_mode": one_of(choices.REGION_MODES),
    "memory.region_queue_size": integer(0),
    "memory.official_queue_size": integer(1),
    "memory.official_label_stride": integer(1),
    "memory.official_pixel_ptr_step": one_of(official_mem.PTR_STEPS),
    "memory.official_skip_class0": flag(),
    "memory.official_enqueue_images": integer(0),
    "eval.every_steps": integer(1),
    "eval.protocol": one_of(lambda: sorted(inference.PROTOCOLS), optional=True, empty_ok=True),
    "eval.mode": one_of(inference.EVAL_MODES),
    "eval.scales": positive_numbers(),
    "eval.flip": flag(),
    "eval.crop_size": window(),
    "eval.stride": window(),
    "eval.max_batches": integer(1, optional=True),
    "eval.num_summary_images": integer(0),
    "eval.aggregate": one_of(inference.AGGREGATES),
    "eval.split": text(f"({_SPLIT})?", "'' (the dataset's validation split) or a split name",
                       "validation]"),
    "predict.input_dir": any_text(),
    "predict.output_dir": any_text(),
    "predict.label_format": one_of(predict.LABEL_FORMATS),
    "checkpoint.every_steps": integer(1),
    "checkpoint.max_to_keep": integer(1),
    "checkpoint.keep_best": flag(),
    "checkpoint.async_save": flag(),
    "checkpoint.preemption_check_every_steps": integer(1),
    "log.every_steps": integer(1),
    "log.profile": flag(),
    "log.embedding_health": flag(),
    "log.collapse_gap": number(0.0, low_open=True),
    "log.collapse_patience": integer(0),
}


# ---- rules between keys -----------------------------------------------------------------------

def _get(config: ml_collections.ConfigDict, key: str, default: Any = None) -> Any:
  node: Any = config
  for part in key.split("."):
    if not hasattr(node, "get"):
      return default
    node = node.get(part, None)
    if node is None:
      return default
  return node


def _paper_contrast(config) -> bool:
  return bool(_get(config, "contrast.enabled", False)) and (
      _get(config, "contrast.recipe", "paper") == "paper")


def _classes_of_dataset(config):
  info = datasets.get_dataset_info(config.data.dataset)
  if config.model.num_classes != info.num_classes:
    return config.model.num_classes, (f"dataset {config.data.dataset!r} has {info.num_classes} "
                                      f"classes")
  return None


def _projection_head(config):
  name = config.model.name
  if _get(config, "contrast.enabled", False) and not registry.has_projection_head(name):
    with_head = [n for n in models.model_names() if registry.has_projection_head(n)]
    close = difflib.get_close_matches(name + "_contrast", with_head, n=1)
    return True, (f"model {name!r} has no projection head: use a model with one "
                  f"({close[0] if close else ', '.join(with_head)}) or "
                  f"--config.contrast.enabled=False")
  return None


def _overrides_fit_model(config):
  overrides = dict(_get(config, "model.overrides", {}) or {})
  accepted = registry.override_names(config.model.name)
  unknown = sorted(set(overrides) - set(accepted))
  if unknown:
    return overrides, (f"model {config.model.name!r} does not take {unknown}; it takes "
                       f"{', '.join(accepted)}")
  return None


def _intra_scope_batch_only(config):
  sources = tuple(_get(config, "contrast.sources", ()))
  if _paper_contrast(config) and config.contrast.scope == "intra" and sources != ("batch",):
    return "intra", (f"contrasts within the anchor's image only, so config.contrast.sources "
                     f"must be ('batch',), not {sources}")
  return None


def _global_batch_needs_bisect(config):
  c = config.contrast
  if _paper_contrast(config) and c.get("global_batch", True) and c.top_k != "bisect":
    # The global-batch loss selects over candidates spread on all devices: only the bisection
    # counts can be summed over them.
    return c.top_k, ("selects within one device; with config.contrast.global_batch=True use "
                     "top_k='bisect' (the default)")
  return None


def _fifo_needs_queue(config):
  m = config.memory
  if (_paper_contrast(config) and "region_memory" in tuple(config.contrast.sources)
      and m.region_mode == "fifo" and m.region_queue_size < 1):
    return m.region_queue_size, "region_mode='fifo' needs a region queue of at least 1 entry"
  return None


def _slide_needs_window(config):
  e = config.eval
  window_size = inference._pair(e.get("crop_size"))  # pylint: disable=protected-access
  if e.mode == "slide" and not window_size:
    return e.get("crop_size"), "eval.mode='slide' needs a window (h, w)"
  return None


def _stride_within_window(config):
  e = config.eval
  crop = inference._pair(e.get("crop_size"))  # pylint: disable=protected-access
  stride = inference._pair(e.get("stride"))  # pylint: disable=protected-access
  if e.mode == "slide" and crop and stride and any(s > c for s, c in zip(stride, crop)):
    # A stride above the window would leave pixels no window covers.
    return e.get("stride"), f"expected a stride of at most the window {crop}"
  return None


def _eval_image_size(config) -> tuple[int, int] | None:
  """The size of every evaluation image where it is known before reading them."""
  d = config.data
  if d.get("eval_resize"):
    return tuple(d.eval_resize)
  if d.dataset == "synthetic":
    return tuple(d.synthetic_size)
  return None


def _eval_images_fit_padding(config):
  size, pad = _eval_image_size(config), config.data.get("eval_pad_size")
  if size and pad and (pad[0] < size[0] or pad[1] < size[1]):
    return pad, (f"evaluation images are {tuple(size)} (data.eval_resize, or the synthetic "
                 f"scene size): the padding must be at least that")
  return None


def _class_weights_fit(config):
  cw = _get(config, "loss.class_weights")
  n = config.model.num_classes
  if isinstance(cw, str):
    count = len(losses.NAMED_CLASS_WEIGHTS[cw])
    if count != n:
      return cw, f"{cw!r} weights {count} classes, the model has {n}"
  elif cw is not None and len(cw) != n:
    return cw, f"{len(cw)} weights for {n} classes"
  return None


def _predict_input(config):
  if config.mode != "predict":
    return None
  path = config.predict.input_dir
  if not path:
    return path, "mode 'predict' needs a folder of images: --config.predict.input_dir=<folder>"
  if "://" not in path and not os.path.isdir(os.path.expanduser(path)):
    return path, "not a directory; give a folder of PNG/JPEG images"
  return None


def _predict_output(config):
  if config.mode != "predict":
    return None
  path = config.predict.output_dir
  if not path:
    return path, ("mode 'predict' needs a folder for the PNGs: "
                  "--config.predict.output_dir=<folder>")
  # A file in the way would otherwise fail at the first write, after the model ran; its
  # ConfigError names the key and the value itself.
  validation.check_output_dir(path, "config.predict.output_dir")
  return None


# Overrides of configs/demo.py:runlocal for the schema test: an existing folder and a file.
_FOLDER, _FILE = "configs", "configs/demo.py"

CROSS: tuple[Cross, ...] = (
    Cross("model.num_classes", _classes_of_dataset, ("--config.model.num_classes=19",)),
    Cross("contrast.enabled", _projection_head, ("--config.model.name=hrnet_w18",)),
    Cross("model.overrides", _overrides_fit_model, ("--config.model.name=deeplab_v3_contrast",)),
    Cross("contrast.scope", _intra_scope_batch_only, ("--config.contrast.scope=intra",)),
    Cross("contrast.top_k", _global_batch_needs_bisect, ("--config.contrast.top_k=sort",)),
    Cross("memory.region_queue_size", _fifo_needs_queue, ("--config.memory.region_mode=fifo",)),
    Cross("eval.crop_size", _slide_needs_window, ("--config.eval.mode=slide",)),
    Cross("eval.stride", _stride_within_window,
          ("--config.eval.mode=slide", "--config.eval.crop_size=(32, 32)",
           "--config.eval.stride=(48, 32)")),
    Cross("data.eval_pad_size", _eval_images_fit_padding,
          ("--config.data.eval_pad_size=(32, 64)",)),
    Cross("loss.class_weights", _class_weights_fit, ("--config.loss.class_weights=cityscapes",)),
    Cross("predict.input_dir", _predict_input, ("--config.mode=predict",), missing=True),
    Cross("predict.output_dir", _predict_output,
          ("--config.mode=predict", f"--config.predict.input_dir={_FOLDER}",
           f"--config.predict.output_dir={_FILE}/out")),
)


# ---- the check --------------------------------------------------------------------------------

def _message(key: str, value: Any, problem: str) -> str:
  if isinstance(value, list):
    value = tuple(value)
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  return f"config.{key}={value!r}: {problem}"


def leaf_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Dotted keys of `config`'s values; `model.overrides` is one key (a model-specific group)."""
  keys = []
  for name in config.keys():
    value = config[name]
    key = f"{prefix}{name}"
    if isinstance(value, ml_collections.ConfigDict) and key != "model.overrides":
      keys.extend(leaf_keys(value, f"{key}."))
    else:
      keys.append(key)
  return keys


def check_config(config: ml_collections.ConfigDict) -> None:
  """Checks every key with a rule, then the rules between keys; cheap (no JAX work).

  Raises:
    validation.ConfigError (MissingInputError for a path that does not exist) naming the first
    bad key, its value and what it accepts.
  """
  for key, rule in KEYS.items():
    sentinel = object()
    value = _get_or(config, key, sentinel)
    if value is sentinel:
      continue  # A key that this config does not have (an older config file).
    problem = rule.check(value)
    if problem:
      error = validation.MissingInputError if rule.missing else validation.ConfigError
      raise error(_message(key, value, problem))
  for rule in CROSS:
    found = rule.check(config)
    if found:
      error = validation.MissingInputError if rule.missing else validation.ConfigError
      raise error(_message(rule.key, *found))


def _get_or(config: ml_collections.ConfigDict, key: str, default: Any) -> Any:
  node: Any = config
  for part in key.split("."):
    if not hasattr(node, "keys") or part not in node.keys():
      return default
    node = node[part]
  return node


def check_devices(config: ml_collections.ConfigDict, *, num_processes: int,
                  num_devices: int) -> None:
  """The batch sizes against the devices (known once JAX has started, before any compile).

  Raises:
    validation.ConfigError naming `config.data.batch_size` (train) or `data.eval_batch_size`.
  """
  if config.mode == "train":
    try:
      sharding.batch_sizes(config.data.batch_size, num_processes=num_processes,
                           num_devices=num_devices)
    except ValueError as e:
      raise validation.ConfigError(str(e)) from None
  if config.data.eval_batch_size % num_processes:
    raise validation.ConfigError(
        f"config.data.eval_batch_size={config.data.eval_batch_size}: expected a multiple of the "
        f"process count ({num_processes})")
