"""One run over several JAX processes: joining them, and each one's data.

A multi-host run (a Cloud TPU pod slice, a GPU cluster, or several CPU
processes on one machine) starts the same program once per host. Each
process calls :func:`initialize` before anything touches a JAX device, then
sees every device of the run in ``jax.devices()`` and drives only its own
(``jax.local_devices()``). A process reads only the part of each global batch
that its devices hold (:func:`batch_shard`); processes whose devices hold the
same rows (replicas, e.g. over ``mesh.tensor``) read the same part.

On CPU the processes exchange collectives over gloo, the default of
``jax_cpu_collectives_implementation`` in the pinned JAX (0.10).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import signal

import jax
import numpy as np
from jax._src import distributed as _jax_distributed
from jax.experimental import multihost_utils

from ultramem_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Launch:
  """How train.py was asked to join a multi-process run.

  ``detect``: JAX finds the cluster itself (Cloud TPU pod slice metadata,
  SLURM, Open MPI, Kubernetes), so every host runs the same command.
  ``coordinator``/``num_processes``/``process_id``: given explicitly, all
  three or none (localhost, or clusters JAX does not know)."""
  detect: bool = False
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  # Seconds after which a process that stopped responding is taken for dead
  # and every process stops (parallel/failure.py).
  failure_timeout: float = 60.0

  @property
  def explicit(self) -> bool:
    return self.coordinator is not None

  @property
  def enabled(self) -> bool:
    return self.detect or self.explicit


def launch_error(launch: Launch) -> str | None:
  """What is wrong with the distributed arguments, or None; needs no JAX
  backend, so a bad command line stops before anything starts."""
  if not launch.failure_timeout >= 1:
    return (f"--failure_timeout: got {launch.failure_timeout}; must be at least "
            "1 (seconds)")
  given = {"--coordinator": launch.coordinator,
           "--num_processes": launch.num_processes,
           "--process_id": launch.process_id}
  missing = [flag for flag, value in given.items() if value is None]
  if len(missing) == len(given):
    return None
  if missing:
    return (f"{' and '.join(missing)} missing: --coordinator, --num_processes "
            "and --process_id go together (or use --distributed alone on a "
            "cluster JAX detects: Cloud TPU pod slice, SLURM, Open MPI)")
  host, colon, port = launch.coordinator.rpartition(":")
  if not (colon and host and port.isdigit() and 0 < int(port) < 65536):
    return (f"--coordinator: got {launch.coordinator!r}; expected HOST:PORT of "
            "process 0, the same on every process (e.g. localhost:12355)")
  if launch.num_processes < 1:
    return f"--num_processes: got {launch.num_processes}; must be at least 1"
  if not 0 <= launch.process_id < launch.num_processes:
    return (f"--process_id: got {launch.process_id}; must be in 0.."
            f"{launch.num_processes - 1} (--num_processes={launch.num_processes})")
  return None


def initialize(launch: Launch) -> None:
  """Joins the run with ``jax.distributed.initialize`` (blocks until every
  process has joined). Must come before any JAX computation or device query.

  JAX's own heartbeat and shutdown timeouts are twice the failure timeout:
  the watcher of parallel/failure.py detects a dead process first and says
  which; JAX's abort stays as the backstop.

  Raises ConfigError when --distributed finds no cluster to join."""
  backstop = int(math.ceil(2 * launch.failure_timeout))
  try:
    jax.distributed.initialize(launch.coordinator, launch.num_processes,
                               launch.process_id,
                               heartbeat_timeout_seconds=backstop,
                               shutdown_timeout_seconds=backstop)
  except ValueError as e:
    if launch.explicit:
      raise
    raise ConfigError(
        f"--distributed: JAX detected no cluster to join ({e}); outside a "
        "Cloud TPU pod slice, SLURM or Open MPI, give --coordinator HOST:PORT "
        "--num_processes N --process_id I to every process") from e


def describe() -> str:
  """One line on this process's place in the run (for its log)."""
  # The coordinator JAX settled on (perhaps detected) has no public API.
  coordinator = getattr(_jax_distributed.global_state, "coordinator_address",
                        None) or "none"
  return (f"distributed: process {jax.process_index()} of "
          f"{jax.process_count()}, coordinator {coordinator}, "
          f"{jax.local_device_count()} local / {jax.device_count()} global "
          f"{jax.default_backend()} devices")


def batch_shard(sharding: jax.sharding.Sharding, batch_size: int) -> tuple[int, int]:
  """(i, n): under `sharding`, this process's devices hold 1/n of the rows of
  each global batch of `batch_size`, and it is the i-th distinct such part.

  A process reads rows of its part only, and replicas read the same part, as
  ``jax.make_array_from_process_local_data`` requires. One process: (0, 1)."""
  rows: dict[int, set[int]] = {}
  for device, index in sharding.devices_indices_map((batch_size, 1)).items():
    rows.setdefault(device.process_index, set()).update(
        range(batch_size)[index[0]])
  parts = sorted({frozenset(r) for r in rows.values()}, key=min)
  if sum(len(p) for p in parts) != batch_size or len({len(p) for p in parts}) != 1:
    raise ConfigError(
        f"mesh: the batch axes split a batch of {batch_size} rows unevenly over "
        f"the {jax.process_count()} processes (their parts overlap or differ in "
        "size); choose mesh sizes whose batch axes span whole processes")
  return parts.index(frozenset(rows[jax.process_index()])), len(parts)


def processes_differing(*arrays: np.ndarray) -> list[int]:
  """Processes whose `arrays` differ from process 0's (compared by digest);
  [] in a single-process run or when all agree. Every process must call it."""
  if jax.process_count() == 1:
    return []
  digest = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(a)
    digest.update(f"{a.dtype}{a.shape}".encode())
    digest.update(a.tobytes())
  words = np.frombuffer(digest.digest(), np.uint32)
  every = np.asarray(multihost_utils.process_allgather(words))
  return [p for p in range(len(every)) if not np.array_equal(every[p], every[0])]


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (no-op alone)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def agreed_signal(local: str | None) -> str | None:
  """The stop signal every process acts on: `local` (this process's, or
  None) gathered from all, so that all stop after the same step and save
  the same checkpoint. "SIGTERM on process 1" when it came from one of
  several; None when no process got one. Every process must call it."""
  if jax.process_count() == 1:
    return local
  number = int(signal.Signals[local]) if local else 0
  every = np.asarray(multihost_utils.process_allgather(np.int32(number))).ravel()
  got = [p for p, n in enumerate(every) if n]
  if not got:
    return None
  name = signal.Signals(int(every[got[0]])).name
  where = ("every process" if len(got) == len(every) else
           f"process {got[0]}" if len(got) == 1 else f"processes {got}")
  return f"{name} on {where}"


# Waits on other processes' values: long, since a slow host (a big restore)
# is not a failure; a dead one is caught by parallel/failure.py's watcher.
EXCHANGE_TIMEOUT_S = 1800


def gather_text(name: str, text: str) -> list[str]:
  """Every process's `text` under the run-unique `name`, by process index,
  through the coordination service's key-value store ([text] alone)."""
  client = _jax_distributed.global_state.client
  if jax.process_count() == 1 or client is None:
    return [text]
  client.key_value_set(f"ultramem/{name}/{jax.process_index()}", text)
  return [client.blocking_key_value_get(f"ultramem/{name}/{p}",
                                        EXCHANGE_TIMEOUT_S * 1000)
          for p in range(jax.process_count())]


def from_process_0(name: str, text: str | None) -> str:
  """Process 0's `text` (which the others pass as None) on every process."""
  client = _jax_distributed.global_state.client
  if jax.process_count() == 1 or client is None:
    return text
  if jax.process_index() == 0:
    client.key_value_set(f"ultramem/{name}", text)
    return text
  return client.blocking_key_value_get(f"ultramem/{name}",
                                       EXCHANGE_TIMEOUT_S * 1000)
