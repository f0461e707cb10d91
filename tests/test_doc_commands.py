"""Every command written in README.md and docs/*.md parses its flags as the program would.

The commands are taken from code blocks and inline code spans:
- `python -m pixcon_jax.main ...`: the config file (with its `:arg`) is loaded and every
  `--config.a.b=value` override applied through `ml_collections.config_flags`, as main does,
  without training; main's other flags must be flags that main.py defines;
- `python scripts/<name>.py ...`: the script must exist and define every `--flag` passed to it
  (read from its source, so nothing of it runs);
- an inline span of `--config.a.b=value` overrides alone (the ablation tables): applied to
  `configs/cityscapes_hrnet.py`, the config the docs say they are one argument away from.
A test id names the doc file and the line where the command starts.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import pathlib
import re
import shlex

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = ("README.md",) + tuple(sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")))
OVERRIDES_BASE_CONFIG = "configs/cityscapes_hrnet.py"

_PYTHON = re.compile(r"(\S*/)?python(\d+(\.\d+)*)?")
_SCRIPT = re.compile(r"scripts/[\w-]+\.py")
_SEPARATORS = ("&&", "||", ";", "|", "&")


def _shell_words(snippet: str) -> list[str]:
  """The words of a shell command line, with `( ) ; < > | &` runs as words of their own.

  Quotes are removed as the shell removes them; `#` starts a comment; ValueError on an
  unbalanced quote.
  """
  lexer = shlex.shlex(snippet, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  lexer.commenters = "#"
  return list(lexer)


@dataclasses.dataclass(frozen=True)
class DocCommand:
  """One command of a doc: `kind` main | script | overrides, its arguments after the program."""
  where: str  # "README.md:203"
  text: str
  kind: str
  program: str  # "pixcon_jax.main", "scripts/x.py" or the base config of an overrides span
  args: tuple[str, ...]


def _snippets(text: str) -> list[tuple[int, str]]:
  """(first line number, text) of each logical line of the fenced code blocks and each inline
  code span; a code line ending in a backslash continues on the next line."""
  lines = text.split("\n")
  snippets, prose, in_block, pending, start = [], [], False, "", 0
  for number, line in enumerate(lines, 1):
    if line.lstrip().startswith("```"):
      in_block = not in_block
      prose.append("")  # A fence ends a paragraph (and any inline span).
      continue
    if not in_block:
      prose.append(line)
      continue
    prose.append("")
    if not pending:
      start = number
    if line.rstrip().endswith("\\"):
      pending += line.rstrip()[:-1] + " "
    else:
      snippets.append((start, pending + line))
      pending = ""
  prose_text = "\n".join(prose)
  for m in re.finditer(r"`([^`]+)`", prose_text):
    if "\n\n" not in m.group(1):
      snippets.append((prose_text.count("\n", 0, m.start()) + 1, m.group(1).replace("\n", " ")))
  return sorted(snippets)


def _commands_of_tokens(where: str, text: str, tokens: list[str]) -> list[DocCommand]:
  # `[--flag]` marks an optional flag in a usage line.
  tokens = [t[1:-1] if t.startswith("[") and t.endswith("]") else t for t in tokens]
  if tokens and tokens[0].startswith("--config."):
    return [DocCommand(where, text, "overrides", OVERRIDES_BASE_CONFIG, tuple(tokens))]
  commands, segment = [], []
  for token in tokens + [";"]:
    if token not in _SEPARATORS:
      segment.append(token)
      continue
    for i, t in enumerate(segment):
      if not _PYTHON.fullmatch(t):
        continue
      rest = segment[i + 1:]
      if rest[:2] == ["-m", "pixcon_jax.main"] and rest[2:]:
        # A bare `python -m pixcon_jax.main` names the program in prose; it is not a command.
        commands.append(DocCommand(where, text, "main", "pixcon_jax.main", tuple(rest[2:])))
      elif rest and _SCRIPT.fullmatch(rest[0]):
        commands.append(DocCommand(where, text, "script", rest[0], tuple(rest[1:])))
      break
    segment = []
  return commands


def doc_commands(path: pathlib.Path, name: str) -> list[DocCommand]:
  """The main, script and override commands written in the markdown file `path`."""
  commands = []
  for line, snippet in _snippets(path.read_text()):
    where = f"{name}:{line}"
    try:
      tokens = _shell_words(snippet)
    except ValueError as e:  # Unbalanced quotes.
      if "pixcon_jax.main" in snippet or "scripts/" in snippet or "--config." in snippet:
        commands.append(DocCommand(where, snippet, "unparsable", "", (str(e),)))
      continue
    commands.extend(_commands_of_tokens(where, snippet, tokens))
  return commands


@functools.cache
def defined_flags(source: pathlib.Path) -> tuple[frozenset[str], frozenset[str]]:
  """(flag names, boolean flag names) that a Python file defines with absl or argparse.

  Read from the file's syntax tree (`flags.DEFINE_*("name", ...)`,
  `config_flags.DEFINE_config_file("name", ...)`, `parser.add_argument("--name", ...)`) so
  that the file is not run.
  """
  names, booleans = set(), set()
  for node in ast.walk(ast.parse(source.read_text(), str(source))):
    if not isinstance(node, ast.Call):
      continue
    func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
    strings = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    if func.startswith("DEFINE_") and func != "DEFINE_flag":
      keyword = [k.value.value for k in node.keywords
                 if k.arg == "name" and isinstance(k.value, ast.Constant)]
      name = (strings[:1] or keyword or [None])[0]
      if name:
        names.add(name)
        if func in ("DEFINE_bool", "DEFINE_boolean"):
          booleans.add(name)
    elif func == "add_argument":
      names.update(s[2:] for s in strings if s.startswith("--"))
  return frozenset(names), frozenset(booleans)


def _undefined_flags(args: tuple[str, ...], source: pathlib.Path, *,
                     skip_config: bool) -> list[str]:
  """The `--flags` of `args` that `source` does not define (`--noX` is X for booleans)."""
  names, booleans = defined_flags(source)
  bad = []
  for arg in args:
    if not arg.startswith("--"):
      continue
    name = arg[2:].split("=", 1)[0]
    if skip_config and (name == "config" or name.startswith("config.")):
      continue
    name = name.split(".", 1)[0]  # `--config.x` of a script's own config flag.
    if name in names or (name.startswith("no") and name[2:] in booleans):
      continue
    bad.append(arg)
  return bad


def _config_args(args: tuple[str, ...]) -> list[str]:
  """The `--config=FILE` and `--config.x=y` arguments, with `--flag value` joined by `=`."""
  out, i = [], 0
  while i < len(args):
    arg = args[i]
    if arg == "--config" or arg.startswith("--config."):
      if "=" not in arg and i + 1 < len(args) and not args[i + 1].startswith("-"):
        arg, i = f"{arg}={args[i + 1]}", i + 1
      out.append(arg)
    elif arg.startswith("--config="):
      out.append(arg)
    i += 1
  return out


def check_command(command: DocCommand, parse_config_flags) -> None:
  """Fails (naming the doc file and line) if `command` would not get past flag parsing."""
  head = f"{command.where}: `{command.text.strip()}`"
  if command.kind == "unparsable":
    pytest.fail(f"{head}\n  shell quoting does not parse: {command.args[0]}")
  if "(" in command.args or ")" in command.args:
    pytest.fail(f"{head}\n  unquoted ( ) are a shell syntax error: quote the value, "
                f"e.g. --config.contrast.sources=\"('batch',)\"")
  if command.kind == "overrides" and not all(a.startswith("--config.") for a in command.args):
    pytest.fail(f"{head}\n  not a --config.a.b=value override: "
                f"{[a for a in command.args if not a.startswith('--config.')]}")
  if command.kind == "script":
    script = REPO / command.program
    if not script.is_file():
      pytest.fail(f"{head}\n  no such script: {command.program}")
    bad = _undefined_flags(command.args, script, skip_config=False)
    if bad:
      pytest.fail(f"{head}\n  {command.program} defines no flag for {bad}")
    return
  if command.kind == "main":
    bad = _undefined_flags(command.args, REPO / "pixcon_jax" / "main.py", skip_config=True)
    if bad:
      pytest.fail(f"{head}\n  pixcon_jax/main.py defines no flag for {bad}")
    config_args = _config_args(command.args)
  else:
    config_args = [f"--config={command.program}"] + list(command.args)
  if not any(a.startswith("--config=") for a in config_args):
    pytest.fail(f"{head}\n  no --config=FILE")
  config_file = config_args[[a.startswith("--config=") for a in config_args].index(True)]
  if not (REPO / config_file.split("=", 1)[1].split(":", 1)[0]).is_file():
    pytest.fail(f"{head}\n  no such config file: {config_file}")
  try:
    parse_config_flags(config_args)
  except Exception as e:  # pylint: disable=broad-except
    # config_flags raises many kinds (unknown key, unsupported type, bad value, bad arg).
    pytest.fail(f"{head}\n  config flags do not parse: {type(e).__name__}: {e}")


ALL_COMMANDS = [c for name in DOCS for c in doc_commands(REPO / name, name)]


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: c.where)
def test_doc_command_parses(command, parse_config_flags):
  check_command(command, parse_config_flags)


def test_the_docs_commands_are_found():
  """The extraction sees the commands of each kind (a broken extractor would test nothing)."""
  found = {(c.kind, c.program, c.args) for c in ALL_COMMANDS}
  assert ("main", "pixcon_jax.main", ("--config=configs/cityscapes_hrnet.py", "--workdir=/ckpt/run1",
                                      "--config.data.data_dir=~/tfds",
                                      "--config.init_from=~/ckpt/hrnet_w48_imagenet")) in found
  assert ("script", "scripts/parity.py", ("tests/golden/*.json",)) in found
  assert ("overrides", OVERRIDES_BASE_CONFIG, ("--config.contrast.sources=('batch',)",)) in found
  kinds = {(c.where.split(":")[0], c.kind) for c in ALL_COMMANDS}
  assert {("README.md", "main"), ("README.md", "script"), ("docs/ABLATIONS.md", "main"),
          ("docs/DATA.md", "script")} <= kinds


_BROKEN_DOC = """# A doc

Train with

```
python -m pixcon_jax.main --config=configs/demo.py --workdir=/tmp/x \\
    --config.contrast.minig=hardest
```

Then `python scripts/parity.py --conv_impl=xla --strict tests/golden/*.json`, or set
`--config.data.data_dir=~/tfds --config.data.batch_size=big` and run
`python scripts/no_such_script.py`. Fine: `python -m pixcon_jax.main --config=configs/demo.py
--workdir=/tmp/d --nohugepages --config.eval.protocol=paper`; `.venv/bin/python -m pytest -q`.
"""


def test_broken_doc_commands_fail_naming_their_line(tmp_path, parse_config_flags):
  doc = tmp_path / "BROKEN.md"
  doc.write_text(_BROKEN_DOC)
  commands = doc_commands(doc, "BROKEN.md")
  assert [(c.where, c.kind) for c in commands] == [
      ("BROKEN.md:6", "main"), ("BROKEN.md:10", "script"), ("BROKEN.md:11", "overrides"),
      ("BROKEN.md:12", "main"), ("BROKEN.md:12", "script")]
  errors = {}
  for c in commands:
    try:
      check_command(c, parse_config_flags)
    except pytest.fail.Exception as e:
      errors[c.where + c.kind] = str(e)
  assert set(errors) == {"BROKEN.md:6main", "BROKEN.md:10script", "BROKEN.md:11overrides",
                         "BROKEN.md:12script"}
  assert errors["BROKEN.md:6main"].startswith("BROKEN.md:6: `python -m pixcon_jax.main")
  assert "minig" in errors["BROKEN.md:6main"]
  assert "['--strict']" in errors["BROKEN.md:10script"]
  assert "batch_size" in errors["BROKEN.md:11overrides"]
  assert "no such script: scripts/no_such_script.py" in errors["BROKEN.md:12script"]
