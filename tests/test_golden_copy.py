"""tests/golden is a byte-identical copy of ../shared/golden (the fixtures' source of truth).

The copy lets a clone without ../shared pass its own tests; where ../shared/golden exists
beside the repository, any drift between the two fails here.
"""
import pathlib
import shutil

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
COPY = REPO / "tests" / "golden"
SHARED = REPO.parent / "shared" / "golden"


def _tree_differences(source: pathlib.Path, copy: pathlib.Path) -> list[str]:
  """Relative paths that are missing on one side or whose bytes differ (empty if identical)."""
  def files(root):
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}
  a, b = files(source), files(copy)
  problems = [f"only in {source}: {name}" for name in sorted(a.keys() - b.keys())]
  problems += [f"only in {copy}: {name}" for name in sorted(b.keys() - a.keys())]
  problems += [f"bytes differ: {name}" for name in sorted(a.keys() & b.keys())
               if a[name].read_bytes() != b[name].read_bytes()]
  return problems


def test_golden_copy_is_byte_identical_to_shared():
  if not SHARED.is_dir():
    pytest.skip(f"{SHARED} does not exist (a clone without ../shared): nothing to compare "
                "tests/golden with")
  assert sorted(p.name for p in COPY.iterdir()), f"{COPY} is empty"
  assert _tree_differences(SHARED, COPY) == []


def test_golden_comparison_reports_a_changed_missing_or_extra_file(tmp_path):
  source, copy = tmp_path / "source", tmp_path / "copy"
  source.mkdir()
  (source / "a.json").write_bytes(b'{"x": 1}')
  (source / "b.npz").write_bytes(b"\x00\x01")
  shutil.copytree(source, copy)
  assert _tree_differences(source, copy) == []
  (copy / "a.json").write_bytes(b'{"x": 2}')
  (copy / "b.npz").unlink()
  (copy / "extra.py").write_bytes(b"")
  assert _tree_differences(source, copy) == [
      f"only in {source}: b.npz", f"only in {copy}: extra.py", "bytes differ: a.json"]
