"""Orbax checkpoints of one run: train state, data-iterator position, config.

A checkpoint step directory holds three items: ``state`` (model parameters,
buffers and optimizer state, restored with their shardings), ``data`` (the
grain iterator's position) and ``meta`` (the resolved config, the step's
metrics and a fingerprint of every array). Orbax writes each step into a
temporary directory and renames it when complete, so a step that is listed
is whole; the fingerprints catch what orbax cannot see, such as a file
truncated or deleted afterwards (a missing array chunk would otherwise be
read back as zeros).

:meth:`Checkpointer.restore_latest` walks back from the newest step until
one restores and verifies; each one that does not is reported and moved
aside to ``<checkpoints>.unreadable/`` (never deleted). A checkpoint whose
shapes differ from the model's is a configuration error, not damage: it
stops the run with the first mismatched parameter named.

Saves are asynchronous: :meth:`Checkpointer.save` copies the state to host
memory and returns while orbax writes the files in a background thread.
The next save, :meth:`wait` and :meth:`close` (the end of the run, a stop
by a signal) wait for the write in flight. DEBUG logs record each save's
start, the loop's wait (``last_blocking_sec``), its files written, and done.

A save that runs out of disk space raises :class:`CheckpointDiskFull`
(naming the directory, the space the save needs and the space free): before
it starts when the free space is below the size of the last checkpoint (or,
for the first one, the bytes of the state), or as soon as the asynchronous
write fails (:meth:`Checkpointer.check_for_errors`, called every step). The
failed step's partial directory is removed; the checkpoints before it are
left as they were.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import pathlib
import shutil
import sys
import time
import traceback
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
from jax.experimental.compute_on import compute_on
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store

from ultramem_jax.config import ConfigError
from ultramem_jax.parallel.host_tables import on_host

logger = logging.getLogger(__name__)


class CheckpointMismatch(ConfigError):
  """The checkpoint was written for a model of other shapes."""


class CheckpointDiskFull(OSError):
  """A checkpoint could not be written for lack of disk space."""


_NO_SPACE = (f"[Errno {errno.ENOSPC}]", "No space left on device",
             f"os_error_code='{errno.ENOSPC}'")


def _is_no_space(e: BaseException) -> bool:
  """Whether `e` (or an exception it was raised from) is ENOSPC; orbax and
  tensorstore re-raise it as ValueError / RuntimeError with the text."""
  while e is not None:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
      return True
    if any(mark in str(e) for mark in _NO_SPACE):
      return True
    e = e.__cause__ or e.__context__
  return False


def _megabytes(n: int) -> str:
  return f"{n / 1e6:.1f} MB"


def _tree_bytes(path: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _from_orbax(obj) -> bool:
  code = getattr(obj, "cr_code", None) or getattr(obj, "__code__", None)
  return "orbax" in getattr(code, "co_filename", "")


class _QuietAbandonedWrites(logging.Filter):
  """Drops the logged copies of an out-of-space error from orbax's writes:
  orbax's own (each array's write logs its traceback) and asyncio's "Task
  exception was never retrieved" for an orbax write task that failed after
  the first failure was taken (logged when the task is collected, possibly at
  exit). The error itself reaches the trainer, which reports it once."""

  def filter(self, record: logging.LogRecord) -> bool:
    text = record.getMessage()
    error = record.exc_info[1] if record.exc_info else None
    if record.levelno < logging.ERROR or not (
        "orbax" in record.pathname or "orbax" in text or _raised_in_orbax(error)):
      return True
    if error is not None:
      text += str(error)
    return not any(mark in text for mark in _NO_SPACE)


def _raised_in_orbax(error: BaseException | None) -> bool:
  """Whether `error`'s traceback passes through orbax's code (a gathered
  future's log names no coroutine, only the error)."""
  return any("orbax" in frame.f_code.co_filename for frame, _ in
             traceback.walk_tb(getattr(error, "__traceback__", None)))


def _install_quiet_hooks() -> None:
  """When one of orbax's reads or writes fails, orbax closes its event loop
  while tensorstore still completes the others, whose callbacks then report
  ``RuntimeError: Event loop is closed`` (and, at exit, the abandoned
  coroutines their own errors) through sys.unraisablehook: one traceback per
  array, after the failure has been reported or recovered from. Those are
  dropped; every other unraisable error goes to the previous hook."""
  previous = sys.unraisablehook
  if getattr(previous, "_ultramem_quiet", False):
    return

  def hook(unraisable) -> None:
    value = unraisable.exc_value
    if ((isinstance(value, RuntimeError) and str(value) == "Event loop is closed")
        or _from_orbax(unraisable.object)):
      return
    previous(unraisable)

  hook._ultramem_quiet = True
  sys.unraisablehook = hook
  quiet = _QuietAbandonedWrites()
  logging.getLogger("absl").addFilter(quiet)
  logging.getLogger("asyncio").addFilter(quiet)


# Replica-parallel saving (orbax's default off GPU) has each of an array's
# R replicas write 1/R of it, which spreads a big table's write over the
# hosts of a pod. Below this many bytes per replica the split buys nothing
# and costs a slice per replica, dispatched one by one before the save
# returns (an 8-way data-parallel run of a tiny config: about 260 slices per
# save, 0.25 s of its 0.4 s); such arrays are written whole by one replica.
MIN_REPLICA_SLICE_BYTES = 1 << 20


@functools.cache
def _register_array_handler() -> None:
  """Orbax's handler of jax.Array for every save in this process, with
  :data:`MIN_REPLICA_SLICE_BYTES` (otherwise orbax's defaults), registered
  once, without orbax's warning that it replaces the default one."""
  handler = ocp.type_handlers.ArrayHandler(
      min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
      array_metadata_store=array_metadata_store.Store())
  absl = logging.getLogger("absl")
  level = absl.level
  absl.setLevel(logging.ERROR)
  try:
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  finally:
    absl.setLevel(level)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                  for k in path)


def _readable(key: str) -> str:
  """'0/blocks/3/attn/wq/value' -> 'model/blocks/3/attn/wq' ('1/...' is
  the optimizer's)."""
  head, _, rest = key.removesuffix("/value").partition("/")
  return {"0": "model", "1": "optimizer"}.get(head, head) + ("/" + rest if rest else "")


def _leaves(tree: Any) -> dict[str, Any]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_path_str(p): x for p, x in flat}


@jax.jit
def _fingerprints(arrays: list[jax.Array]) -> list[jax.Array]:
  """Per array, the sum of its bit patterns modulo 2**32: exact, and the
  same for any sharding or reduction order."""
  out = []
  for x in arrays:
    size = x.dtype.itemsize
    if size == 1:
      bits = x.astype(jnp.uint8).astype(jnp.uint32)
    elif size == 2:
      bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    else:
      bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    out.append(jnp.sum(bits, dtype=jnp.uint32))
  return out


def fingerprint(state: Any) -> dict[str, int]:
  """{path: fingerprint} of every numeric array of `state`."""
  leaves = {k: v for k, v in _leaves(state).items()
            if isinstance(v, jax.Array) and not jax.dtypes.issubdtype(
                v.dtype, jax.dtypes.prng_key)}
  host = [k for k, v in leaves.items() if on_host(v)]
  device = [k for k, v in leaves.items() if not on_host(v)]
  values = dict(zip(device, jax.device_get(_fingerprints([leaves[k] for k in device]))))
  if host:   # tables in host memory (table_memory=host): summed on the host
    values.update(zip(host, jax.device_get(_host_fingerprints([leaves[k] for k in host]))))
  return {k: int(values[k]) for k in leaves}


@jax.jit
def _host_fingerprints(arrays: list[jax.Array]) -> list[jax.Array]:
  """:func:`_fingerprints` of arrays in host memory, computed there."""
  return compute_on("device_host")(_fingerprints)(arrays)


class Checkpointer:

  def __init__(self, directory: str | pathlib.Path, max_to_keep: int):
    self.directory = pathlib.Path(directory).absolute()
    self.max_to_keep = max_to_keep
    self._failed: CheckpointDiskFull | None = None
    self._pending: int | None = None    # the step being written
    self._estimate = ""                 # what the last save was expected to need
    self._writing: int | None = None    # the step the background thread writes
    self.last_blocking_sec = 0.0        # the loop's wait in the last save()
    _install_quiet_hooks()
    _register_array_handler()
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    """Asynchronous saves (explicitly: orbax's default), with a callback
    from the writing thread once a step's files are written (before orbax
    renames its temporary directory into place)."""
    return ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=self.max_to_keep, create=True,
            enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(
                post_finalization_callback=self._written)),
        item_names=("state", "data", "meta"))

  def _written(self) -> None:
    logger.debug("checkpoint %s: files written in the background", self._writing)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iter: grain.DatasetIterator,
           meta: dict) -> None:
    """Starts writing checkpoint `step` (asynchronously: it returns once
    the state is copied to host memory) after waiting for the save in
    flight. Raises CheckpointDiskFull, before writing anything, when the
    last save failed for lack of space or this one cannot fit."""
    t0 = time.perf_counter()
    self.wait()  # the previous save's error, and its size on disk
    waited = time.perf_counter() - t0
    self._check_space(step, state)
    meta = {**meta, "fingerprints": fingerprint(state)}
    self._pending = self._writing = step
    logger.debug("checkpoint %d: save started", step)
    with self._translate(step):
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=grain.checkpoint.CheckpointSave(data_iter),
          meta=ocp.args.JsonSave(meta)))
    self.last_blocking_sec = time.perf_counter() - t0
    logger.debug("checkpoint %d: the loop goes on after %.3f s (%.3f s of it "
                 "waiting for the previous save)", step, self.last_blocking_sec,
                 waited)

  def _needed(self, state: Any) -> tuple[int, str]:
    """(bytes, what they are): the size of the newest checkpoint on disk,
    else the bytes of the state's arrays."""
    steps = self.all_steps()
    if steps:
      return (_tree_bytes(self.directory / str(steps[-1])),
              f"the size of checkpoint {steps[-1]}")
    return (sum(x.nbytes for x in _leaves(state).values()
                if isinstance(x, jax.Array)), "the size of the train state")

  def _check_space(self, step: int, state: Any) -> None:
    needed, what = self._needed(state)
    free = shutil.disk_usage(self.directory).free
    self._estimate = f"needs about {_megabytes(needed)} ({what})"
    if free < needed:
      raise self._disk_full(step, f"{self._estimate}, {_megabytes(free)} free")

  def _disk_full(self, step: int, space: str) -> CheckpointDiskFull:
    steps = [s for s in self.all_steps() if s != step]
    kept = (f"the checkpoints before it are intact (latest: {steps[-1]})"
            if steps else "no earlier checkpoint was written")
    self._failed = CheckpointDiskFull(
        errno.ENOSPC,
        f"checkpoint {step}: not enough disk space in {self.directory}: "
        f"{space}; {kept}; free some space and run the same command to resume")
    return self._failed

  @contextlib.contextmanager
  def _translate(self, step: int | None):
    """Turns an out-of-space error of the write of `step` into
    CheckpointDiskFull, removing the step's partial directory."""
    try:
      yield
    except CheckpointDiskFull:
      raise
    except Exception as e:  # noqa: BLE001 (only ENOSPC is translated)
      if step is None or not _is_no_space(e):
        raise
      for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
        shutil.rmtree(partial, ignore_errors=True)
      free = shutil.disk_usage(self.directory).free
      raise self._disk_full(step, f"{self._estimate}; the write ran out of "
                            f"space ({_megabytes(free)} free once its partial "
                            "files were removed)") from None

  def check_for_errors(self) -> None:
    """Raises the error of an asynchronous save that has failed (without
    waiting for one in progress)."""
    if self._failed is not None:
      raise self._failed
    if self._pending is not None and not self._manager.is_saving_in_progress():
      self.wait()

  def check_shapes(self, step: int, abstract_state: Any) -> None:
    """Raises CheckpointMismatch naming the first array whose shape in the
    checkpoint differs from `abstract_state`'s (or that one lacks)."""
    metadata = ocp.StandardCheckpointHandler().metadata(
        self.directory / str(step) / "state")
    saved = getattr(metadata, "item_metadata", metadata)
    have = {k: tuple(v.shape) for k, v in _leaves(saved).items()
            if hasattr(v, "shape")}
    want = {k: tuple(v.shape) for k, v in _leaves(abstract_state).items()}
    for key in sorted(want):
      if key not in have:
        raise CheckpointMismatch(
            f"checkpoint {step}: this config's model has {_readable(key)} "
            f"{want[key]}, which the checkpoint lacks")
      if have[key] != want[key]:
        raise CheckpointMismatch(
            f"checkpoint {step}: {_readable(key)} has shape {have[key]} in the "
            f"checkpoint but {want[key]} in this config")
    extra = sorted(set(have) - set(want))
    if extra:
      raise CheckpointMismatch(
          f"checkpoint {step}: holds {_readable(extra[0])} {have[extra[0]]}, "
          "which this config's model lacks")

  def restore(self, step: int, abstract_state: Any,
              data_iter: grain.DatasetIterator | None = None,
              verify: bool = True) -> tuple[Any, dict]:
    """Restores `state` onto the shardings of `abstract_state` (a tree of
    jax.ShapeDtypeStruct) and verifies its fingerprints; moves `data_iter`
    to its saved position. With ``verify=False`` the fingerprints stay in
    the meta for :meth:`verify` (which every process must then call: it
    computes them over the global arrays)."""
    items = {"state": ocp.args.StandardRestore(abstract_state),
             "meta": ocp.args.JsonRestore()}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    state, meta = restored["state"], dict(restored["meta"])
    if verify:
      self.verify(state, meta.pop("fingerprints", None))
    return state, meta

  @staticmethod
  def verify(state: Any, expected: dict[str, int] | None) -> None:
    """Raises IOError when an array of `state` differs from its saved
    fingerprint (`expected`; None: a checkpoint saved without them)."""
    if expected is not None:
      got = fingerprint(state)
      bad = sorted(k for k in expected if got.get(k) != expected[k])
      if bad:
        raise IOError(f"{len(bad)} array(s) differ from what was saved, "
                      f"first {bad[0]}")

  def restore_latest(self, abstract_state: Any,
                     data_iter: grain.DatasetIterator | None = None,
                     log: Callable[[str], None] = print
                     ) -> tuple[int, Any, dict] | None:
    """(step, state, meta) of the newest checkpoint that restores and
    verifies, or None if there is none; damaged ones are reported and moved
    aside. Shape mismatches raise CheckpointMismatch."""
    for step in sorted(self.all_steps(), reverse=True):
      try:
        self.check_shapes(step, abstract_state)
        state, meta = self.restore(step, abstract_state, data_iter)
        return step, state, meta
      except CheckpointMismatch:
        raise
      except Exception as e:  # noqa: BLE001 (anything unreadable falls back)
        where = self.quarantine(step)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        log(f"checkpoint {step} is damaged ({type(e).__name__}: {reason[:200]}); "
            f"moved it to {where} and trying the one before")
    return None

  def quarantine(self, step: int) -> pathlib.Path:
    """Moves a step directory to <checkpoints>.unreadable/<step>-<time>."""
    dest = self.move_aside(step)
    self.reopen()
    return dest

  def move_aside(self, step: int) -> pathlib.Path:
    """The move of :meth:`quarantine` alone (by one process of several,
    after which every process calls :meth:`reopen`)."""
    dest_dir = self.directory.with_name(self.directory.name + ".unreadable")
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    shutil.move(str(self.directory / str(step)), str(dest))
    return dest

  def reopen(self) -> None:
    """Re-reads the steps on disk (a step was moved aside)."""
    self._manager.close()
    self._manager = self._open()

  def wait(self) -> None:
    """Waits for the save in progress; raises CheckpointDiskFull if it (or
    an earlier one) ran out of space."""
    if self._failed is not None:
      raise self._failed
    step, self._pending = self._pending, None
    with self._translate(step):
      self._manager.wait_until_finished()
    if step is not None:
      logger.debug("checkpoint %d: complete", step)

  def close(self) -> None:
    """Waits for the save in progress and closes; after a failed save the
    error has been raised already and is not raised again."""
    if self._failed is None:
      self.wait()
    try:
      self._manager.close()
    except Exception:  # noqa: BLE001
      if self._failed is None:
        raise


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs (with shardings) describing `state`."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
