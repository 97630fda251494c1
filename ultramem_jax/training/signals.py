"""Graceful preemption: the first SIGTERM or SIGINT asks the loop to stop
after the current step (it then waits for the asynchronous save in flight,
if any, saves a checkpoint of the step reached unless that is the one just
written, flushes its logs and returns); a second one exits at once. Orbax
makes a checkpoint visible only when it is complete, so exiting mid-save
leaves the previous one intact.

While the run is still being checked and its data prepared (before anything
is written to the run directory), a signal instead raises
:class:`StoppedBeforeTraining` at once: there is nothing to save."""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _Handlers:
  """SIGTERM / SIGINT go to ``self._handle`` while in use (``with``), in the
  main thread only; the previous handlers come back on exit."""

  _previous: dict[int, object]

  def __enter__(self):
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum: int, frame) -> None:
    raise NotImplementedError


class StopRequest(_Handlers):
  """Installs the handlers while in use (``with StopRequest(log) as stop``);
  ``stop.signal_name`` is None until a signal arrives. ``agreed``: one
  process of several, which stop together at the next log step
  (``Trainer.agree_stop``), as the message says."""

  def __init__(self, log: Callable[[str], None], agreed: bool = False):
    self._log = log
    self._until = ("the steps up to the next log step, where every process "
                   "stops," if agreed else "the current step,")
    self.signal_name: str | None = None

  def _handle(self, signum: int, frame) -> None:
    name = signal.Signals(signum).name
    if self.signal_name is not None:
      # os.write: safe inside a signal handler, unlike buffered printing.
      os.write(2, f"\nreceived {name} again: exiting now; the last complete "
                  "checkpoint is intact\n".encode())
      os._exit(128 + signum)
    self.signal_name = name
    os.write(2, f"\nreceived {name}: finishing {self._until} then saving a "
                "checkpoint (send it again to exit at once)\n".encode())

  @property
  def requested(self) -> bool:
    return self.signal_name is not None


class StoppedBeforeTraining(Exception):
  """A signal arrived before the run directory was written or any step
  was run; ``exit_status`` is 128 + the signal's number."""

  def __init__(self, signum: int, during: str):
    self.signal_name = signal.Signals(signum).name
    self.exit_status = 128 + signum
    super().__init__(f"stopped by {self.signal_name} while {during}, before "
                     "anything was trained or written to the run directory; "
                     "run the same command to start again")


class RaiseBeforeTraining(_Handlers):
  """``with RaiseBeforeTraining("preparing the data"):`` turns SIGTERM /
  SIGINT into StoppedBeforeTraining raised in the main thread."""

  def __init__(self, during: str):
    self._during = during

  def _handle(self, signum: int, frame) -> None:
    raise StoppedBeforeTraining(signum, self._during)
