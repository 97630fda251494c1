"""Running one point: ``train.py`` then each missing ``eval.py``, each in its
own process, as the local and the Ray backends do (the same code runs on a
Ray worker).

A point whose summary is at the final step and whose eval outputs exist is
skipped without touching a file. Otherwise its training runs with the same
command as the first time: train.py resumes from the run directory's latest
checkpoint (or starts, if there is none; a stale ``train.lock`` left by a
killed training is taken over), and only the evaluations still missing run.
A point's processes get SIGTERM when the process that started them dies
(Linux), and a rerun first waits for an earlier attempt's training to let
go of the run directory. Each process's output is appended to ``<run_dir>/sweep/<train|eval_KIND>.log``
and the point's record (``sweep/status.json``, see ``state.py``) says
running, done or failed with the exit status.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

from ultramem_jax.sweep import state
from ultramem_jax.sweep.points import Point, override_text
from ultramem_jax.sweep.spec import Sweep

REPO = pathlib.Path(__file__).resolve().parents[2]
# How long a point waits for the training of an earlier attempt (a killed
# Ray worker's, still saving its checkpoint) to let go of train.lock.
LOCK_WAIT_SEC = 300.0
try:  # Linux: a point's process gets SIGTERM when the process that started it dies
  _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
  _PRCTL = None
_PR_SET_PDEATHSIG = 1
_CHILDREN: set[subprocess.Popen] = set()
_LOCK = threading.Lock()
# Set once the sweep is stopping: a point that ends early then is recorded
# as interrupted, not failed.
STOPPING = threading.Event()


class PointFailed(RuntimeError):
  """A point's training or evaluation failed; the message says which, with
  the exit status and the last line of its log."""


@dataclasses.dataclass(frozen=True)
class Job:
  """What running a point needs, as plain data (sent to a Ray worker).

  Attributes:
    train: train.py's arguments (after the script).
    evals: (output file under RUN/eval, eval.py's arguments) per evaluation.
    env: environment variables set for the point's processes.
    repo: the checkout whose train.py and eval.py run (the same path on
      every machine of a cluster).
  """

  name: str
  run_dir: str
  steps: int
  train: tuple[str, ...]
  evals: tuple[tuple[str, tuple[str, ...]], ...]
  env: tuple[tuple[str, str], ...] = ()
  repo: str = str(REPO)

  @property
  def root(self) -> pathlib.Path:
    """The run directory (`run_dir` is relative to `repo` when inside it)."""
    return pathlib.Path(self.repo) / self.run_dir

  # Both run in `repo` (the scripts and relative paths are relative to it).
  def train_argv(self, python: str = sys.executable) -> list[str]:
    return [python, "train.py", *self.train]

  def eval_argvs(self, python: str = sys.executable) -> list[list[str]]:
    return [[python, "eval.py", *args] for _, args in self.evals]


def portable(path: pathlib.Path, repo: pathlib.Path = REPO) -> str:
  """`path` relative to the checkout when it lies inside it (the points'
  processes run there, on whichever machine), else as it is."""
  try:
    return str(path.relative_to(repo))
  except ValueError:
    return str(path)


def job_of(point: Point, sweep: Sweep, env: dict[str, str] | None = None) -> Job:
  """The point's job: train.py with the sweep's train_args, the point's
  overrides and its run directory, then its evals on the final step."""
  run_dir = portable(point.run_dir)
  train = ("--config", portable(point.config), *sweep.train_args,
           *point.overrides, override_text("train.run_dir", run_dir))
  evals = tuple((e.output(point.steps), (e.kind, "--run_dir", run_dir, *e.args))
                for e in sweep.evals)
  merged = {**sweep.env, **(env or {})}
  return Job(point.name, run_dir, point.steps, train, evals,
             tuple(sorted(merged.items())))


def job_state(job: Job) -> str:
  """The point's state (``state.point_state``)."""
  return state.point_state(job.root, job.steps,
                           [o for o, _ in job.evals])


def stop_children(sig: int = signal.SIGTERM) -> None:
  """Sends `sig` to every point process this process started and is waiting
  for (train.py saves a checkpoint on SIGTERM and exits)."""
  STOPPING.set()
  with _LOCK:
    children = list(_CHILDREN)
  for child in children:
    if child.poll() is None:
      child.send_signal(sig)


def _die_with_parent() -> None:
  """In the child before exec: SIGTERM when the parent dies (a SIGKILLed
  sweep or Ray worker), so the training saves a checkpoint and stops
  instead of running on, holding its run directory's lock."""
  if _PRCTL is not None:
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def wait_for_lock(run_dir: pathlib.Path, timeout: float = LOCK_WAIT_SEC) -> None:
  """Waits (up to `timeout`) while ``train.lock`` names a live process on
  this host: an earlier attempt's training, finishing its checkpoint."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    owner = state.read_json(run_dir / "train.lock")
    if (owner is None or owner.get("host") != socket.gethostname()
        or not isinstance(owner.get("pid"), int) or not state.alive(owner["pid"])):
      return
    time.sleep(1.0)


def _run(argv: list[str], log_path: pathlib.Path, env: dict[str, str],
         cwd: str, attempt: int) -> tuple[int, str]:
  """Runs `argv` with its output appended to `log_path`; (exit status,
  last non-empty line of this attempt's output)."""
  log_path.parent.mkdir(parents=True, exist_ok=True)
  with open(log_path, "a") as log:
    start = log.tell()
    log.write(f"=== attempt {attempt}, {time.strftime('%Y-%m-%d %H:%M:%S')}: "
              f"{' '.join(argv)}\n")
    log.flush()
    child = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             preexec_fn=_die_with_parent)
    with _LOCK:
      _CHILDREN.add(child)
    try:
      rc = child.wait()
    finally:
      with _LOCK:
        _CHILDREN.discard(child)
  with open(log_path, errors="replace") as f:
    f.seek(start)
    lines = [line.strip() for line in f.read().splitlines() if line.strip()]
  return rc, (lines[-1] if len(lines) > 1 else "")


def _fail(job: Job, attempt: int, stage: str, rc: int, last: str) -> None:
  if rc < 0:
    why = f"was killed by {signal.Signals(-rc).name} (the kernel's OOM killer?)"
  elif rc:
    why = f"exited with status {rc}"
  else:
    why = "exited with status 0 before the end (stopped by a signal?)"
  message = f"{job.name}: {stage} {why}" + (f": {last}" if last else "")
  stopped = STOPPING.is_set()
  state.write_record(job.root,
                     state="interrupted" if stopped else "failed", attempt=attempt,
                     stage=stage, exit_status=rc, message=message,
                     host=socket.gethostname(), pid=os.getpid())
  raise PointFailed(message)


def run_job(job: Job) -> dict:
  """Runs what the point still lacks; {"name", "state": "skipped" | "done",
  "wall_time_sec"}. Raises PointFailed (after recording it)."""
  run_dir = job.root
  outputs = [o for o, _ in job.evals]
  if state.trained(run_dir, job.steps) and not state.missing_evals(run_dir, outputs):
    return {"name": job.name, "state": "skipped", "wall_time_sec": 0.0}
  t0 = time.perf_counter()
  previous = state.record(run_dir) or {}
  attempt = int(previous.get("attempt", 0)) + 1
  state.write_record(run_dir, state="running", attempt=attempt, stage="train",
                     host=socket.gethostname(), pid=os.getpid())
  env = {**os.environ, "PYTHONUNBUFFERED": "1", **dict(job.env)}
  logs = run_dir / state.RECORD_DIR
  if not state.trained(run_dir, job.steps):
    wait_for_lock(run_dir)
    rc, last = _run(job.train_argv(), logs / "train.log", env, job.repo, attempt)
    if rc != 0 or not state.trained(run_dir, job.steps):
      _fail(job, attempt, "train.py", rc, last)
  for (output, args), argv in zip(job.evals, job.eval_argvs()):
    if output not in state.missing_evals(run_dir, [output]):
      continue
    state.write_record(run_dir, state="running", attempt=attempt,
                       stage=f"eval.py {args[0]}", host=socket.gethostname(),
                       pid=os.getpid())
    rc, last = _run(argv, logs / f"eval_{args[0]}.log", env, job.repo, attempt)
    if rc != 0 or state.missing_evals(run_dir, [output]):
      _fail(job, attempt, f"eval.py {args[0]}", rc, last)
  wall = time.perf_counter() - t0
  state.write_record(run_dir, state="done", attempt=attempt,
                     wall_time_sec=round(wall, 3))
  return {"name": job.name, "state": "done", "wall_time_sec": wall}
