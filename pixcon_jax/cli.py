"""The command-line contract of `pixcon_jax.main` and every script: bad input is one line, exit 2.

A mistake in what the user asked for (a flag, a config key, a file) ends the process with one
line on stderr, `error: <flag, key or file>: <what was expected / what to do>`, and exit code
`validation.EXIT_BAD_INPUT` (2), without a traceback. The rule lives here only:
- `fail(message)` prints that line and exits;
- `parse_flags(argv)` is absl flag parsing whose failures (an unknown or malformed flag, a
  misspelt `--config.a.b`, a missing config file, an exception in `get_config(arg)`) end so;
- `run(main)` is `absl.app.run(main)` for scripts: flags parsed by `parse_flags`, and
  `validation.InputError` or `app.UsageError` raised by `main` end so.
Anything else is a bug and keeps its traceback. (`SystemExit("message")` would exit 1.)
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any, Callable, NoReturn, Sequence

from absl import app
from absl import flags

from pixcon_jax import validation


def fail(message: str, exit_code: int = validation.EXIT_BAD_INPUT, *,
         prefix: str = "error") -> NoReturn:
  """Ends the process with `prefix: message` as the last line of stderr (no traceback)."""
  sys.stdout.flush()
  print(f"{prefix}: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  sys.exit(exit_code)


def _config_arg_of(argv: Sequence[str]) -> str | None:
  """The value of `--config=path.py[:arg]` (or `--config path.py[:arg]`), if given."""
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _config_file_of(argv: Sequence[str]) -> str | None:
  """The file part of `--config=path.py[:arg]`, if given."""
  arg = _config_arg_of(argv)
  return arg.split(":", 1)[0] if arg is not None else None


def _override_flag(argv: Sequence[str], key: str) -> str:
  """The `--config.a.b=v` argument whose last or inner path part is `key` (else '--config')."""
  for a in argv:
    name = a.split("=", 1)[0]
    if name.startswith("--config.") and key in name[len("--config."):].split("."):
      return a
  return "--config"


def _innermost_message(error: BaseException) -> str:
  """ml_collections wraps KeyError('...Did you mean...') in AttributeError(KeyError)."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  return str(error.args[0]) if len(error.args) == 1 else str(error)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing whose failures end in one line naming the flag, exit code 2.

  ml_collections raises from deep inside flag parsing (a misspelt `--config.a.b` is a chained
  AttributeError; a missing config file an OSError), which absl would show as a traceback;
  absl's own flag errors would exit 1.
  """
  # A second parse in one process (`main.run` called again) defines the `--config.a.b` override
  # flags anew: the previous parse's must go first.
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)
  config_file = _config_file_of(argv)
  if config_file and "config" in flags.FLAGS and not os.path.isfile(config_file):
    fail(f"--config={config_file}: no such file (relative paths start at the current directory, "
         f"{os.getcwd()}); give a config such as configs/demo.py")
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    text = str(e)
    if "Traceback (most recent call last)" in text:
      # An exception inside the config file's get_config(arg): its last line says what failed.
      lines = [line.strip() for line in text.splitlines() if line.strip()]
      fail(f"--config={_config_arg_of(argv)}: {lines[-1]}")
    # A value of the wrong type: "flag --config.a.b=maybe: ('Non-boolean argument ...', 'maybe')".
    override = re.fullmatch(r"flag (--config\.[^=]+=.*?): \('([^']*)', .*\)", text, re.S)
    if override:
      fail(f"{override.group(1)}: {override.group(2)}")
    fail(f"{text}; see --helpshort")
  except (AttributeError, KeyError) as e:
    text = _innermost_message(e)
    key = text.split("\n")[0].strip("'\"")
    hint = text.split("\n", 1)[1] if "\n" in text else ""
    fail(f"{_override_flag(argv, key)}: the config has no key {key!r}. {hint}".strip())
  except Exception as e:  # pylint: disable=broad-except
    # Errors raised by the config file itself (get_config(arg)) or by a value's type.
    fail(f"--config={config_file}: {type(e).__name__}: {_innermost_message(e)}")


def run(main: Callable[[list[str]], Any]) -> NoReturn:
  """`absl.app.run(main)` with the contract: bad flags or input end in one `error:` line, exit 2.

  Args:
    main: the script's main(argv); it raises `validation.InputError` (or `app.UsageError`)
      for bad input, with a message that names the flag or file.
  """
  def guarded(argv: list[str]) -> Any:
    try:
      return main(argv)
    except (validation.InputError, app.UsageError) as e:
      fail(str(e))

  app.run(guarded, flags_parser=parse_flags)
  sys.exit(0)  # app.run exits itself; for type checkers.


class ArgumentParser(argparse.ArgumentParser):
  """argparse for scripts that use it: a bad argument is one `error:` line, exit 2."""

  def error(self, message: str) -> NoReturn:
    fail(f"{message}; see --help")


def int_list(values: Sequence[str], flag: str, *, length: int | None = None,
             minimum: int = 1) -> list[int]:
  """A list flag's items as integers >= `minimum` (e.g. `--crop=256,512`).

  Raises:
    app.UsageError naming `flag` when an item is not such an integer or the length differs.
  """
  try:
    ints = [int(v) for v in values]
  except (TypeError, ValueError):
    ints = None
  if ints is None or any(v < minimum for v in ints) or (length is not None and
                                                        len(ints) != length):
    count = f"{length} " if length is not None else ""
    raise app.UsageError(f"--{flag}={','.join(map(str, values or []))}: expected {count}"
                         f"comma-separated integers >= {minimum}")
  return ints
