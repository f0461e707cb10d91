"""Public names are a contract: every name of `__all__` of `pixcon_jax` and `pixcon_jax.contrast`
imports, `import pixcon_jax` stays light, and nothing undocumented is public."""
import importlib
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("pixcon_jax", "pixcon_jax.contrast")


def _public(package: str) -> list[str]:
  return list(importlib.import_module(package).__all__)


_IMPORT_EACH = """
import importlib, sys
failed = []
for package, name in {pairs!r}:
  try:
    exec(f"from {{package}} import {{name}}")  # as a user writes it
    value = getattr(importlib.import_module(package), name)
    if not getattr(value, "__doc__", None):
      failed.append(f"{{package}}.{{name}}: no docstring")
  except Exception as e:  # pylint: disable=broad-except
    failed.append(f"{{package}}.{{name}}: {{type(e).__name__}}: {{e}}")
print("FAILED" if failed else "OK", *failed, sep="\\n")
"""


def test_every_public_name_imports_with_a_docstring():
  pairs = [(p, n) for p in PACKAGES for n in _public(p)]
  assert ("pixcon_jax", "load_segmenter") in pairs and ("pixcon_jax.contrast", "contrast_loss") in pairs
  # One fresh process: the lazy names resolve from a clean start, not from earlier imports.
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, "-c", _IMPORT_EACH.format(pairs=pairs)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and proc.stdout.startswith("OK"), proc.stdout + proc.stderr[-2000:]


def test_all_lists_exactly_the_documented_contrast_api():
  import pixcon_jax.contrast as contrast  # pylint: disable=g-import-not-at-top
  doc = (REPO / "docs" / "LIBRARY.md").read_text()
  assert len(set(contrast.__all__)) == len(contrast.__all__)
  undocumented = [n for n in contrast.__all__ if f"`{n}`" not in doc]
  assert not undocumented, f"in pixcon_jax.contrast.__all__ but not in docs/LIBRARY.md: {undocumented}"
  with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
    import pixcon_jax  # pylint: disable=g-import-not-at-top
    pixcon_jax.nonexistent  # pylint: disable=pointless-statement


def test_import_pixcon_jax_is_light():
  """No TensorFlow, no JAX at all for `import pixcon_jax`; no backend for `pixcon_jax.contrast`."""
  code = ("import sys\n"
          "import pixcon_jax\n"
          "heavy = sorted(m for m in ('jax', 'tensorflow', 'flax', 'orbax') if m in sys.modules)\n"
          "assert not heavy, heavy\n"
          "from pixcon_jax import contrast\n"
          "assert 'tensorflow' not in sys.modules\n"
          "from jax._src import xla_bridge\n"
          "assert not xla_bridge._backends, xla_bridge._backends\n"
          "print('light')\n")
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip() == "light", proc.stderr[-2000:]
