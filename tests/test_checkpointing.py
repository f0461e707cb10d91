"""Stop requests (pixcon_jax.checkpointing.StopRequest): looked for every k steps only."""
import logging
import os
import signal

import numpy as np
import pytest

from pixcon_jax import checkpointing


class FakeManager:
  """Records the counters given to `reached_preemption`; True at `sync_point`."""

  def __init__(self, sync_point=None, error=None):
    self.calls, self.sync_point, self.error = [], sync_point, error

  def reached_preemption(self, counter):
    self.calls.append(counter)
    if self.error is not None:
      raise self.error
    return counter == self.sync_point


def test_preemption_is_checked_every_k_steps_with_consecutive_counters():
  stop = checkpointing.StopRequest(every_steps=5)
  manager = FakeManager()
  assert not any(stop.should_stop(manager, step) for step in range(1, 21))
  # jax's sync point is one past the last counter seen, so the counters must be consecutive.
  assert manager.calls == [1, 2, 3, 4]


def test_preemption_sync_point_stops_at_that_check():
  stop = checkpointing.StopRequest(every_steps=4)
  manager = FakeManager(sync_point=3)  # reached at the third check, step 12
  stopped = [step for step in range(1, 17) if stop.should_stop(manager, step)]
  assert stopped == [12]
  assert stop.signal_name == "preemption notice"


def test_cross_process_reduction_runs_only_at_checks(monkeypatch):
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  gathered = []

  def fake_allgather(x):
    gathered.append(bool(x))
    return np.stack([np.asarray(x), np.asarray(True)])  # another process was signalled

  monkeypatch.setattr(checkpointing.jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather", fake_allgather)
  stop = checkpointing.StopRequest(every_steps=3)
  assert [s for s in range(1, 8) if stop.should_stop(FakeManager(), s)] == [3, 6]
  assert gathered == [False, False]


def test_sigterm_stops_at_the_next_check():
  stop = checkpointing.StopRequest(every_steps=3).install()
  try:
    manager = FakeManager()
    assert not stop.should_stop(manager, 1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested
    assert not stop.should_stop(manager, 2)  # not a check step: no look, no stop yet
    assert stop.should_stop(manager, 3)
    assert stop.signal_name == "SIGTERM"
  finally:
    stop.uninstall()


def test_a_failing_preemption_check_warns_once_and_is_not_retried(caplog):
  stop = checkpointing.StopRequest(every_steps=2)
  manager = FakeManager(error=ConnectionError("coordination service unreachable"))
  with caplog.at_level(logging.WARNING):
    assert not any(stop.should_stop(manager, step) for step in range(1, 9))
  assert manager.calls == [1]
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1
  assert "coordination service unreachable" in warnings[0].getMessage()
  assert "preemption notice will not save" in warnings[0].getMessage()


def test_a_non_positive_period_names_the_config_key():
  with pytest.raises(ValueError, match="config.checkpoint.preemption_check_every_steps"):
    checkpointing.StopRequest(every_steps=0)
