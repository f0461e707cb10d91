"""Parity runners of the loss and op golden fixtures.

See the golden README, "How to use the loss and op fixtures".

Each runner takes the fixture's JSON path (its npz sits beside it) and returns
one row per compared quantity: `case`, `max_abs_diff`, `tolerance`, `ok`.
Golden arrays are NCHW with -1 = ignore; ours are NHWC with 255 = ignore.
Tolerances: scalar losses `1e-5 * max(1, |ref|)`, bilinear resize atol 1e-5,
label downsampling and anchor decisions exact (tolerance 0).
"""
from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pixcon_jax import losses
from pixcon_jax.contrast import official
from pixcon_jax.contrast.labels import downsample_labels
from pixcon_jax.models.layers import resize_bilinear

IGNORE = 255


def _load(path: pathlib.Path) -> tuple[dict, Any]:
  meta = json.loads(path.read_text())
  npz = path.with_suffix(".npz")
  return meta, (np.load(npz) if npz.is_file() else None)


def _label(x: np.ndarray) -> np.ndarray:
  """Golden int64 label (-1 = ignore) -> our int32 (255 = ignore)."""
  x = np.asarray(x)
  return np.where(x == -1, IGNORE, x).astype(np.int32)


def _nhwc(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))


def _scalar_row(case: str, ours, ref: float) -> dict:
  ours, ref = float(ours), float(ref)
  diff = abs(ours - ref)
  tol = 1e-5 * max(1.0, abs(ref))
  return {"case": case, "ours": ours, "ref": ref, "max_abs_diff": diff, "tolerance": tol,
          "ok": bool(np.isfinite(ours) and diff <= tol)}


def _exact_row(case: str, ours, ref) -> dict:
  """Exact comparison of integer decisions; max_abs_diff is the count of differing entries."""
  same = ours == ref
  if isinstance(ours, np.ndarray) or isinstance(ref, np.ndarray):
    ours, ref = np.asarray(ours), np.asarray(ref)
    same = ours.shape == ref.shape and bool(np.all(ours == ref))
    diff = 0 if same else (int(np.sum(ours != ref)) if ours.shape == ref.shape else -1)
  else:
    diff = 0 if same else 1
  row = {"case": case, "max_abs_diff": diff, "tolerance": 0, "ok": bool(same)}
  if not same:
    row.update(ours=_jsonable(ours), ref=_jsonable(ref))
  return row


def _jsonable(x):
  return x.tolist() if isinstance(x, np.ndarray) else x


def run_contrastive_core(path: pathlib.Path) -> list[dict]:
  """`_contrastive(x_i, y_i)` of every case vs `loss_i`."""
  meta, ref = _load(path)
  core = jax.jit(functools.partial(official.official_contrastive_core,
                                   temperature=meta["temperature"],
                                   base_temperature=meta["base_temperature"]))
  rows = []
  for case in meta["cases"]:
    x, y = ref[case["x"]], ref[case["y"]].astype(np.int32)
    loss, metrics = core(jnp.asarray(x), jnp.asarray(y))
    name = f"{meta['name']}/{case['loss']}(A={case['A']},V={case['V']},D={case['D']})"
    rows.append(_scalar_row(name, loss, ref[case["loss"]]))
    rows[-1]["num_rows"] = int(metrics["num_rows"])
  return rows


def _decisions(sample: official.AnchorSample, batch: int) -> dict:
  """AnchorSample -> the golden `expected` format."""
  s = jax.tree_util.tree_map(np.asarray, sample)
  n = int(s.num_anchors)
  anchors = [{"image": int(s.image[a]), "class": int(s.cls[a]), "num_hard": int(s.num_hard[a]),
              "num_easy": int(s.num_easy[a]), "hard_kept": int(s.hard_kept[a]),
              "easy_kept": int(s.easy_kept[a])} for a in range(n)]
  return {"returns_none": n == 0,
          "classes_kept": [[a["class"] for a in anchors if a["image"] == b] for b in range(batch)],
          "total_classes": n, "n_view": int(s.n_view) if n else None, "anchors": anchors}


def _compare_decisions(prefix: str, ours: dict, expected: dict) -> list[dict]:
  rows = [_exact_row(f"{prefix}/{key}", ours[key], expected[key])
          for key in ("returns_none", "classes_kept", "total_classes", "n_view")]
  fields = ("image", "class", "num_hard", "num_easy", "hard_kept", "easy_kept")
  ours_a = np.array([[a[f] for f in fields] for a in ours["anchors"]], np.int64).reshape(-1, 6)
  ref_a = np.array([[a[f] for f in fields] for a in expected["anchors"]], np.int64).reshape(-1, 6)
  rows.append(_exact_row(f"{prefix}/anchors", ours_a, ref_a))
  return rows


def _check_views(prefix: str, sample: official.AnchorSample, label: np.ndarray,
                 predict: np.ndarray) -> dict:
  """The sampled views are distinct pixels of the right class, hard ones first."""
  s = jax.tree_util.tree_map(np.asarray, sample)
  lab = label.reshape(label.shape[0], -1)
  pred = predict.reshape(predict.shape[0], -1)
  bad = 0
  for a in range(int(s.num_anchors)):
    pix = s.pixel[a][s.view_mask[a]]
    b, c, hk = s.image[a], s.cls[a], s.hard_kept[a]
    bad += int(len(pix) != int(s.n_view) or len(set(pix.tolist())) != len(pix))
    bad += int(np.sum(lab[b, pix] != c))
    bad += int(np.sum(pred[b, pix[:hk]] == c) + np.sum(pred[b, pix[hk:]] != c))
  bad += int(np.sum(s.view_mask[~s.valid]))
  return {"case": f"{prefix}/views_consistent", "max_abs_diff": bad, "tolerance": 0,
          "ok": bad == 0}


@functools.lru_cache(maxsize=None)
def _jitted_sampling(num_classes: int, max_samples: int, max_views: int, ignore_label: int):
  """One compiled sampler per static setting (cases sharing settings reuse it)."""
  return jax.jit(functools.partial(official.official_anchor_sampling, num_classes=num_classes,
                                   max_samples=max_samples, max_views=max_views,
                                   ignore_label=ignore_label))


def run_anchor_sampling(path: pathlib.Path) -> list[dict]:
  """Kept classes, n_view and per-anchor hard/easy counts, exactly."""
  meta, _ = _load(path)
  rows = []
  for i, case in enumerate(meta["cases"]):
    label = _label(np.asarray(case["labels"]))
    predict = np.asarray(case["predict"], np.int32)
    ignore = case["ignore_label"]
    sample_fn = _jitted_sampling(19, case["max_samples"], case["max_views"],
                                 IGNORE if ignore == -1 else ignore)
    sample = sample_fn(jnp.asarray(label), jnp.asarray(predict), jax.random.key(i))
    prefix = f"{meta['name']}/{case['name']}"
    rows += _compare_decisions(prefix, _decisions(sample, label.shape[0]), case["expected"])
    rows.append(_check_views(prefix, sample, label, predict))
  return rows


def run_contrast_loss_e2e(path: pathlib.Path) -> list[dict]:
  """`PixelContrastLoss`, `ContrastCELoss` (+/- embed) and `ContrastAuxCELoss` on one batch."""
  meta, ref = _load(path)
  c = meta["contrast"]
  settings = dict(temperature=c["temperature"], base_temperature=c["base_temperature"],
                  max_samples=c["max_samples"], max_views=c["max_views"])
  common = dict(loss_weight=c["loss_weight"], class_weights=losses.CITYSCAPES_CLASS_WEIGHTS,
                **settings)
  seg, seg_aux, embed = (jnp.asarray(_nhwc(ref[k])) for k in ("seg", "seg_aux", "embed"))
  target = jnp.asarray(_label(ref["target"]))
  num_classes = seg.shape[-1]

  @jax.jit
  def all_losses(seg, seg_aux, embed, target, rng):
    # One compiled program for the four scalars and the anchor decisions.
    predict = jnp.argmax(seg, axis=-1)
    pcl, _ = official.official_contrast_loss(embed, target, predict, rng,
                                             num_classes=num_classes, **settings)
    ce, _ = official.contrast_ce_loss(seg, embed, target, rng, with_embed=True, **common)
    warmup, _ = official.contrast_ce_loss(seg, embed, target, rng, with_embed=False, **common)
    aux, _ = official.contrast_aux_ce_loss(
        seg, seg_aux, embed, target, rng, with_embed=True,
        seg_weight=meta["loss_weights"]["seg_loss"], aux_weight=meta["loss_weights"]["aux_loss"],
        **common)
    small = downsample_labels(target, embed.shape[1:3])
    sample = official.official_anchor_sampling(small, predict, rng, num_classes=num_classes,
                                               max_samples=c["max_samples"],
                                               max_views=c["max_views"])
    return (pcl, ce, warmup, aux), sample

  name = meta["name"]
  keys = ("pixel_contrast_loss", "contrast_ce_loss", "contrast_ce_loss_warmup",
          "contrast_auxce_loss")
  rows = []
  # The embedding is constant per (image, class, hard/easy) group, so any pixel pick must give
  # the reference: check two sampling keys.
  for seed in (0, 1):
    scalars, sample = all_losses(seg, seg_aux, embed, target, jax.random.key(seed))
    rows += [_scalar_row(f"{name}/{k}[rng={seed}]", v, ref[k]) for k, v in zip(keys, scalars)]
  rows += _compare_decisions(f"{name}/anchor_decisions", _decisions(sample, seg.shape[0]),
                             meta["anchor_decisions"])
  return rows


def run_ce_weighted(path: pathlib.Path) -> list[dict]:
  """`FSCELoss` with the Cityscapes weights, at logit size and after bilinear upsampling."""
  meta, ref = _load(path)
  weights = np.asarray(meta["ce_weight"], np.float32)
  rows = [_exact_row(f"{meta['name']}/ce_weight_constant",
                     np.asarray(losses.CITYSCAPES_CLASS_WEIGHTS, np.float32), weights)]
  ce = jax.jit(functools.partial(losses.cross_entropy, class_weights=weights, ignore_label=IGNORE))
  logits = jnp.asarray(_nhwc(ref["logits"]))
  for key, label in (("loss_same_size", ref["labels"]), ("loss_upsampled", ref["labels_full"])):
    loss, _ = ce(logits, jnp.asarray(_label(label)))
    rows.append(_scalar_row(f"{meta['name']}/{key}", loss, ref[key]))
  return rows


def run_resize_ops(path: pathlib.Path) -> list[dict]:
  """Bilinear align_corners resize (atol 1e-5) and legacy-nearest label downsampling (exact)."""
  meta, ref = _load(path)
  rows = []
  x = jnp.asarray(_nhwc(ref["bilinear_in"]))
  for key, size in meta["bilinear_sizes"].items():
    ours = np.transpose(np.asarray(resize_bilinear(x, size)), (0, 3, 1, 2))
    diff = float(np.max(np.abs(ours - ref[key])))
    rows.append({"case": f"{meta['name']}/{key}", "max_abs_diff": diff, "tolerance": 1e-5,
                 "ok": bool(ours.shape == ref[key].shape and diff <= 1e-5)})
  for key, spec in meta["nearest_sizes"].items():
    # Labels pass through unchanged (the -1 ignore id included), so no id mapping is needed.
    ours = np.asarray(downsample_labels(jnp.asarray(ref[spec["input"]][:, 0]), spec["size"]))
    rows.append(_exact_row(f"{meta['name']}/{key}", ours, ref[key][:, 0]))
  return rows
