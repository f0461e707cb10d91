"""Times the train step of the official PyTorch code (tfzhou/ContrastiveSeg) on CPU.

The baseline of `scripts/bench_train.py --official_repo=...`, which runs this script in
a subprocess with a PyTorch interpreter (`--torch_python`), before timing ours on the same
machine. Nothing of the official code is copied here: it is imported from a checkout,
  git clone https://github.com/tfzhou/ContrastiveSeg  (commit 287e5d3)
with two CPU shims (`Tensor.cuda()` is a no-op, `nn.SyncBatchNorm` is `nn.BatchNorm2d`),
the same ones the golden fixtures in tests/golden were produced with.

One step is what the official trainer (`segmentor/trainer_contrastive.py`, distributed
branch) does per iteration: forward `HRNet_W48_CONTRAST`, the loss, backward, SGD step.
  ce        the seg term of `ContrastCELoss` alone: logits upsampled (align_corners) to the
            label size, `FSCELoss` with the Cityscapes class weights of H_48_D_4.json;
  contrast  `ContrastCELoss(..., with_embed=True)`: CE + 0.1 x `PixelContrastLoss` (the
            official recipe after its 5000 warm-up steps).
Prints one JSON line: the median step seconds of each.

  python scripts/bench_official_torch.py --official_repo=/path/to/ContrastiveSeg
"""
import argparse
import json
import os
import statistics
import sys
import time


def _shim_cpu(torch):
  torch.Tensor.cuda = lambda self, *args, **kwargs: self
  torch.nn.SyncBatchNorm = torch.nn.BatchNorm2d


def _fail(message: str) -> None:
  """Bad input: one `error:` line and exit 2, as pixcon_jax.cli.fail (not imported: this runs
  under the PyTorch interpreter, which may lack this project's dependencies)."""
  print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
  sys.exit(2)


def _configer(repo: str, batch: int):
  from lib.utils.tools.configer import Configer  # pylint: disable=g-import-not-at-top
  path = os.path.join(repo, "configs", "cityscapes", "H_48_D_4.json")
  if not os.path.isfile(path):
    _fail(f"--official_repo={repo}: no configs/cityscapes/H_48_D_4.json there; expected a "
             "checkout of tfzhou/ContrastiveSeg")
  configer = Configer(configs=path)
  # The keys that the official run script (run_h_48_d_4_contrast.sh) sets on the command line.
  for keys, value in ((("network", "backbone"), "hrnet48"),
                      (("network", "model_name"), "hrnet_w48_contrast"),
                      (("network", "pretrained"), None),
                      (("network", "resume"), None),
                      (("loss", "loss_type"), "contrast_ce_loss"),
                      (("train", "batch_size"), batch)):
    if configer.exists(*keys):
      configer.update(list(keys), value)
    else:
      configer.add(list(keys), value)
  return configer


def _check_contrast_has_anchors(labels, max_views: int, crop) -> None:
  """Exits with a clear message where the official contrast loss would crash.

  The official `PixelContrastLoss` keeps, per image, the classes with more than `max_views`
  pixels in the label map at the embedding's 1/4 resolution; with none kept it passes None on
  and fails with an AttributeError. Uniform random labels reach that on small crops.
  """
  per_image = [int(row.bincount().max()) for row in labels[:, ::4, ::4].reshape(len(labels), -1)]
  if max(per_image) <= max_views:
    _fail(f"--crop {crop[0]} {crop[1]}: too small for the official contrast loss: the most "
             f"frequent class of the random labels has {max(per_image)} pixels at 1/4 "
             f"resolution, and it needs more than max_views={max_views}; use at least 128 256")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--official_repo", required=True, help="checkout of tfzhou/ContrastiveSeg")
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--steps", type=int, default=3, help="timed steps per variant (median)")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--crop", type=int, nargs=2, default=[256, 512], metavar=("H", "W"))
  p.add_argument("--variants", default="ce,contrast")
  p.error = lambda message: _fail(f"{message}; see --help")
  args = p.parse_args()

  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  _shim_cpu(torch)
  sys.path.insert(0, os.path.abspath(args.official_repo))
  configer = _configer(args.official_repo, args.batch)
  from lib.loss.loss_contrast import ContrastCELoss  # pylint: disable=g-import-not-at-top
  from lib.models.nets.hrnet import HRNet_W48_CONTRAST  # pylint: disable=g-import-not-at-top

  h, w = args.crop
  images = torch.randn(args.batch, 3, h, w)
  labels = torch.randint(0, configer.get("data", "num_classes"), (args.batch, h, w))
  if "contrast" in args.variants.split(","):
    _check_contrast_has_anchors(labels, configer.get("contrast", "max_views"), args.crop)
  model = HRNet_W48_CONTRAST(configer)
  init = {k: v.clone() for k, v in model.state_dict().items()}
  criterion = ContrastCELoss(configer)
  sgd = configer.get("optim", "sgd")

  def ce_only(outputs, target):
    logits = F.interpolate(outputs["seg"], size=target.shape[1:], mode="bilinear",
                           align_corners=True)
    return criterion.seg_criterion(logits, target)

  losses = {"ce": ce_only,
            "contrast": lambda outputs, target: criterion(outputs, target, with_embed=True)}
  out = {"impl": "official_pytorch", "torch": torch.__version__,
         "threads": torch.get_num_threads(), "batch": args.batch, "crop": [h, w]}
  for variant in args.variants.split(","):
    model.load_state_dict(init)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=configer.get("lr", "base_lr"),
                          momentum=sgd["momentum"], weight_decay=sgd["weight_decay"],
                          nesterov=sgd["nesterov"])
    times = []
    for i in range(args.warmup + args.steps):
      t = time.perf_counter()
      loss = losses[variant](model(images, with_embed=variant == "contrast"), labels)
      opt.zero_grad()
      loss.backward()
      opt.step()
      loss = float(loss.detach())
      if i >= args.warmup:
        times.append(time.perf_counter() - t)
    out[variant] = {"step_s": round(statistics.median(times), 4),
                    "step_s_all": [round(t, 4) for t in times], "loss": loss}
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
