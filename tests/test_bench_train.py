"""scripts/bench_train.py runs end to end on a tiny model and prints a consistent JSON line.

Timings are never asserted (shared, noisy machines); the structure and the derived ratios are.
The official PyTorch baseline is replaced by a stand-in interpreter that prints a fixed JSON
line, so that the comparison fields are computed from known official times.
"""
import json
import os
import pathlib
import stat
import subprocess
import sys

import helpers

REPO = pathlib.Path(__file__).resolve().parents[1]
OFFICIAL = {"impl": "official_pytorch", "ce": {"step_s": 3.0}, "contrast": {"step_s": 4.0}}


def _fake_torch_python(tmp_path: pathlib.Path) -> pathlib.Path:
  """An 'interpreter' that ignores its arguments and prints the official JSON line."""
  script = tmp_path / "fake_python"
  script.write_text(f"#!/bin/sh\necho 'loading...'\necho '{json.dumps(OFFICIAL)}'\n")
  script.chmod(script.stat().st_mode | stat.S_IEXEC)
  return script


def test_bench_train_prints_all_variants_their_overheads_and_the_official_comparison(tmp_path):
  cmd = [sys.executable, str(REPO / "scripts" / "bench_train.py"), "--arg=runlocal",
         "--crop=32,64", "--steps=2", "--warmup=0", "--nohugepages",
         f"--official_repo={tmp_path}", f"--torch_python={_fake_torch_python(tmp_path)}"]
  env = helpers.subprocess_env()  # no time is asserted
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=900,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  assert len(lines) == 1, proc.stdout
  out = json.loads(lines[0])
  assert out["crop"] == [32, 64] and out["batch"] == 2 and out["glibc_tunables"] == ""
  assert out["official_pytorch"] == OFFICIAL
  for key in ("ce", "official_recipe", "paper_recipe"):
    r = out[key]
    assert len(r["step_s_all"]) == 2 and r["step_s"] > 0 and r["compile_s"] > 0, r
    assert r["xla_flops"] > 0 and r["xla_peak_bytes"] > 0, r
  ce, official, paper = out["ce"], out["official_recipe"], out["paper_recipe"]
  # The paper loss's class loop is counted unrolled: more FLOPs than the rolled program's count.
  assert paper["xla_flops"] > paper["xla_flops_loop_body_once"] > ce["xla_flops"], paper
  assert official["xla_flops"] > ce["xla_flops"], official
  for key, r in (("official_recipe", official), ("paper_recipe", paper)):
    o = out[f"{key}_overhead"]
    assert abs(o["time"] - (r["step_s"] / ce["step_s"] - 1)) < 1e-3, o
    assert abs(o["flops"] - (r["xla_flops"] / ce["xla_flops"] - 1)) < 1e-3, o
    assert abs(o["overhead_over_flop_overhead"] - round(o["time"] / o["flops"], 3)) < 2e-3, o
  assert out["overhead_over_flop_overhead"] == out["paper_recipe_overhead"][
      "overhead_over_flop_overhead"]
  like = out["like_for_like"]
  assert like["ce_speedup_vs_official"] == round(3.0 / ce["step_s"], 3), like
  assert like["contrast_speedup_vs_official"] == round(4.0 / official["step_s"], 3), like
  assert out["paper_contrast_speedup_vs_official"] == round(4.0 / paper["step_s"], 3), out
  # Each contrast variant adds a loss on top of CE.
  assert official["loss"] > ce["loss"] > 0 and paper["loss"] > ce["loss"], out


def test_bench_train_refuses_official_in_arg():
  cmd = [sys.executable, str(REPO / "scripts" / "bench_train.py"), "--arg=runlocal,official",
         "--nohugepages"]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, check=False,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2  # bad input: one `error:` line (pixcon_jax/cli.py)
  assert proc.stderr.strip().splitlines()[-1].startswith(
      "error: --arg must not contain 'official'"), proc.stderr[-2000:]
