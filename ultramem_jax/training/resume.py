"""Resuming a multi-process run: one decision on which checkpoint is damaged.

Alone, :meth:`Checkpointer.restore_latest` walks back from the newest step
and moves each damaged one aside. Over several processes each reads only
its own shards, so one process may find a step damaged that another reads
well; were each to decide alone, they would resume from different steps
(or two would move the same directory). Here every process tries the step,
all outcomes are gathered, a step is damaged if any process failed on it,
process 0 alone moves it aside, and every process reopens its checkpoint
list and tries the one before: all resume from the same step. The
outcomes are gathered after each process has read its shards and again
after the fingerprints (a computation over every process's arrays) are
checked, so a process that failed to read never leaves the others waiting
in that computation.
"""

from __future__ import annotations

from typing import Any, Callable

import grain
import jax

from ultramem_jax.parallel.distributed import from_process_0, gather_text
from ultramem_jax.training.checkpoint import Checkpointer, CheckpointMismatch

OK = "ok"


def _reason(e: Exception) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _read(checkpointer: Checkpointer, step: int, abstract_state: Any,
          data_iter: grain.DatasetIterator | None):
  """(state, meta, None) or (None, None, the reason it failed): this
  process's shards only, so that no collective waits for a process that
  failed here."""
  try:
    checkpointer.check_shapes(step, abstract_state)
    state, meta = checkpointer.restore(step, abstract_state, data_iter,
                                       verify=False)
    return state, meta, None
  except CheckpointMismatch:
    raise
  except Exception as e:  # noqa: BLE001 (anything unreadable falls back)
    return None, None, _reason(e)


def _verify(state: Any, meta: dict) -> str | None:
  """None, or why the fingerprints (over the global arrays, computed by
  every process together) differ."""
  try:
    Checkpointer.verify(state, meta.pop("fingerprints", None))
    return None
  except Exception as e:  # noqa: BLE001
    return _reason(e)


def _failures(name: str, error: str | None) -> list[tuple[int, str]]:
  """(process, reason) of every process whose `error` was not None."""
  outcomes = gather_text(name, error or OK)
  return [(p, o) for p, o in enumerate(outcomes) if o != OK]


def restore_latest_agreed(checkpointer: Checkpointer, abstract_state: Any,
                          data_iter: grain.DatasetIterator | None = None,
                          log: Callable[[str], None] = print
                          ) -> tuple[int, Any, dict] | None:
  """(step, state, meta) of the newest checkpoint that every process
  restores and verifies, or None; as ``restore_latest`` in one process."""
  if jax.process_count() == 1:
    return checkpointer.restore_latest(abstract_state, data_iter, log=log)
  steps = from_process_0("resume/steps", ",".join(
      str(s) for s in sorted(checkpointer.all_steps(), reverse=True))
      if jax.process_index() == 0 else None)
  for step in [int(s) for s in steps.split(",") if s]:
    state, meta, error = _read(checkpointer, step, abstract_state, data_iter)
    failed = _failures(f"resume/{step}/read", error)
    if not failed:  # every process read its shards: verify them together
      failed = _failures(f"resume/{step}/verify", _verify(state, meta))
      if not failed:
        return step, state, meta
    where = from_process_0(f"resume/{step}/moved",
                           str(checkpointer.move_aside(step))
                           if jax.process_index() == 0 else None)
    gather_text(f"resume/{step}/seen", OK)  # the move is done everywhere
    checkpointer.reopen()
    process, reason = failed[0]
    log(f"checkpoint {step} is damaged (process {process}: {reason}); "
        f"process 0 moved it to {where} and every process tries the one before")
  return None
