"""Quiet logs: orbax and grain internals at WARNING, so a run's log shows the events that matter.

Both libraries log through absl, whose records all go to the one Python logger "absl"; their
INFO lines (two thirds of a run's log: every save's paths, handlers, timings) can only be told
apart by the file that emitted them.
"""
from __future__ import annotations

import logging
import os

QUIET_PACKAGES = ("orbax", "grain")


class _BelowWarningFrom(logging.Filter):
  """Drops records under WARNING emitted from files of the given packages."""

  def __init__(self, packages: tuple[str, ...]):
    super().__init__()
    self._parts = tuple(f"{os.sep}{p}{os.sep}" for p in packages)

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    return not any(part in record.pathname for part in self._parts)


def quiet_library_logs(packages: tuple[str, ...] = QUIET_PACKAGES) -> None:
  """Sets `packages`' own loggers to WARNING and filters their INFO lines out of absl's logger.

  Idempotent: a second call adds no second filter.
  """
  for name in packages:
    logging.getLogger(name).setLevel(logging.WARNING)
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _BelowWarningFrom) for f in absl_logger.filters):
    absl_logger.addFilter(_BelowWarningFrom(packages))
