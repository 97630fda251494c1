"""One process of a multi-process run fails: every process stops, soon, saying why.

Without this, a process that raises or is killed leaves the others blocked
in their next collective or barrier until JAX's heartbeat timeout (100 s by
default), and then they abort with a coordination-service message that does
not say what went wrong. Here, through the key-value store of JAX's
coordination service (the one ``jax.distributed.initialize`` starts on
process 0):

- a process that fails publishes ``process I failed: <message>`` under one
  run key (:func:`publish`) before it exits; the first failure wins;
- every process runs a watcher thread (:func:`watch`) that sees such a key
  and stops its own process with that message (exit status
  :data:`EXIT_PEER_FAILED`), whatever its main thread is blocked in;
- a process killed outright (SIGKILL, a lost host) publishes nothing, so
  each watcher also beats under ``ultramem/alive/<i>`` every second and
  declares a process dead whose beat has not changed for the failure
  timeout (``--failure_timeout``, 60 s by default), unless it marked
  itself done (a normal exit). JAX's own heartbeat is set to twice that, a
  backstop that no longer decides first.

On CPU, a collective with a killed peer fails at once (gloo: "Connection
closed by peer"); the main thread then waits for the watcher to name the
process that died (:func:`stop_after_error`) rather than report the
collective as its own failure. When process 0, which holds the service,
dies, JAX itself aborts the others as soon as their connection to it
drops (measured on localhost: at once, SIGABRT); the watcher covers a
connection that hangs instead.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import traceback

import jax
from jax._src import distributed as _jax_distributed

FAILED_KEY = "ultramem/failed"
ALIVE_DIR = "ultramem/alive/"
# A process that exits normally says so: its beat stops, it is not dead.
DONE_DIR = "ultramem/done/"
# Exit status of a process stopped because another process of the run failed.
EXIT_PEER_FAILED = 4
# A process that finds another's failure waits this long for its own main
# thread to stop with its own message (the same failure, seen locally) first.
GRACE_S = 2.0

_exiting = threading.Lock()
_watch: dict[str, float] = {}  # {"timeout": seconds} once watch() started


def _client():
  """The coordination-service client, or None outside a multi-process run."""
  return _jax_distributed.global_state.client


def active() -> bool:
  """Whether this is a multi-process run with a watcher."""
  return bool(_watch) and _client() is not None


def timeout_s() -> float:
  return _watch.get("timeout", 60.0)


def exit_now(message: str, status: int) -> None:
  """Prints `message` on stderr and ends the process with `status` at once.

  ``os._exit``: the interpreter's exit would run JAX's shutdown barrier,
  which waits for every process, including a dead one. The first thread
  here wins; another one waits for it to end the process."""
  if not _exiting.acquire(blocking=False):
    time.sleep(3600)  # the first thread ends the process meanwhile
  try:
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
  finally:
    os._exit(status)


def publish(message: str, process: int | None = None) -> None:
  """Tells every process that `process` (default: this one) failed with
  `message` (no-op alone; a failure already published stays: the first one
  is the cause)."""
  client = _client()
  if client is None:
    return
  process = jax.process_index() if process is None else process
  try:
    client.key_value_set(FAILED_KEY, f"process {process} failed: {message}")
  except Exception:  # noqa: BLE001 (already set, or the service is gone)
    pass


def published_failure(wait_s: float = 0.0) -> str | None:
  """The failure a process published, waiting up to `wait_s`; None if none."""
  client = _client()
  if client is None:
    return None
  try:
    if wait_s > 0:
      return client.blocking_key_value_get(FAILED_KEY, int(wait_s * 1000))
    return client.key_value_try_get(FAILED_KEY)
  except Exception:  # noqa: BLE001 (not found, timed out, service gone)
    return None


def _own(message: str) -> bool:
  return message.startswith(f"process {jax.process_index()} failed:")


def _peer_message(message: str) -> str:
  return (f"error: {message}\nerror: stopping process {jax.process_index()} "
          "too (another process of the run failed; see its log)")


class _Watcher:
  """Beats under ALIVE_DIR, watches the others' beats and FAILED_KEY."""

  def __init__(self, timeout: float):
    self.client = _client()
    self.timeout = timeout
    self.me, self.n = jax.process_index(), jax.process_count()
    self.period = min(1.0, timeout / 10)
    now = time.monotonic()
    self.seen: dict[int, tuple[str, float]] = {p: ("", now) for p in range(self.n)}
    self.unreachable_since: float | None = None
    self.stop = threading.Event()

  def run(self) -> None:
    beat = 0
    while not self.stop.wait(self.period):
      beat += 1
      try:
        self.check(beat)
        self.unreachable_since = None
      except Exception as e:  # noqa: BLE001 (the coordination service is gone)
        now = time.monotonic()
        self.unreachable_since = self.unreachable_since or now
        if now - self.unreachable_since > self.timeout:
          exit_now(_peer_message(
              f"process 0 (the coordinator) stopped responding for "
              f"{self.timeout:.0f}s ({type(e).__name__}: "
              f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); "
              "it was killed or its host failed"), EXIT_PEER_FAILED)

  def check(self, beat: int) -> None:
    self.client.key_value_set(f"{ALIVE_DIR}{self.me}", str(beat),
                              allow_overwrite=True)
    failure = published_failure()
    if failure and not _own(failure):
      time.sleep(GRACE_S)
      exit_now(_peer_message(failure), EXIT_PEER_FAILED)
    now = time.monotonic()
    for key, value in self.client.key_value_dir_get(ALIVE_DIR):
      p = int(key.rpartition("/")[2])
      if self.seen.get(p, ("", now))[0] != value:
        self.seen[p] = (value, now)
    done = {int(k.rpartition("/")[2])
            for k, _ in self.client.key_value_dir_get(DONE_DIR)}
    dead = [p for p, (_, at) in self.seen.items()
            if p != self.me and p not in done and now - at > self.timeout]
    if dead:
      also = f" (nor from process(es) {dead[1:]})" if dead[1:] else ""
      message = (f"stopped responding: no heartbeat for {self.timeout:.0f}s "
                 f"(--failure_timeout){also}; killed, or its host failed")
      publish(message, process=dead[0])
      exit_now(_peer_message(f"process {dead[0]} failed: {message}"),
               EXIT_PEER_FAILED)


def watch(timeout: float) -> None:
  """Starts the watcher thread of this process (after initialize)."""
  if _client() is None or _watch:
    return
  _watch["timeout"] = float(timeout)
  watcher = _Watcher(timeout)
  thread = threading.Thread(target=watcher.run, name="failure-watch",
                            daemon=True)
  thread.start()

  def finish() -> None:
    """At a normal exit (registered after JAX's own exit handler, so run
    before it shuts the client down): marks this process done, so that
    the others do not take its silence for death, and stops the watcher."""
    try:
      watcher.client.key_value_set(f"{DONE_DIR}{watcher.me}", "1")
    except Exception:  # noqa: BLE001 (the service is gone)
      pass
    watcher.stop.set()
    thread.join(timeout=5)

  atexit.register(finish)


def stop_all(message: str, status: int) -> int:
  """After this process's own failure: tells the others, then ends with
  `status` (multi-process); alone, returns `status` after printing."""
  if not active():
    print(message, file=sys.stderr)
    return status
  publish(message.removeprefix("error: "))
  exit_now(message, status)
  return status  # not reached


def stop_after_error(error: BaseException) -> None:
  """An unexpected exception in a multi-process run: if another process
  failed first (its failure published, or it died, which the watcher finds
  within the failure timeout), stops with that message; otherwise the
  failure is this process's own: prints the traceback, publishes it and
  exits with status 1."""
  failure = published_failure(wait_s=GRACE_S)
  if failure is None and isinstance(error, jax.errors.JaxRuntimeError):
    # A collective with a dead peer: the watcher names it (and ends this
    # process), or the wait ends. The get returns early when the service
    # itself is gone, hence the loop.
    deadline = time.monotonic() + timeout_s() + 2 * GRACE_S
    while failure is None and time.monotonic() < deadline:
      failure = published_failure(wait_s=min(1.0, deadline - time.monotonic()))
      if failure is None:
        time.sleep(0.2)
  if failure and not _own(failure):
    exit_now(_peer_message(failure), EXIT_PEER_FAILED)
  text = "".join(traceback.format_exception(error)).rstrip()
  reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
  publish(f"{type(error).__name__}: {reason}")
  exit_now(f"{text}\nerror: process {jax.process_index()} failed "
           f"({type(error).__name__}: {reason}); stopping every process",
           1)
