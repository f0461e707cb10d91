"""scripts/ablate.py: every paper ablation is an override of configs/cityscapes_hrnet.py whose
objective and train step build, the Table 2 variants train, evaluate and come back as one table
on the demo config, and --seeds trains each variant per seed and reports mean ± std."""
import importlib.util
import json
import pathlib
import sys

import ml_collections
import numpy as np
import pytest

import helpers

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load(path: pathlib.Path, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up in sys.modules
  spec.loader.exec_module(module)
  return module


ablate = _load(REPO / "scripts" / "ablate.py", "ablate_script")


def test_every_variant_is_an_override_of_cityscapes_hrnet():
  config = _load(REPO / "configs" / "cityscapes_hrnet.py", "cs_config").get_config()
  for table in ablate.TABLES:
    for name, _, overrides, paper in ablate.VARIANTS[table]:
      assert 1 <= len(overrides) <= 2, name
      cfg = ablate.apply_overrides(config, overrides)
      for key, value in overrides.items():
        group, leaf = key.split(".")
        assert cfg[group][leaf] == value
      # A paper row carries the paper's number; only the mining table goes beyond the paper.
      assert (paper is None and table == "mining") or 78.0 <= paper <= 81.0, name
  # The default full method (random pos./neg. sampling, a departure from the paper's semi-hard):
  # these variants change nothing.
  for table, name in [("table1", "inter_image"), ("table2", "pixel_region_memory"),
                      ("table3", "seg_aware_random"), ("mining", "random")]:
    overrides = {n: o for n, _, o, _ in ablate.VARIANTS[table]}[name]
    assert ablate.apply_overrides(config, overrides).to_dict() == config.to_dict()
  with pytest.raises(KeyError, match="contrast.nonexistent"):
    ablate.apply_overrides(config, {"contrast.nonexistent": 1})


def test_result_table_overrides_are_shell_words_that_config_flags_parse(parse_config_flags):
  """The overrides column of the result tables can be pasted into a command line."""
  import shlex  # pylint: disable=g-import-not-at-top
  for table in ablate.TABLES:
    for name, _, overrides, _ in ablate.VARIANTS[table]:
      words = shlex.split(ablate._fmt_overrides(overrides).replace("`", "").replace(", ", " "))
      config = parse_config_flags(["--config=configs/cityscapes_hrnet.py", *words])
      for key, value in overrides.items():
        group, leaf = key.split(".")
        assert config[group][leaf] == value, (name, words)


def _variants_by_id() -> dict[str, dict]:
  """{variant id: overrides} over Tables 1-3; a shared id (the baseline) has one override set."""
  out: dict[str, dict] = {}
  for table in ablate.TABLES:
    for name, _, overrides, _ in ablate.VARIANTS[table]:
      assert out.setdefault(name, overrides) == overrides, name
  return out


def _tiny_demo_config():
  """configs/demo.py:runlocal with the generic tiny HRNet widths, batch 2 of 32x32 crops."""
  config = _load(REPO / "configs" / "demo.py", "demo_config_trace").get_config("runlocal")
  config.model.overrides.widths = (8, 16, 32, 64)
  config.model.overrides.stem_width = 16
  config.model.overrides.layer1_planes = 8
  config.model.proj_dim = 16
  config.data.batch_size = 2
  config.data.crop_size = (32, 32)
  return config


@pytest.mark.parametrize("variant", sorted(_variants_by_id()))
def test_every_variant_builds_its_objective_and_traces_its_train_step(variant):
  """Each ablation row is a runnable config: its contrast settings, objective and train step build.

  Tracing (no compile) runs every config check of the objective and the contrast settings,
  e.g. that intra-image contrast is in-batch only.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from pixcon_jax import objective, setup, sharding  # pylint: disable=g-import-not-at-top
  from pixcon_jax import train_step as ts  # pylint: disable=g-import-not-at-top
  overrides = _variants_by_id()[variant]
  config = ablate.apply_overrides(_tiny_demo_config(), overrides)
  c = config.model.num_classes
  if config.contrast.enabled:
    settings = objective.contrast_settings(config, num_classes=c)
    for key, value in overrides.items():
      group, leaf = key.split(".")
      if group == "contrast" and hasattr(settings, leaf):
        assert getattr(settings, leaf) == value, (variant, key)
  objective.make_objective(config, num_classes=c)
  exp = setup.for_training(config)
  mesh = sharding.make_mesh(jax.devices()[:1])
  b, (h, w) = config.data.batch_size, config.data.crop_size
  state = ts.abstract_train_state(config, exp.train_model, exp.tx, mesh, image_shape=(h, w, 3),
                                  num_classes=c, num_train_images=16)
  batch = {"image": jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32),
           "label": jax.ShapeDtypeStruct((b, h, w), jnp.int32),
           "image_id": jax.ShapeDtypeStruct((b,), jnp.int32)}
  traced = ts.make_train_step(config, exp.train_model, exp.tx, mesh).trace(state, batch)
  metric_names = set(traced.out_info[1])
  assert {"loss", "ce_loss", "grad_norm"} <= metric_names
  assert ("contrast_loss" in metric_names) == bool(config.contrast.enabled), metric_names
  assert (state.memory is not None) == objective.uses_memory(config), variant


@pytest.mark.slow  # five trainings: ~16 min wall on 2 shared CPU cores
def test_table2_on_demo_config_trains_each_variant_and_prints_table(tmp_path, capsys):
  config = _load(REPO / "configs" / "demo.py", "demo_config_ablate").get_config("runlocal")
  # The generic tiny HRNet and a 2-image eval keep five trainings within CPU test budgets.
  config.model.overrides = ml_collections.ConfigDict(dict(
      widths=(8, 16, 32, 64), stage_modules=(1, 1, 1), num_blocks=1, stem_width=16,
      layer1_planes=8, layer1_blocks=1))
  config.model.proj_dim = 16
  config.data.batch_size = 2
  config.data.eval_batch_size = 2
  config.data.synthetic_num_val = 2
  config.eval.max_batches = 1
  config.eval.num_summary_images = 0
  config.data.worker_count = 0
  results = ablate.run_ablation(config, "table2", steps=2, workdir=str(tmp_path))
  assert [r.variant for r in results] == [v[0] for v in ablate.VARIANTS["table2"]]
  for r in results:
    assert r.miou is not None and 0.0 <= r.miou <= 1.0, r
  md, js = ablate.write_results(results, str(tmp_path), "table2")
  print(md)
  out = capsys.readouterr().out
  for row in ("Mini-Batch (w/o memory)", "Pixel Memory", "Region Memory", "Pixel + Region Memory",
              "Baseline (w/o contrast)", "`--config.contrast.sources=\"('batch',)\"`"):
    assert row in out
  assert len(json.loads(js)) == 5
  assert (tmp_path / "ablation_table2.md").exists()


def test_ablate_command_line_runs_a_table2_variant_and_prints_its_table(tmp_path):
  """The script's CLI (config file + overrides + --table/--variants) on one Table 2 variant."""
  import subprocess
  tiny = ["--config.model.overrides.widths=(8,16,32,64)", "--config.model.overrides.stem_width=16",
          "--config.model.overrides.layer1_planes=8", "--config.model.proj_dim=16",
          "--config.data.batch_size=2", "--config.data.eval_batch_size=2",
          "--config.data.synthetic_num_val=2",
          "--config.eval.num_summary_images=0", "--config.data.worker_count=0"]
  proc = subprocess.run(
      [sys.executable, str(REPO / "scripts" / "ablate.py"), "--config=configs/demo.py:runlocal",
       "--table=table2", "--variants=mini_batch", "--steps=1", f"--workdir={tmp_path}"] + tiny,
      env=helpers.subprocess_env(),
      capture_output=True, text=True, timeout=900,
      cwd=str(REPO))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| table2 | Mini-Batch (w/o memory) |" in proc.stdout
  rows = json.loads((tmp_path / "ablation_table2.json").read_text())
  assert [r["variant"] for r in rows] == ["mini_batch"] and 0.0 <= rows[0]["miou"] <= 1.0
  # Mode eval on the variant's checkpoint, with the base config (memory on, unlike the
  # variant): only params and batch_stats are restored, and the mIoU is the training run's.
  from pixcon_jax import evaluate
  config = _load(REPO / "configs" / "demo.py", "demo_config_eval").get_config("runlocal")
  config.model.overrides.widths = (8, 16, 32, 64)
  config.model.overrides.stem_width = 16
  config.model.overrides.layer1_planes = 8
  config.model.proj_dim = 16
  config.data.batch_size = 2
  config.data.eval_batch_size = 2
  config.data.synthetic_num_val = 2
  config.data.worker_count = 0
  metrics = evaluate.evaluate_checkpoint(config, str(tmp_path / "mini_batch"))
  assert metrics["miou"] == pytest.approx(rows[0]["miou"], abs=1e-6)


def test_seeds_set_init_and_data_order_and_rows_report_mean_and_sample_std():
  """`seeded` sets config.seed and config.data.seed (not the dataset); the row statistics are the
  mean and the n - 1 standard deviation of the finished runs; --seeds parsing rejects bad lists."""
  config = _tiny_demo_config()
  cfg = ablate.seeded(config, 3)
  assert (cfg.seed, cfg.data.seed) == (3, 3)
  assert (config.seed, config.data.seed) == (0, 0)  # the base config is untouched
  assert cfg.data.synthetic_seed == config.data.synthetic_seed
  values = [0.41, 0.47, 0.45]
  mean, std, n = ablate.seed_statistics(values)
  assert n == 3 and mean == pytest.approx(np.mean(values))
  assert std == pytest.approx(np.std(values, ddof=1))
  assert ablate.seed_statistics([0.5, None]) == (0.5, None, 1)  # an interrupted run is left out
  assert ablate.parse_seeds(["0", "1", "2"]) == [0, 1, 2] and ablate.parse_seeds(None) is None
  with pytest.raises(ValueError, match="--seeds must be comma-separated integers"):
    ablate.parse_seeds(["0", "x"])
  with pytest.raises(ValueError, match="repeated"):
    ablate.parse_seeds(["1", "1"])
  row = ablate.Result(table="table1", variant="baseline", paper_row="Baseline (w/o contrast)",
                      overrides={"contrast.enabled": False}, paper_miou=78.1, miou=mean,
                      miou_mean=mean, miou_std=std, n=n, seeds=[0, 1, 2], per_seed_miou=values)
  assert (f"| {100 * mean:.1f} ± {100 * std:.1f} (n=3) | 0,1,2 | 41.0, 47.0, 45.0 | 78.1 |"
          in ablate.markdown_table([row]))


def test_ablate_command_line_with_two_seeds_trains_each_seed_and_reports_mean_std(tmp_path):
  """--seeds=0,1: the baseline trains twice into baseline/seed0 and baseline/seed1 (different
  weights), and the JSON row's mean / std are those of its two per-seed mIoUs."""
  import subprocess
  tiny = ["--config.model.overrides.widths=(8,16,32,64)", "--config.model.overrides.stem_width=16",
          "--config.model.overrides.layer1_planes=8", "--config.model.proj_dim=16",
          "--config.data.batch_size=2", "--config.data.eval_batch_size=2",
          "--config.data.synthetic_num_val=2", "--config.eval.max_batches=1",
          "--config.eval.num_summary_images=0", "--config.data.worker_count=0"]
  # The second seed reuses the first one's compiled programs through the persistent cache.
  env = helpers.subprocess_env(cache_dir=tmp_path / "jax_cache")
  out = tmp_path / "ablate"
  proc = subprocess.run(
      [sys.executable, str(REPO / "scripts" / "ablate.py"), "--config=configs/demo.py:runlocal",
       "--table=table1", "--variants=baseline", "--seeds=0,1", "--steps=2",
       f"--workdir={out}"] + tiny,
      env=env, capture_output=True, text=True, timeout=900, cwd=str(REPO))
  assert proc.returncode == 0, proc.stderr[-3000:]
  (row,) = json.loads((out / "ablation_table1.json").read_text())
  assert row["variant"] == "baseline" and row["seeds"] == [0, 1] and row["n"] == 2
  assert row["per_seed_workdir"] == [str(out / "baseline" / "seed0"),
                                     str(out / "baseline" / "seed1")]
  per_seed = row["per_seed_miou"]
  assert len(per_seed) == 2 and all(0.0 <= v <= 1.0 for v in per_seed), per_seed
  assert row["miou_mean"] == pytest.approx(np.mean(per_seed), abs=1e-12)
  assert row["miou"] == row["miou_mean"]
  assert row["miou_std"] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-12)
  assert "| table1 | Baseline (w/o contrast) |" in proc.stdout and "(n=2) | 0,1 |" in proc.stdout
  # Two different runs: each seed has its own checkpoint, and their weights differ.
  from pixcon_jax import checkpointing, setup  # pylint: disable=g-import-not-at-top
  config = _tiny_demo_config()
  config.contrast.enabled = False
  exp = setup.for_inference(config)
  params = [checkpointing.load_variables(config, d, model=exp.eval_model, mesh=exp.mesh)[0][
      "params"] for d in row["per_seed_workdir"]]
  import jax  # pylint: disable=g-import-not-at-top
  diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
           for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1]))]
  assert max(diffs) > 1e-3, "seed0 and seed1 trained the same weights"
