"""Where a point stands, read from its run directory, and the sweep's own
record there (``<run_dir>/sweep/status.json``, plus one log per process).

States:
  done         summary.json at the final step and every eval's output there
  trained      summary.json at the final step, an eval still to run
  running      the sweep's record says so and its process is alive
               (on another host: as far as this host can tell)
  failed       the last attempt failed (exit status and message recorded)
  interrupted  started (a run directory, a record) but neither finished nor
               running: the next `run` resumes it from its last checkpoint
  pending      nothing there yet
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import time

from ultramem_jax.training.run_dir import SUMMARY_FILE

RECORD_DIR = "sweep"
STATUS_FILE = "status.json"
FINISHED = ("done",)


def read_json(path: pathlib.Path) -> dict | None:
  """The JSON object in `path`, or None if it is missing or unreadable."""
  try:
    data = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  return data if isinstance(data, dict) else None


def summary(run_dir: pathlib.Path) -> dict | None:
  return read_json(run_dir / SUMMARY_FILE)


def trained(run_dir: pathlib.Path, steps: int) -> bool:
  """Whether the training reached `steps` and wrote its summary."""
  s = summary(run_dir)
  return s is not None and s.get("step") == steps


def missing_evals(run_dir: pathlib.Path, outputs: list[str]) -> list[str]:
  """The eval outputs (file names under RUN/eval) not written yet."""
  return [o for o in outputs if read_json(run_dir / "eval" / o) is None]


def record(run_dir: pathlib.Path) -> dict | None:
  return read_json(run_dir / RECORD_DIR / STATUS_FILE)


def write_record(run_dir: pathlib.Path, **fields) -> None:
  """Replaces the point's record atomically (write aside, rename)."""
  path = run_dir / RECORD_DIR / STATUS_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_text(json.dumps({**fields, "time": time.strftime(
      "%Y-%m-%d %H:%M:%S %Z")}, indent=2) + "\n")
  os.replace(tmp, path)


def alive(pid: int) -> bool:
  """Whether process `pid` exists on this host."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  try:  # a killed process its parent has not reaped yet is gone too
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
  except OSError:
    return True
  return stat.rpartition(")")[2].split()[:1] != ["Z"]


def point_state(run_dir: pathlib.Path, steps: int, outputs: list[str]) -> str:
  """One of the states of the module docstring."""
  if trained(run_dir, steps):
    if not missing_evals(run_dir, outputs):
      return "done"
  rec = record(run_dir)
  if rec is not None and rec.get("state") == "running":
    here = rec.get("host") == socket.gethostname()
    if not here or (isinstance(rec.get("pid"), int) and alive(rec["pid"])):
      return "running"
  if rec is not None and rec.get("state") == "failed":
    return "failed"
  if trained(run_dir, steps):
    return "trained"
  return "interrupted" if run_dir.exists() else "pending"
