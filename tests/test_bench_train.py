"""scripts/bench_train.py runs end to end on a tiny model and prints a consistent JSON line.

Timings are never asserted (shared, noisy machines); the structure and the derived ratios are.
"""
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_bench_train_prints_both_variants_and_their_ratios():
  cmd = [sys.executable, str(REPO / "scripts" / "bench_train.py"), "--arg=runlocal",
         "--crop=32,64", "--steps=2", "--warmup=0", "--nohugepages"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  assert len(lines) == 1, proc.stdout
  out = json.loads(lines[0])
  assert out["crop"] == [32, 64] and out["batch"] == 2 and out["glibc_tunables"] == ""
  for variant in ("ce", "contrast"):
    r = out[variant]
    assert len(r["step_s_all"]) == 2 and r["step_s"] > 0 and r["compile_s"] > 0, r
    assert r["xla_flops"] > 0 and r["xla_peak_bytes"] > 0, r
  assert out["contrast_over_ce"] == round(out["contrast"]["step_s"] / out["ce"]["step_s"], 4)
  assert abs(out["contrast_overhead_pct"] - 100 * (out["contrast_over_ce"] - 1)) < 0.01
  # The contrast step adds the projection head and the loss: more FLOPs than CE alone.
  assert out["contrast_flops_over_ce"] > 1.0, out
  assert out["contrast"]["loss"] > out["ce"]["loss"] > 0, out
