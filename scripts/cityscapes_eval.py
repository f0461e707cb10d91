r"""Scores label-id predictions with the Cityscapes benchmark's own pixel-level evaluator.

    python scripts/cityscapes_eval.py --cityscapes_dir=~/cityscapes --predictions=/tmp/pred/label

Runs `cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling` in this process on every
`<cityscapes_dir>/gtFine/<split>/*/*_gtFine_labelIds.png` and the prediction whose name starts
with the same `<city>_<seq>_<frame>` in `--predictions` (what `--config.mode=predict
--config.predict.label_format=label_id` writes). Instance-level scores are off: they need the
`*_instanceIds.png` files and, in cityscapesscripts 2.3.0, a numpy function that numpy 2.4 no
longer has. Prints one JSON line: `miou` (the benchmark's class average), `class_iou`,
`num_images`.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import pathlib
from typing import Any

from absl import app
from absl import flags

from pixcon_jax import cli
from pixcon_jax import validation

_CITYSCAPES_DIR = flags.DEFINE_string(
    "cityscapes_dir", None, "Folder holding gtFine/<split>/<city>/*_gtFine_labelIds.png.")
_PREDICTIONS = flags.DEFINE_string(
    "predictions", None, "Folder of predicted <city>_<seq>_<frame>*_labelIds.png (label ids).")
_SPLIT = flags.DEFINE_string("split", "val", "gtFine split to score (test has no public labels).")


def evaluate(cityscapes_dir: str, predictions: str, split: str = "val") -> dict[str, Any]:
  """The benchmark's pixel-level evaluation of `predictions` against gtFine `split`.

  Returns:
    cityscapesscripts' result dict (`averageScoreClasses`, `classScores` by class name with NaN
    for ignored or absent classes, `confMatrix` [34, 34] over label ids, ...) plus `num_images`.
  Raises:
    validation.MissingInputError (a FileNotFoundError) naming the folder when no ground truth
    or no prediction is found; validation.ConfigError (a ValueError) with cityscapesscripts' own message when it refuses a prediction.
  """
  from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs_eval  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(os.path.expanduser(cityscapes_dir))
  gts = sorted(str(p) for p in root.glob(f"gtFine/{split}/*/*_gtFine_labelIds.png"))
  if not gts:
    raise validation.MissingInputError(f"--cityscapes_dir={cityscapes_dir}: no gtFine/{split}/*/"
                            f"*_gtFine_labelIds.png (extract gtFine_trainvaltest.zip there)")
  pred_dir = os.path.expanduser(predictions)
  if not os.path.isdir(pred_dir):
    raise validation.MissingInputError(f"--predictions={predictions}: not a folder")
  args = copy.copy(cs_eval.args)
  args.predictionPath, args.predictionWalk = pred_dir, None
  args.evalInstLevelScore = False
  args.JSONOutput, args.quiet = False, True
  preds = []
  for gt in gts:
    try:
      preds.append(cs_eval.getPrediction(args, gt))
    except SystemExit:  # cityscapesscripts exits when a prediction is missing
      raise validation.MissingInputError(
          f"--predictions={predictions}: no prediction for {os.path.basename(gt)} (predict every "
          f"image of leftImg8bit/{split} with label_format=label_id into one folder)") from None
  stdout = io.StringIO()
  try:
    with contextlib.redirect_stdout(stdout):  # its error message, then sys.exit(-1)
      result = cs_eval.evaluateImgLists(preds, gts, args)
  except SystemExit:
    said = [line for line in stdout.getvalue().splitlines() if line.strip()]
    raise validation.ConfigError(f"--predictions={predictions}: cityscapesscripts stopped: "
                     f"{said[-1] if said else 'no message'} (expected single-channel label-id "
                     f"PNGs of the ground truth's size)") from None
  result["num_images"] = len(gts)
  return result


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _CITYSCAPES_DIR.value or not _PREDICTIONS.value:
    raise app.UsageError("give --cityscapes_dir and --predictions")
  result = evaluate(_CITYSCAPES_DIR.value, _PREDICTIONS.value, _SPLIT.value)
  print(json.dumps({"miou": result["averageScoreClasses"], "num_images": result["num_images"],
                    "class_iou": result["classScores"]}))


if __name__ == "__main__":
  cli.run(main)
