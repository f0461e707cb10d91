"""Every ```python block of docs/LIBRARY.md runs, as written.

The rules (for whoever writes snippets there):
- The blocks of one `## ` section run in order in one namespace (a section is one test, named
  after its heading); blocks before the first `## ` heading run as a section of their own. Only
  blocks fenced exactly as ```python run; ``` or ```text blocks (shell commands) do not.
- The literal path "/tmp/pixcon_demo" in a block stands for a trained demo run: it is replaced
  by the workdir of a run that this module trains once, with `python -m pixcon_jax.main
  --config=configs/demo.py:runlocal` and tiny overrides (`TINY_RUN` below; a few steps, then the
  final evaluation), so a snippet may load its `config.json`, checkpoints or weights. The run is
  only trained when a section uses the path.
- The blocks run in this process with the repository as the working directory; a block that
  raises fails its section with the block's number and source in the message.
"""
from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import traceback

import pytest

import helpers

REPO = pathlib.Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "LIBRARY.md"
DEMO_PATH = "/tmp/pixcon_demo"
TINY_RUN = [
    "--config.model.overrides.widths=(4,8,16,32)", "--config.model.overrides.stem_width=8",
    "--config.model.overrides.layer1_planes=4", "--config.model.proj_dim=8",
    "--config.data.crop_size=(32,32)", "--config.data.batch_size=2",
    "--config.data.synthetic_size=(32,64)", "--config.data.eval_pad_size=(32,64)",
    "--config.data.synthetic_num_train=4", "--config.data.synthetic_num_val=2",
    "--config.data.eval_batch_size=2", "--config.data.worker_count=0",
    "--config.memory.pixel_queue_size=16", "--config.schedule.total_steps=2",
    "--config.checkpoint.every_steps=2", "--config.eval.every_steps=2",
    "--config.eval.num_summary_images=1", "--config.log.every_steps=1",
]
_HEADING = re.compile(r"^## +(.+?)\s*$")
_FENCE = re.compile(r"^(\s*)```(\S*)\s*$")


def sections(text: str) -> dict[str, list[str]]:
  """{`## ` heading (or '(preamble)'): [source of each ```python block, in order]}.

  Fences may be indented (a block inside a list item); the indentation is removed.
  """
  out: dict[str, list[str]] = {}
  title, block, indent, lang = "(preamble)", None, "", None
  for line in text.splitlines():
    fence = _FENCE.match(line)
    if block is None:
      heading = _HEADING.match(line)
      if heading:
        title = heading.group(1)
      elif fence:
        block, indent, lang = [], fence.group(1), fence.group(2)
    elif fence and fence.group(2) == "":
      if lang == "python":
        out.setdefault(title, []).append("\n".join(block) + "\n")
      block = None
    else:
      block.append(line[len(indent):] if line.startswith(indent) else line)
  return out


def test_snippet_reader_finds_python_blocks_per_section():
  text = ("intro\n```python\na = 1\n```\n## One\n```\nshell only\n```\n```python\nb = 2\n```\n"
          "- item:\n\n  ```python\n  c = 3\n  ```\n## Two\n```text\nno\n```\n")
  assert sections(text) == {"(preamble)": ["a = 1\n"], "One": ["b = 2\n", "c = 3\n"]}


SECTIONS = sections(DOC.read_text())


def test_the_page_has_snippets():
  assert sum(len(blocks) for blocks in SECTIONS.values()) >= 5, SECTIONS.keys()


@pytest.fixture(scope="module")
def demo_run():
  """The workdir of a tiny trained demo run (config.json, checkpoints, events)."""
  root = pathlib.Path(tempfile.mkdtemp(prefix="pixcon_library_docs_"))
  workdir = root / "run"
  env = helpers.subprocess_env()
  proc = subprocess.run(
      [sys.executable, "-m", "pixcon_jax.main", "--config=configs/demo.py:runlocal",
       f"--workdir={workdir}", *TINY_RUN], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=900)
  assert proc.returncode == 0 and (workdir / "config.json").exists(), proc.stderr[-3000:]
  yield workdir
  shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("title", sorted(SECTIONS))
def test_section_snippets_run(title, request, monkeypatch):
  blocks = SECTIONS[title]
  if any(DEMO_PATH in b for b in blocks):
    workdir = str(request.getfixturevalue("demo_run"))
    blocks = [b.replace(DEMO_PATH, workdir) for b in blocks]
  monkeypatch.chdir(REPO)
  namespace = {"__name__": f"library_docs_{len(title)}"}
  for i, source in enumerate(blocks):
    try:
      exec(compile(source, f"docs/LIBRARY.md [{title}] block {i + 1}", "exec"), namespace)  # pylint: disable=exec-used
    except Exception:  # pylint: disable=broad-except
      pytest.fail(f"docs/LIBRARY.md, section {title!r}, block {i + 1} raised:\n{source}\n"
                  f"{traceback.format_exc()}")
