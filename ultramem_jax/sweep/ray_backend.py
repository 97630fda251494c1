"""The Ray backend: each point a Ray task (``execute.run_job`` on a worker,
which runs train.py and eval.py as processes there), with the resources of
the sweep file's ``resources`` (CPUs, GPUs, custom resources such as TPU).

Ray schedules the tasks and retries them: a point that fails (an exception
in its task, or its worker dying) is run again up to ``retries`` times
(Ray's ``max_retries`` with ``retry_exceptions``); each retry resumes the
point from its last checkpoint. A point that still fails is reported and
does not stop the others.

``--address`` connects to a running cluster (``ray start --head`` on one
machine, ``ray start --address=...`` on the others; every machine needs
this checkout at the same path and the sweep directory on a shared file
system). Without it a local cluster is started for the run with
``--num_cpus`` CPUs (default: all), a small object store (the tasks pass
only names and paths) and no dashboard, and is shut down at the end.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Callable

import ray
from tqdm import tqdm

from ultramem_jax.sweep.execute import Job, PointFailed, run_job
from ultramem_jax.sweep.local import describe_end, raise_stop, skip_done
from ultramem_jax.sweep.spec import Resources

# Environment passed from the sweep's process to the points of a local
# cluster (a remote cluster's workers keep their own, plus the sweep's env).
FORWARDED_ENV = ("PYTHONPATH", "JAX_PLATFORMS", "XLA_FLAGS")
OBJECT_STORE_BYTES = 100 * 1024 * 1024
# Settings of a local cluster, unless the environment sets them: Ray's
# memory monitor off. It kills workers when the whole machine is short of
# memory, whoever uses it, and the tasks here hold almost none themselves
# (the training is a child process; the kernel's OOM killer still guards).
LOCAL_RAY_ENV = {"RAY_memory_monitor_refresh_ms": "0"}


def _task(job: Job) -> dict:
  return run_job(job)


def start(address: str | None, num_cpus: int | None) -> bool:
  """Connects to `address`, or starts a local cluster; whether it started
  one."""
  if address:
    ray.init(address=address, log_to_driver=False)
    return False
  for key, value in LOCAL_RAY_ENV.items():
    os.environ.setdefault(key, value)
  ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
           object_store_memory=OBJECT_STORE_BYTES, log_to_driver=False)
  return True


def _error_message(e: Exception) -> str:
  cause = getattr(e, "cause", None)
  if isinstance(cause, PointFailed):
    return str(cause)
  lines = [line for line in str(e).splitlines() if line.strip()]
  return lines[-1] if lines else type(e).__name__


def run_ray(jobs: list[Job], resources: Resources, retries: int,
            address: str | None = None, num_cpus: int | None = None,
            progress: bool = True, say: Callable[[str], None] | None = None
            ) -> dict[str, str]:
  """Runs every job not done yet as a Ray task; {name: "skipped" | "done" |
  the failure message}."""
  say = say or tqdm.write
  outcome, todo = skip_done(jobs, say)
  if not todo:
    return outcome
  local = start(address, num_cpus)
  old = signal.signal(signal.SIGTERM, raise_stop)  # so that Ray is shut down
  try:
    forwarded = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ} if local else {}
    remote = ray.remote(_task)
    options = dict(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
                   resources=dict(resources.custom) or None,
                   max_retries=retries, retry_exceptions=retries > 0)
    refs = {}
    for job in todo:
      env = tuple(sorted({**forwarded, **dict(job.env)}.items()))
      job = dataclasses.replace(job, env=env)
      refs[remote.options(name=job.name, **options).remote(job)] = job
    overall = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="sweep",
                   unit="point", disable=not progress, dynamic_ncols=True)
    started = {ref: time.perf_counter() for ref in refs}
    pending = list(refs)
    while pending:
      finished, pending = ray.wait(pending, num_returns=1)
      for ref in finished:
        job = refs[ref]
        try:
          result = ray.get(ref)
          outcome[job.name] = result["state"]
          say(describe_end(job, {**result, "wall_time_sec":
                                 time.perf_counter() - started[ref]}))
        except Exception as e:  # RayTaskError wrapping PointFailed, a lost worker
          outcome[job.name] = _error_message(e)
          say(f"FAILED {outcome[job.name]}" + (f" (after {retries} retries)"
                                               if retries else ""))
        overall.update(1)
    overall.close()
  finally:
    signal.signal(signal.SIGTERM, old)
    if local:
      ray.shutdown()
  return outcome
