r"""Ablations of the paper (Tables 1-3, and a `mining` table beyond the paper) as config
overrides: train each variant, collect mIoU.

    python scripts/ablate.py --config=configs/demo.py --table=table2 --steps=300 \
        --workdir=/tmp/ablate [--seeds=0,1,2] [--config.some.key=value ...]

Every variant is the given config plus the overrides listed in `VARIANTS` (one config
argument each, two for Table 1's intra-image row (in-batch only) and the Table 3 cells that
change both anchor and pos/neg sampling, and the mining table's hardness-weighted rows),
trained for `--steps` steps into `<workdir>/<variant>` with
`pixcon_jax.train.train_and_evaluate` (so an interrupted ablation resumes per variant),
and evaluated with the config's `eval` protocol at the end. Variants whose resulting
config is identical (the full method appears in all three tables, the baseline in all
three) are trained once. The table is printed as markdown and JSON and written to
`<workdir>/ablation_<table>.{md,json}`; the paper's Cityscapes val numbers (HRNetV2-W48,
40K iterations) are listed beside ours for reference, not for comparison of values: a
few hundred steps on the demo data only show the direction of each change.

With `--seeds=0,1,2` every variant trains once per seed k (`config.seed`: initialisation and
contrast sampling; `config.data.seed`: data order and augmentation; the dataset itself is
unchanged) into `<workdir>/<variant>/seed<k>`, and each row reports the mean and the sample
standard deviation (n - 1) of the final mIoU over the seeds, with n and the per-seed values.
Without `--seeds` each variant trains once with the config's seeds in `<workdir>/<variant>`.

See docs/ABLATIONS.md for the table of variants and the exact overrides.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from pixcon_jax import cli
from pixcon_jax import config_schema

BASELINE = ("baseline", "Baseline (w/o contrast)", {"contrast.enabled": False}, 78.1)

# table -> [(variant id, paper row name, overrides, paper Cityscapes val mIoU or None)].
VARIANTS: dict[str, list[tuple[str, str, dict[str, Any], float | None]]] = {
    "table1": [
        BASELINE,
        # Intra-image contrast has no memory: the anchor's own image is its only source.
        ("intra_image", "Intra-Image Contrast",
         {"contrast.scope": "intra", "contrast.sources": ("batch",)}, 78.9),
        ("inter_image", "Inter-Image Contrast", {"contrast.scope": "inter"}, 81.0),
    ],
    "table2": [
        BASELINE,
        ("mini_batch", "Mini-Batch (w/o memory)", {"contrast.sources": ("batch",)}, 79.8),
        # With a memory, the contrast set is the memory (Sec. 3.2: "from the memory bank M").
        ("pixel_memory", "Pixel Memory", {"contrast.sources": ("pixel_memory",)}, 80.5),
        ("region_memory", "Region Memory", {"contrast.sources": ("region_memory",)}, 80.2),
        ("pixel_region_memory", "Pixel + Region Memory",
         {"contrast.sources": ("pixel_memory", "region_memory")}, 81.0),
    ],
    "table3": [
        BASELINE,
        ("random_random", "Random / Random",
         {"contrast.anchor_sampling": "random", "contrast.mining": "random"}, 79.3),
        ("random_hardest", "Random / Hardest",
         {"contrast.anchor_sampling": "random", "contrast.mining": "hardest"}, 79.4),
        ("random_semi_hard", "Random / Semi-Hard",
         {"contrast.anchor_sampling": "random", "contrast.mining": "semi_hard"}, 80.1),
        ("seg_aware_random", "Seg.-aware hard / Random",
         {"contrast.anchor_sampling": "seg_aware_hard", "contrast.mining": "random"}, 80.2),
        ("seg_aware_hardest", "Seg.-aware hard / Hardest",
         {"contrast.anchor_sampling": "seg_aware_hard", "contrast.mining": "hardest"}, 80.5),
        ("seg_aware_semi_hard", "Seg.-aware hard / Semi-Hard",
         {"contrast.anchor_sampling": "seg_aware_hard", "contrast.mining": "semi_hard"}, 81.0),
    ],
    # Beyond the paper: hard mining without a top-k cut (docs/ABLATIONS.md, "Hard mining that
    # does not collapse"), against the default random mining and the paper's semi-hard.
    "mining": [
        ("random", "Random (default)", {"contrast.mining": "random"}, None),
        ("semi_hard", "Semi-Hard (paper)", {"contrast.mining": "semi_hard"}, 81.0),
        ("hardness_weighted_t0.2", "Hardness-weighted, T = 0.2",
         {"contrast.mining": "hardness_weighted", "contrast.mining_temperature": 0.2}, None),
        ("hardness_weighted_t0.5", "Hardness-weighted, T = 0.5",
         {"contrast.mining": "hardness_weighted", "contrast.mining_temperature": 0.5}, None),
        ("hardness_weighted_t0.1", "Hardness-weighted, T = 0.1",
         {"contrast.mining": "hardness_weighted", "contrast.mining_temperature": 0.1}, None),
    ],
}
TABLES = tuple(VARIANTS)


@dataclasses.dataclass
class Result:
  table: str
  variant: str
  paper_row: str
  overrides: dict[str, Any]
  paper_miou: float | None  # None: a row beyond the paper.
  miou: float | None = None
  pixel_accuracy: float | None = None
  steps: int = 0
  seconds: float = 0.0
  workdir: str = ""
  reused_from: str | None = None
  # One entry per training run (one per seed with --seeds); `miou` is their mean.
  seeds: list[int] = dataclasses.field(default_factory=list)
  per_seed_miou: list[float | None] = dataclasses.field(default_factory=list)
  per_seed_pixel_accuracy: list[float | None] = dataclasses.field(default_factory=list)
  per_seed_workdir: list[str] = dataclasses.field(default_factory=list)
  miou_mean: float | None = None
  miou_std: float | None = None  # Sample standard deviation (n - 1); None for n < 2.
  n: int = 0  # Runs that finished (an interrupted run has no mIoU).


def apply_overrides(config: Any, overrides: dict[str, Any]) -> Any:
  """A copy of `config` with dotted-key overrides; an unknown key is an error naming it."""
  config = copy.deepcopy(config)
  for key, value in overrides.items():
    *groups, leaf = key.split(".")
    node = config
    for g in groups:
      if g not in node:
        raise KeyError(f"ablation override {key!r}: config has no group {g!r}")
      node = node[g]
    if leaf not in node:
      raise KeyError(f"ablation override {key!r}: config.{'.'.join(groups)} has no key {leaf!r}")
    node[leaf] = value
  return config


def variants_of(table: str) -> list[tuple[str, tuple[str, str, dict[str, Any], float]]]:
  """[(table, variant)] for a table name or 'all' (tables in order)."""
  if table == "all":
    return [(t, v) for t in TABLES for v in VARIANTS[t]]
  if table not in VARIANTS:
    raise ValueError(f"--table must be one of {TABLES + ('all',)}, got {table!r}")
  return [(table, v) for v in VARIANTS[table]]


def _fingerprint(config: Any) -> str:
  return json.dumps(config.to_dict(), sort_keys=True, default=str)


def seeded(config: Any, seed: int) -> Any:
  """A copy of `config` with seed `seed` for the model init and contrast sampling (`seed`) and
  for the data order and augmentation (`data.seed`); the dataset itself stays the same."""
  return apply_overrides(config, {"seed": int(seed), "data.seed": int(seed)})


def seed_statistics(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
  """(mean, sample standard deviation with n - 1, n) of the finished runs' values (None skipped)."""
  done = [float(v) for v in values if v is not None]
  if not done:
    return None, None, 0
  std = statistics.stdev(done) if len(done) > 1 else None
  return statistics.fmean(done), std, len(done)


def parse_seeds(values: Sequence[str] | None) -> list[int] | None:
  """`--seeds` ('0,1,2' as absl's list) -> [0, 1, 2]; None without the flag."""
  if not values:
    return None
  try:
    seeds = [int(v) for v in values]
  except ValueError:
    raise ValueError(f"--seeds must be comma-separated integers, got {','.join(values)!r}") from None
  if len(set(seeds)) != len(seeds):
    raise ValueError(f"--seeds has a repeated seed: {','.join(values)!r}")
  return seeds


def run_ablation(config: Any, table: str, steps: int, workdir: str, *,
                 only: Sequence[str] | None = None,
                 seeds: Sequence[int] | None = None) -> list[Result]:
  """Trains every variant of `table` for `steps` steps and returns their final metrics.

  Args:
    config: the base experiment config (e.g. configs/demo.py or configs/cityscapes_hrnet.py).
    table: 'table1' | 'table2' | 'table3' | 'mining' | 'all'.
    steps: training steps per variant (sets schedule.total_steps; evaluation at the end).
    workdir: parent directory; variant v trains in `<workdir>/<v>`, or with `seeds` once per
      seed k in `<workdir>/<v>/seed<k>`.
    only: optional subset of variant ids.
    seeds: optional seeds; each variant trains once per seed (see `seeded`) and its `miou` is
      the mean over the seeds (`miou_std`, `n`, `per_seed_miou` beside it).
  """
  from pixcon_jax import train  # pylint: disable=g-import-not-at-top
  results: list[Result] = []
  done: dict[str, Result] = {}
  for tab, (name, row, overrides, paper) in variants_of(table):
    if only and name not in only:
      continue
    cfg = apply_overrides(config, overrides)
    cfg = apply_overrides(cfg, {"schedule.total_steps": int(steps)})
    # Evaluate once, at the end: the ablation compares final mIoU.
    if int(cfg.eval.every_steps) < steps:
      cfg.eval.every_steps = int(steps)
    result = Result(table=tab, variant=name, paper_row=row, overrides=dict(overrides),
                    paper_miou=paper, steps=int(steps))
    config_schema.check_config(cfg)  # A variant's overrides meet the schema like main's config.
    key = _fingerprint(cfg)
    if key in done:  # Same resulting config as an earlier variant (e.g. the full method).
      prev = done[key]
      copied = dataclasses.replace(prev, table=tab, variant=name, paper_row=row,
                                   overrides=dict(overrides), paper_miou=paper,
                                   reused_from=prev.variant, seconds=0.0)
      results.append(copied)
      continue
    result.workdir = os.path.join(workdir, name)
    runs = ([(int(cfg.get("seed", 0)), cfg, result.workdir)] if seeds is None else
            [(k, seeded(cfg, k), os.path.join(result.workdir, f"seed{k}")) for k in seeds])
    for seed, run_cfg, run_dir in runs:
      logging.info("ablation %s/%s (seed %d): %s -> %s", tab, name, seed, overrides, run_dir)
      t0 = time.time()
      metrics = train.train_and_evaluate(run_cfg, run_dir)
      result.seconds += time.time() - t0
      result.seeds.append(seed)
      result.per_seed_workdir.append(run_dir)
      result.per_seed_miou.append(float(metrics["miou"]) if metrics else None)
      result.per_seed_pixel_accuracy.append(
          float(metrics["pixel_accuracy"]) if metrics else None)
    result.miou_mean, result.miou_std, result.n = seed_statistics(result.per_seed_miou)
    result.miou = result.miou_mean
    result.pixel_accuracy = seed_statistics(result.per_seed_pixel_accuracy)[0]
    done[key] = result
    results.append(result)
  return results


def _fmt_overrides(overrides: dict[str, Any]) -> str:
  return ", ".join(f"`--config.{k}={_cli_value(v)}`" for k, v in overrides.items())


def _cli_value(v: Any) -> str:
  """`v` as a shell word that config_flags parses back to `v` (tuples double-quoted: an
  unquoted `(` is a shell syntax error)."""
  if isinstance(v, tuple):
    return '"(' + ",".join(f"'{x}'" for x in v) + ("," if len(v) == 1 else "") + ')"'
  if isinstance(v, str):
    return f"'{v}'"
  return str(v)


def _fmt_miou(r: Result) -> str:
  """'45.4' for one run, '45.4 ± 1.2 (n=3)' over seeds (sample std), '—' if none finished."""
  if r.miou is None:
    return "—"
  text = f"{100 * r.miou:.1f}"
  if r.miou_std is not None:
    text += f" ± {100 * r.miou_std:.1f} (n={r.n})"
  elif len(r.seeds) > 1:
    text += f" (n={r.n})"
  return text


def markdown_table(results: Sequence[Result]) -> str:
  """The results as a markdown table (mIoU in %; mean ± sample std over seeds, per-seed values)."""
  lines = ["| table | variant | overrides | steps | mIoU (ours, %) | seeds | per-seed mIoU (%) "
           "| paper mIoU (%) |",
           "|---|---|---|---|---|---|---|---|"]
  for r in results:
    ours = _fmt_miou(r)
    if r.reused_from:
      ours += f" (= {r.reused_from})"
    per_seed = ", ".join("—" if v is None else f"{100 * v:.1f}" for v in r.per_seed_miou)
    lines.append(f"| {r.table} | {r.paper_row} | {_fmt_overrides(r.overrides)} | {r.steps} | "
                 f"{ours} | {','.join(str(k) for k in r.seeds)} | {per_seed} | "
                 f"{'—' if r.paper_miou is None else f'{r.paper_miou:.1f}'} |")
  return "\n".join(lines)


def write_results(results: Sequence[Result], workdir: str, table: str) -> tuple[str, str]:
  os.makedirs(workdir, exist_ok=True)
  md = markdown_table(results)
  js = json.dumps([dataclasses.asdict(r) for r in results], indent=1, default=list)
  md_path = os.path.join(workdir, f"ablation_{table}.md")
  json_path = os.path.join(workdir, f"ablation_{table}.json")
  with open(md_path, "w") as f:
    f.write(md + "\n")
  with open(json_path, "w") as f:
    f.write(js + "\n")
  return md, js


FLAGS = flags.FLAGS


def _define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Base experiment config (`path.py[:arg]`).",
                                  lock_config=False)
  flags.DEFINE_enum("table", "all", TABLES + ("all",), "Which table to run (a paper table, or `mining`: hard mining beyond the paper).")
  flags.DEFINE_integer("steps", 300, "Training steps per variant.")
  flags.DEFINE_string("workdir", None, "Parent directory of the variants' workdirs.")
  flags.DEFINE_list("variants", None, "Optional subset of variant ids.")
  flags.DEFINE_list("seeds", None, "Optional seeds (e.g. 0,1,2): each variant trains once per "
                    "seed into <workdir>/<variant>/seed<k>; rows report mean ± sample std.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from pixcon_jax import checkpointing  # pylint: disable=g-import-not-at-top
  try:
    seeds = parse_seeds(FLAGS.seeds)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if FLAGS.steps < 1:
    raise app.UsageError(f"--steps={FLAGS.steps}: expected a positive integer")
  known = {v[0] for _, v in variants_of(FLAGS.table)}
  unknown = sorted(set(FLAGS.variants or ()) - known)
  if unknown:
    raise app.UsageError(f"--variants: {unknown} are not variants of --table={FLAGS.table}; "
                         f"expected some of {sorted(known)}")
  try:
    results = run_ablation(FLAGS.config, FLAGS.table, FLAGS.steps, FLAGS.workdir,
                           only=FLAGS.variants, seeds=seeds)
  except checkpointing.Stopped as e:
    # The variant's checkpoint is saved; a rerun resumes it and skips the finished ones' work.
    cli.fail(str(e), e.exit_code, prefix="stopped")
  md, js = write_results(results, FLAGS.workdir, FLAGS.table)
  print(md)
  print(js)
  sys.stdout.flush()


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
