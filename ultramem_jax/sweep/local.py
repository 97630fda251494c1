"""The local backend: the points on this machine, one after another or
``--parallel N`` at a time, each point's train.py and eval.py in their own
processes (``execute.py``).

The terminal shows the sweep's progress (points finished of all) and one
bar per running point (its step, from its metrics.jsonl), and one line per
point as it ends. A failed point is reported and the others go on.
SIGTERM to the sweep is passed on to the running trainings, which save a
checkpoint and exit (Ctrl-C reaches them directly: they share the
terminal's process group); the same command resumes them. A SIGKILLed
sweep's trainings get SIGTERM from the kernel (``execute.py``).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import pathlib
import signal
from typing import Callable

from tqdm import tqdm

from ultramem_jax.sweep import state
from ultramem_jax.sweep.execute import (STOPPING, Job, PointFailed, job_state,
                                        run_job, stop_children)
from ultramem_jax.training.run_dir import METRICS_FILE


class SweepStopped(Exception):
  """SIGTERM or SIGINT reached the sweep process."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


def last_step(run_dir: pathlib.Path) -> int:
  """The step of the last whole record of the run's metrics.jsonl (0 if
  none), reading only the file's end."""
  path = run_dir / METRICS_FILE
  try:
    with open(path, "rb") as f:
      size = f.seek(0, os.SEEK_END)
      f.seek(max(0, size - 4096))
      tail = f.read().decode(errors="replace").splitlines()
  except OSError:
    return 0
  for line in reversed(tail):
    try:
      step = json.loads(line).get("step")
    except (ValueError, AttributeError):
      continue
    if isinstance(step, int):
      return step
  return 0


def describe_end(job: Job, result: dict) -> str:
  """One line for a point that ended: its state, time and final loss."""
  s = state.summary(job.root) or {}
  loss = s.get("val_loss")
  tail = f", validation loss {loss:.4f}" if isinstance(loss, float) else ""
  return f"{job.name}: {result['state']} in {result['wall_time_sec']:.1f} s{tail}"


def _update_bars(bars: dict[str, tqdm], running: list[Job]) -> None:
  """One bar per running point, at the step its metrics.jsonl has reached."""
  for job in running:
    bar = bars.get(job.name)
    if bar is None:
      bar = bars[job.name] = tqdm(total=job.steps, desc=job.name, unit="step",
                                  position=len(bars) + 1, leave=False,
                                  dynamic_ncols=True)
    bar.n = last_step(job.root)
    bar.refresh()


def raise_stop(signum, frame):
  """A signal handler: stops the sweep with SweepStopped."""
  raise SweepStopped(signum)


def skip_done(jobs: list[Job], say: Callable[[str], None]
              ) -> tuple[dict[str, str], list[Job]]:
  """({name: "skipped"} of the jobs finished before, the jobs still to
  run); each skipped one is said. Both backends start with this, so a
  rerun never touches a finished point."""
  outcome: dict[str, str] = {}
  todo = []
  for job in jobs:
    if job_state(job) == "done":
      outcome[job.name] = "skipped"
      say(f"{job.name}: done before, skipped")
    else:
      todo.append(job)
  return outcome, todo


def run_local(jobs: list[Job], parallel: int = 1, progress: bool = True,
              say: Callable[[str], None] | None = None) -> dict[str, str]:
  """Runs every job not done yet; {name: "skipped" | "done" | the failure
  message}. SweepStopped if a signal stopped the sweep."""
  say = say or tqdm.write
  outcome, todo = skip_done(jobs, say)
  overall = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="sweep",
                 unit="point", position=0, disable=not progress,
                 dynamic_ncols=True)
  bars: dict[str, tqdm] = {}
  old = {s: signal.signal(s, raise_stop) for s in (signal.SIGTERM, signal.SIGINT)}
  pool = cf.ThreadPoolExecutor(max_workers=max(1, parallel))
  try:
    futures = {pool.submit(run_job, job): job for job in todo}
    pending = set(futures)
    while pending:
      finished, pending = cf.wait(pending, timeout=1.0,
                                  return_when=cf.FIRST_COMPLETED)
      for future in finished:
        job = futures[future]
        bar = bars.pop(job.name, None)
        if bar is not None:
          bar.close()
        try:
          result = future.result()
          outcome[job.name] = result["state"]
          say(describe_end(job, result))
        except PointFailed as e:
          outcome[job.name] = str(e)
          say(f"FAILED {e}")
        overall.update(1)
      if progress:
        _update_bars(bars, [futures[f] for f in pending if f.running()])
  except SweepStopped as e:
    # A SIGINT from the terminal reached the trainings too (one process
    # group); a second signal would make them exit without a checkpoint.
    if e.signum == signal.SIGTERM:
      stop_children(signal.SIGTERM)
    else:
      STOPPING.set()
    raise
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
    for s, handler in old.items():
      signal.signal(s, handler)
    for bar in bars.values():
      bar.close()
    overall.close()
  return outcome
