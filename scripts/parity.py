"""Checks pixcon_jax against golden outputs of the official PyTorch code.

Usage: python scripts/parity.py [--conv_impl=IMPL] CASE.json [CASE.json ...]
(e.g. `python scripts/parity.py tests/golden/*.json`)

Each case file names its `fixture` kind; the matching runner in
`golden_parity` (scripts/golden_parity/) rebuilds the inputs (and stand-in weights via the golden
folder's `weights.py`), runs our code and prints one JSON line per compared
quantity with `case`, `max_abs_diff`, `tolerance`, `ok`. Exit status 0 only if
every line is ok. `--conv_impl` (auto | xla | matmul | winograd, default auto) picks
the convolution algorithm of the network cases; every one must pass.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax

from pixcon_jax.models import conv as conv_lib

import golden_parity as parity  # scripts/golden_parity/


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description="Checks pixcon_jax against the golden outputs "
                                   "of the official PyTorch code (e.g. tests/golden/*.json).")
  parser.add_argument("--conv_impl", default="auto", choices=conv_lib.IMPLS,
                      help="convolution algorithm of the network cases")
  parser.add_argument("cases", nargs="+", metavar="CASE.json", help="golden case files")
  args = parser.parse_args(argv)  # Exits with status 2 and a usage line on bad arguments.
  conv_impl = args.conv_impl
  all_ok = True
  with jax.default_matmul_precision("highest"):
    for arg in args.cases:
      path = pathlib.Path(arg)
      if not path.is_file():
        print(json.dumps({"case": arg, "ok": False, "error": f"no such case file: {path}"}))
        all_ok = False
        continue
      kind = json.loads(path.read_text()).get("fixture")
      try:
        options = {"conv_impl": conv_impl} if kind in parity.MODEL_FIXTURES else {}
        rows = parity.runner(kind)(path, **options)
      except ValueError as e:
        rows = [{"case": path.stem, "ok": False, "error": str(e)}]
      for row in rows:
        print(json.dumps(row), flush=True)
        all_ok &= bool(row["ok"])
  return 0 if all_ok else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
