"""Writes tests/official_mem/: the released memory recipe's loss and queue update, run by the released code.

The released memory recipe of tfzhou/ContrastiveSeg (commit 287e5d3, `H_48_D_4_MEM.json`,
`run_h_48_d_4_contrast_mem.sh`) is imported from a checkout and run unmodified; nothing of it is
copied here. CPU shims only: `Tensor.cuda()` is a no-op, and the trainer's imports that have nothing
to do with the queue update (data loader, model/loss managers, visualiser, evaluator, runner,
optimiser) are stub modules, so that `Trainer._dequeue_and_enqueue` can be called on a stand-in
`self` holding the three settings it reads (`memory_size`, `pixel_update_freq`, `network_stride`).

Fixtures (float32, tiny shapes):
  loss.{json,npz}     `PixelContrastLoss.forward(feats, labels, predict, queue)` of
                      lib/loss/loss_contrast_mem.py with the H_48_D_4_MEM contrast settings, its
                      gradient w.r.t. `feats`, and `ContrastCELoss.forward(..., with_embed=True)`.
                      Each kept (image, class) has exactly one pixel predicted right, so the
                      released anchor choice (one easy view when max_views = 1) is deterministic.
  enqueue.{json,npz}  three successive `_dequeue_and_enqueue` calls on queues that start as random
                      unit vectors, at the released `network.stride` 8 and at 4. The pixels it
                      picks come from `torch.randperm`; an observing wrapper records each
                      permutation (`picks_<step>` [B, C, pixel_update_freq], -1 padded), so a
                      reimplementation can be fed the same picks.

  /work/torchvenv/bin/python scripts/make_official_mem_fixtures.py \
      --official_repo=/tmp/ContrastiveSeg --out=tests/official_mem
"""
import argparse
import json
import os
import platform
import sys
import types

import numpy as np

CONFIG = os.path.join("configs", "cityscapes", "H_48_D_4_MEM.json")
# Trainer imports unrelated to `_dequeue_and_enqueue` (they pull in PIL, cv2, ...).
STUBBED = (("lib.datasets.data_loader", "DataLoader"), ("lib.loss.loss_manager", "LossManager"),
           ("lib.models.model_manager", "ModelManager"), ("lib.vis.seg_visualizer", "SegVisualizer"),
           ("segmentor.tools.data_helper", "DataHelper"), ("segmentor.tools.evaluator", "get_evaluator"),
           ("segmentor.tools.module_runner", "ModuleRunner"),
           ("segmentor.tools.optim_scheduler", "OptimScheduler"))


def _released(repo: str):
  """Imports the released modules with the CPU shims; returns (torch, Configer, loss module, Trainer)."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.Tensor.cuda = lambda self, *args, **kwargs: self
  torch.set_num_threads(1)
  for name, attr in STUBBED:
    module = types.ModuleType(name)
    setattr(module, attr, None)
    sys.modules[name] = module
  sys.path.insert(0, os.path.abspath(repo))
  from lib.utils.tools.configer import Configer  # pylint: disable=g-import-not-at-top
  from lib.loss import loss_contrast_mem  # pylint: disable=g-import-not-at-top
  from segmentor.trainer_contrastive import Trainer  # pylint: disable=g-import-not-at-top
  return torch, Configer, loss_contrast_mem, Trainer


def _unit(rng, shape):
  x = rng.standard_normal(shape).astype(np.float32)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _legacy_nearest(label: np.ndarray, size) -> np.ndarray:
  """The released labels' F.interpolate(mode='nearest') for integer factors: every f-th row/col."""
  fy, fx = label.shape[1] // size[0], label.shape[2] // size[1]
  return label[:, ::fy, ::fx]


def _loss_case(torch, configer, module, rng, *, batch, grid, factor, dim, queue_size, classes,
               temperature=None):
  """One loss case: inputs, `PixelContrastLoss` value and grad, `ContrastCELoss` value."""
  if temperature is not None:
    configer.update(["contrast", "temperature"], temperature)
  num_classes = configer.get("data", "num_classes")
  h, w = grid
  # Blocky GT at full size (factor x the embedding grid), some ignore (-1) pixels.
  coarse = rng.choice(np.asarray(classes), size=(batch, h, w)).astype(np.int64)
  coarse[rng.random((batch, h, w)) < 0.1] = -1
  labels = np.repeat(np.repeat(coarse, factor, axis=1), factor, axis=2)
  small = _legacy_nearest(labels, grid)
  # Every pixel predicted wrong but one per (image, class): one easy pixel, the anchor.
  predict = np.where(small >= 0, (small + 1) % num_classes, 0).astype(np.int64)
  for b in range(batch):
    for c in np.unique(small[b]):
      if c < 0:
        continue
      ys, xs = np.nonzero(small[b] == c)
      k = rng.integers(len(ys))
      predict[b, ys[k], xs[k]] = c
  feats = _unit(rng, (batch, h, w, dim)).transpose(0, 3, 1, 2).copy()  # NCHW
  segment_queue = _unit(rng, (num_classes, queue_size, dim))
  pixel_queue = _unit(rng, (num_classes, queue_size, dim))
  # Logits whose argmax is `predict` (ContrastCELoss takes the prediction from them).
  seg = rng.standard_normal((batch, num_classes, h, w)).astype(np.float32)
  seg += 20.0 * np.moveaxis(np.eye(num_classes, dtype=np.float32)[predict], -1, 1)

  criterion = module.PixelContrastLoss(configer=configer)
  x = torch.tensor(feats, requires_grad=True)
  queue = torch.cat((torch.tensor(segment_queue), torch.tensor(pixel_queue)), dim=1)
  loss = criterion(x, torch.tensor(labels), torch.tensor(predict), queue)
  loss.backward()
  combined = module.ContrastCELoss(configer=configer)
  preds = {"seg": torch.tensor(seg), "embed": torch.tensor(feats),
           "segment_queue": torch.tensor(segment_queue), "pixel_queue": torch.tensor(pixel_queue)}
  total = combined(preds, torch.tensor(labels), with_embed=True)
  arrays = {"feats": feats, "labels": labels, "predict": predict, "segment_queue": segment_queue,
            "pixel_queue": pixel_queue, "seg": seg, "loss": np.float32(loss.item()),
            "grad_feats": x.grad.numpy().copy(), "contrast_ce_loss": np.float32(total.item())}
  settings = {k: configer.get("contrast", k) for k in
              ("temperature", "base_temperature", "max_samples", "max_views", "loss_weight")}
  return arrays, {"loss": float(loss.item()), "contrast_ce_loss": float(total.item()),
                  "settings": settings}


def _enqueue_case(torch, trainer_cls, rng, *, batch, size, stride, dim, queue_size,
                  update_freq, classes, steps):
  """Successive `_dequeue_and_enqueue` calls from random unit-vector queues."""
  num_classes = 19
  self = types.SimpleNamespace(memory_size=queue_size, pixel_update_freq=update_freq,
                               network_stride=stride)
  segment_queue = torch.tensor(_unit(rng, (num_classes, queue_size, dim)))
  pixel_queue = torch.tensor(_unit(rng, (num_classes, queue_size, dim)))
  segment_ptr = torch.zeros(num_classes, dtype=torch.long)
  pixel_ptr = torch.zeros(num_classes, dtype=torch.long)
  arrays = {"segment_queue_init": segment_queue.numpy().copy(),
            "pixel_queue_init": pixel_queue.numpy().copy()}
  h, w = size[0] // 4, size[1] // 4  # HRNet keys are at 1/4 of the label size.
  for step in range(steps):
    labels = rng.choice(np.asarray(classes), size=(batch,) + tuple(size)).astype(np.int64)
    # Blocks of 8x8 so that classes have many pixels; a few ignore (-1) blocks.
    labels = np.repeat(np.repeat(labels[:, ::8, ::8], 8, axis=1), 8, axis=2)
    labels[:, :8, :8] = -1
    keys = rng.standard_normal((batch, dim, h, w)).astype(np.float32)
    perms = []
    randperm = torch.randperm

    def recording_randperm(n, *a, **k):
      perm = randperm(n, *a, **k)
      perms.append(perm.numpy().copy())
      return perm

    torch.randperm = recording_randperm
    try:
      trainer_cls._dequeue_and_enqueue(self, torch.tensor(keys), torch.tensor(labels),
                                       segment_queue=segment_queue, segment_queue_ptr=segment_ptr,
                                       pixel_queue=pixel_queue, pixel_queue_ptr=pixel_ptr)
    finally:
      torch.randperm = randperm
    # The released loop: images in order, then torch.unique's ascending classes > 0.
    picks = np.full((batch, num_classes, update_freq), -1, np.int64)
    sliced = labels[:, ::stride, ::stride].reshape(batch, -1)
    calls = iter(perms)
    for b in range(batch):
      for c in np.unique(sliced[b]):
        if c > 0:
          perm = next(calls)
          picks[b, c, :min(len(perm), update_freq)] = perm[:update_freq]
    assert next(calls, None) is None, "randperm calls do not match the released loop"
    arrays[f"picks_{step}"] = picks
    arrays[f"keys_{step}"] = keys
    arrays[f"labels_{step}"] = labels
    arrays[f"segment_queue_{step}"] = segment_queue.numpy().copy()
    arrays[f"segment_ptr_{step}"] = segment_ptr.numpy().copy()
    arrays[f"pixel_queue_{step}"] = pixel_queue.numpy().copy()
    arrays[f"pixel_ptr_{step}"] = pixel_ptr.numpy().copy()
  return arrays


def _write(out, name, arrays, meta):
  np.savez_compressed(os.path.join(out, name + ".npz"), **arrays)
  meta["npz_keys"] = {k: [str(np.asarray(v).dtype), list(np.asarray(v).shape)]
                      for k, v in sorted(arrays.items())}
  with open(os.path.join(out, name + ".json"), "w") as f:
    json.dump(meta, f, indent=1, sort_keys=True)
    f.write("\n")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--official_repo", required=True,
                      help="checkout of tfzhou/ContrastiveSeg at commit 287e5d3")
  parser.add_argument("--out", required=True, help="output folder (tests/official_mem)")
  args = parser.parse_args()
  if not os.path.isfile(os.path.join(args.official_repo, CONFIG)):
    print(f"error: --official_repo={args.official_repo}: no {CONFIG} there; expected a checkout "
          "of tfzhou/ContrastiveSeg", file=sys.stderr)
    sys.exit(2)
  os.makedirs(args.out, exist_ok=True)
  torch, configer_cls, loss_module, trainer_cls = _released(args.official_repo)
  produced_with = {"torch": torch.__version__, "numpy": np.__version__,
                   "python": platform.python_version(), "device": "cpu, 1 thread, float32",
                   "official_commit": "287e5d3069ce6d7a1517ddf98e004c00f23f8f99",
                   "config": CONFIG}

  loss_arrays, cases = {}, []
  specs = (dict(batch=2, grid=(8, 8), factor=4, dim=16, queue_size=6, classes=(0, 1, 2, 5, 7)),
           dict(batch=3, grid=(6, 10), factor=2, dim=32, queue_size=10,
                classes=(0, 1, 3, 4, 8, 11, 18)),
           dict(batch=2, grid=(8, 8), factor=1, dim=16, queue_size=6, classes=(1, 2, 3),
                temperature=0.1))
  for i, spec in enumerate(specs):
    configer = configer_cls(configs=os.path.join(args.official_repo, CONFIG))
    arrays, summary = _loss_case(torch, configer, loss_module, np.random.default_rng(100 + i),
                                 **spec)
    loss_arrays.update({f"case{i}/{k}": v for k, v in arrays.items()})
    cases.append(dict(summary, spec={k: list(v) if isinstance(v, tuple) else v
                                     for k, v in spec.items()}))
  _write(args.out, "loss", loss_arrays, {"produced_with": produced_with, "cases": cases,
                                         "called": "lib/loss/loss_contrast_mem.py "
                                                   "PixelContrastLoss.forward, ContrastCELoss.forward"
                                                   "(with_embed=True)"})

  enqueue_arrays = {}
  common = dict(batch=2, size=(64, 64), dim=8, queue_size=12, update_freq=10,
                classes=(0, 1, 2, 4), steps=3)
  for name, stride in (("stride8", 8), ("stride4", 4)):
    arrays = _enqueue_case(torch, trainer_cls, np.random.default_rng(stride),
                           **dict(common, stride=stride))
    enqueue_arrays.update({f"{name}/{k}": v for k, v in arrays.items()})
  _write(args.out, "enqueue", enqueue_arrays,
         {"produced_with": produced_with,
          "called": "segmentor/trainer_contrastive.py Trainer._dequeue_and_enqueue",
          "settings": {k: v for k, v in common.items() if k != "classes"},
          "cases": {"stride8": {"stride": 8}, "stride4": {"stride": 4}},
          "classes": list(common["classes"])})
  print(f"wrote {args.out}/loss.{{json,npz}} and {args.out}/enqueue.{{json,npz}}")


if __name__ == "__main__":
  main()
