"""What machine a benchmark ran on: CPU model, cores, memory, the
accelerator when there is one, JAX's version, the date; and the subsection
key that keeps one kind of machine's results apart from another's."""

from __future__ import annotations

import datetime
import os
import pathlib
import platform

import jax

ACCELERATORS = ("gpu", "tpu")


def _cpuinfo_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine() or "unknown CPU"


def _memory_bytes() -> int:
  try:
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
      if line.startswith("MemTotal:"):
        return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return 0


def cores() -> int:
  """CPU cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:   # not Linux
    return os.cpu_count() or 1


def accelerator() -> str | None:
  """The first device's kind (e.g. ``NVIDIA H200``) when JAX runs on an
  accelerator; None on a CPU."""
  device = jax.devices()[0]
  return device.device_kind if device.platform in ACCELERATORS else None


def load() -> str:
  """The 1-minute load average now, against the cores: how busy the
  machine was (other work slows absolute figures down)."""
  try:
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
  except OSError:
    return "load average unknown"


def machine_kind() -> str:
  """The subsection key: ``cpu: <model>`` or ``<platform>: <device kind>``."""
  device = jax.devices()[0]
  if device.platform in ACCELERATORS:
    return f"{device.platform}: {device.device_kind}"
  return f"cpu: {_cpuinfo_model()}"


def describe() -> dict[str, str]:
  """The lines every subsection starts with."""
  memory = _memory_bytes()
  host = f"{_cpuinfo_model()}, {cores()} cores, " + (
      f"{memory / 2**30:.0f} GiB memory" if memory else "memory unknown")
  acc = accelerator()
  if acc:
    host += f"; accelerator {acc} x {jax.device_count()}"
  else:
    host += "; no accelerator"
  return {"machine": host, "jax": f"JAX {jax.__version__}", "load": load(),
          "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat()}
