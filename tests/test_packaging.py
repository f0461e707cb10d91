"""The installed package brings what its code imports: one list of pins, read by pip and by us.

`pyproject.toml` takes its dependencies from `requirements.txt`, so `pip install -e .` (or
`-e ".[aot]"`) in a fresh venv gives a checkout whose modules and scripts import. The imports are
read from the source with `ast` (nothing is imported); each third-party top-level name is mapped
to the distribution that provides it with `importlib.metadata.packages_distributions()`.
"""
from __future__ import annotations

import ast
import importlib.metadata
import pathlib
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = pathlib.Path(__file__).resolve().parents[1]
# Imported inside a function, only on a path that says what to install when it is missing:
# PyTorch runs the official code (fixture generation, checkpoint conversion, the torch baseline);
# scipy reads COCO-Stuff's official .mat annotations; `lib` and `segmentor` are modules of the
# official ContrastiveSeg checkout that scripts/make_official_mem_fixtures.py runs.
OPTIONAL = {"torch", "scipy", "lib", "segmentor"}


def _local_names() -> set[str]:
  """Names that import from this repository: its root packages and the modules of scripts/
  (which the scripts and the tests have on sys.path)."""
  def is_module(p: pathlib.Path) -> bool:
    return p.suffix == ".py" or (p / "__init__.py").exists()
  return ({p.name for p in REPO.iterdir() if (p / "__init__.py").exists()}
          | {p.stem for p in (REPO / "scripts").iterdir() if is_module(p)})


def _declared() -> tuple[set[str], dict[str, set[str]]]:
  """(requirements.txt's distributions, pyproject's extras -> distributions), canonical names."""
  reqs = set()
  for line in (REPO / "requirements.txt").read_text().splitlines():
    line = line.strip()
    if line and not line.startswith("#"):
      reqs.add(canonicalize_name(Requirement(line).name))
  project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  extras = {k: {canonicalize_name(Requirement(r).name) for r in v}
            for k, v in project.get("optional-dependencies", {}).items()}
  return reqs, extras


def _imports(paths: list[pathlib.Path],
             base: pathlib.Path = REPO) -> dict[str, tuple[bool, str]]:
  """Top-level imported name -> (imported at module level somewhere, one file importing it)."""
  out: dict[str, tuple[bool, str]] = {}
  for path in paths:
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(n) for n in tree.body}
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module]
      else:
        continue
      for name in names:
        root = name.split(".")[0]
        at_module = id(node) in top_level or out.get(root, (False, ""))[0]
        out[root] = (at_module, str(path.relative_to(base)))
  return out


def _code_files() -> list[pathlib.Path]:
  return sorted([*(REPO / "pixcon_jax").rglob("*.py"), *(REPO / "scripts").rglob("*.py"),
                 *(REPO / "configs").rglob("*.py")])


def test_pyproject_takes_its_dependencies_from_requirements_txt():
  project = tomllib.loads((REPO / "pyproject.toml").read_text())
  assert "dependencies" in project["project"].get("dynamic", []), (
      "pyproject.toml must declare dependencies (dynamic, from requirements.txt): "
      "`pip install -e .` in a fresh venv would otherwise install no JAX")
  dynamic = project["tool"]["setuptools"]["dynamic"]["dependencies"]
  assert dynamic == {"file": ["requirements.txt"]}, dynamic
  reqs, _ = _declared()
  assert {"jax", "flax", "optax", "absl-py", "etils"} <= reqs


def test_every_imported_third_party_package_is_declared():
  reqs, extras = _declared()
  declared = reqs.union(*extras.values())
  providers = importlib.metadata.packages_distributions()
  local = _local_names()
  missing = []
  for root, (at_module, where) in sorted(_imports(_code_files()).items()):
    if root in local or root in sys.stdlib_module_names or root == "__future__":
      continue
    if not at_module and root in OPTIONAL:
      continue
    dists = {canonicalize_name(d) for d in providers.get(root, [])}
    if not dists & declared:
      missing.append(f"{root} ({where}; provided by {sorted(dists) or 'nothing installed'})")
  assert not missing, ("imported but in neither requirements.txt nor an extra of pyproject.toml: "
                       + ", ".join(missing))


def test_the_scan_sees_module_and_function_level_imports(tmp_path):
  """The scan finds both kinds of import and tells them apart (so the test above can fail)."""
  src = tmp_path / "m.py"
  src.write_text("import jax.numpy as jnp\nfrom absl import app\n"
                 "def f():\n  import torch\n  from totally_unknown.sub import x\n")
  found = _imports([src], base=tmp_path)
  assert found == {"jax": (True, "m.py"), "absl": (True, "m.py"),
                   "torch": (False, "m.py"), "totally_unknown": (False, "m.py")}
