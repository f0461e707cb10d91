"""The package's modules import each other in one direction: no cycle, function-local imports too.

The graph is read from the source with `ast` (nothing is imported): every `import` and
`from ... import` statement of a module, at module level or inside a function, `if` or `try`,
gives an edge to each package module it names. `from pixcon_jax import x` names the module
`pixcon_jax.x` when x is one (else the package itself), `from pixcon_jax.x import y` names
`pixcon_jax.x.y` when y is a module (else `pixcon_jax.x`), and relative imports are resolved
against the importing module's package. A package is its `__init__`. The parents that Python
imports on the way to a module (`import a.b` runs `a/__init__` first) are not edges: every
`__init__` that re-exports its children would otherwise be a cycle.
"""
from __future__ import annotations

import ast
import pathlib

PACKAGE = "pixcon_jax"
ROOT = pathlib.Path(__file__).resolve().parents[1] / PACKAGE


def module_files(root: pathlib.Path = ROOT, package: str = PACKAGE) -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every .py file of the package (a package is its __init__)."""
  out = {}
  for path in sorted(root.rglob("*.py")):
    parts = (package,) + path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
  """The absolute module of `from <level dots><name> import ...` written in `module`."""
  base = module.split(".")
  if not is_package:
    base = base[:-1]  # A module's own package is its parent.
  base = base[:len(base) - (level - 1)] if level > 1 else base
  return ".".join(base + ([name] if name else []))


def imported_modules(tree: ast.AST, module: str, is_package: bool,
                     modules: set[str]) -> set[str]:
  """The package modules that the statements of `tree` (anywhere in it) import."""
  found = set()

  def add(name: str) -> None:
    # The longest prefix that is a package module: `import numpy.linalg` names nothing of ours.
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
      candidate = ".".join(parts[:n])
      if candidate in modules:
        found.add(candidate)
        return

  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        add(alias.name)
    elif isinstance(node, ast.ImportFrom):
      source = (_resolve_relative(module, is_package, node.level, node.module) if node.level
                else node.module or "")
      for alias in node.names:
        submodule = f"{source}.{alias.name}"
        add(submodule if submodule in modules else source)
  found.discard(module)
  return found


def import_graph(files: dict[str, pathlib.Path]) -> dict[str, set[str]]:
  """Module -> the package modules it imports (module level and function-local alike)."""
  modules = set(files)
  return {name: imported_modules(ast.parse(path.read_text(), str(path)), name,
                                 path.name == "__init__.py", modules)
          for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of `graph` as [a, b, ..., a], or None when the graph is acyclic (depth-first)."""
  white, grey, black = 0, 1, 2
  color = {node: white for node in graph}
  stack: list[str] = []

  def visit(node: str) -> list[str] | None:
    color[node] = grey
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if color.get(nxt, white) == grey:
        return stack[stack.index(nxt):] + [nxt]
      if color.get(nxt, white) == white:
        cycle = visit(nxt)
        if cycle:
          return cycle
    stack.pop()
    color[node] = black
    return None

  for node in sorted(graph):
    if color[node] == white:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_cycle_finder_finds_a_cycle_and_accepts_a_dag():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"a"}}) == ["a", "a"]
  assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None


def test_import_forms_are_all_read(tmp_path):
  # A synthetic package written in every import form, with a cycle only function-local imports
  # close: p.a -> p.b (module level), p.b -> p.c.d (inside a function), p.c.d -> p.a (relative,
  # inside a method).
  pkg = tmp_path / "p"
  (pkg / "c").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from p import b\nimport os\n")
  (pkg / "b.py").write_text("def f():\n  from p.c.d import thing\n  return thing\n")
  (pkg / "c" / "__init__.py").write_text("")
  (pkg / "c" / "d.py").write_text(
      "thing = 1\nclass K:\n  def m(self):\n    from .. import a\n    import p.b as bb\n")
  graph = import_graph(module_files(pkg, "p"))
  assert graph["p.a"] == {"p.b"}
  assert graph["p.b"] == {"p.c.d"}
  assert graph["p.c.d"] == {"p.a", "p.b"}
  assert find_cycle(graph) == ["p.a", "p.b", "p.c.d", "p.a"]


def test_package_imports_have_no_cycle():
  files = module_files()
  assert f"{PACKAGE}.train" in files and f"{PACKAGE}.contrast.loss" in files
  graph = import_graph(files)
  assert f"{PACKAGE}.setup" in graph[f"{PACKAGE}.train"]  # The graph does see the imports.
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)
