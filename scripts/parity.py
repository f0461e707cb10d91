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

import json
import pathlib
import sys

import jax

from pixcon_jax.models import conv as conv_lib

import golden_parity as parity  # scripts/golden_parity/


def main(argv: list[str]) -> int:
  conv_impl = "auto"
  if argv and argv[0].startswith("--conv_impl="):
    conv_impl = argv.pop(0).split("=", 1)[1]
    if conv_impl not in conv_lib.IMPLS:
      print(f"--conv_impl={conv_impl!r}: expected one of {conv_lib.IMPLS}", file=sys.stderr)
      return 2
  if not argv:
    print(__doc__, file=sys.stderr)
    return 2
  all_ok = True
  with jax.default_matmul_precision("highest"):
    for arg in argv:
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
