"""Quiet logs: orbax and grain internals at WARNING, so a run's log shows the events that matter.

Also silences the resource tracker's exit-time note about grain's shared memory (see below).

Both libraries log through absl, whose records all go to the one Python logger "absl"; their
INFO lines (two thirds of a run's log: every save's paths, handlers, timings) can only be told
apart by the file that emitted them.
"""
from __future__ import annotations

import logging
import os
from typing import MutableMapping

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


# At exit grain's worker pool leaves the batches it had prefetched in shared memory; Python's
# resource tracker then unlinks them and warns once per run about "leaked shared_memory
# objects". The cleanup is complete, so the warning only buries the run's real last line.
RESOURCE_TRACKER_FILTER = "ignore:resource_tracker:UserWarning"


def quiet_resource_tracker(environ: MutableMapping[str, str]) -> None:
  """Adds the filter of that warning to PYTHONWARNINGS in `environ` (os.environ in main).

  The tracker is a separate interpreter started by multiprocessing; it reads PYTHONWARNINGS
  from the environment it inherits, so this must run before grain starts its workers.
  """
  current = environ.get("PYTHONWARNINGS", "")
  if RESOURCE_TRACKER_FILTER not in current.split(","):
    environ["PYTHONWARNINGS"] = ",".join(w for w in (current, RESOURCE_TRACKER_FILTER) if w)
