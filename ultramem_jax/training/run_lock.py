"""One training at a time in a run directory: ``<run_dir>/train.lock``.

Two trainings in one directory would resume from each other's checkpoints,
delete each other's steps and interleave their metrics, so the directory
belongs to one training while it runs. The owner is recorded in the lock
file as JSON: host name, pid, the pid's start time (to tell a reused pid
from the owner), the start time of the run and its command line.

The file is created whole and atomically: written under a unique name, then
hard-linked to ``train.lock`` (a link fails if the name exists, on NFS too,
the classic lock-file protocol of shared filesystems); where hard links are
not supported, ``O_CREAT | O_EXCL``. fcntl/flock locks are not used: on
NFS, Lustre and FUSE filesystems they are emulated, disabled or absent.

Only process 0 of a multi-process run takes the lock; it tells the others
whether it got it, so one run's processes never refuse each other.

A lock left by a process that died without releasing it (SIGKILL, a crash,
a lost machine) is stale. On the owner's host that is checked (pid not
alive, or alive with another start time) and the lock is taken over with a
message. From another host a live owner cannot be checked: the training is
refused with how to remove the lock once its owner is known to be gone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import socket
import sys
import time
import uuid
from typing import Callable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from ultramem_jax.config import ConfigError

LOCK_FILE = "train.lock"


def _pid_start(pid: int) -> str | None:
  """The start time of process `pid` in clock ticks since boot (field 22 of
  /proc/<pid>/stat), or None where /proc does not say."""
  try:
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
  except OSError:
    return None
  # The command name (field 2) is in parentheses and may hold spaces.
  fields = stat.rpartition(")")[2].split()
  return fields[19] if len(fields) > 19 else None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


def _owner_record() -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "pid_start": _pid_start(os.getpid()),
          "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
          "command": " ".join(sys.argv)[:500], "token": uuid.uuid4().hex}


def _describe(owner: dict) -> str:
  return (f"host {owner.get('host')!r}, pid {owner.get('pid')}, started "
          f"{owner.get('started')}")


def _is_stale(owner: dict) -> bool:
  """Whether the owner of a lock on this host is certainly gone."""
  pid = owner.get("pid")
  if not isinstance(pid, int):
    return False
  if not _pid_alive(pid):
    return True
  recorded, now = owner.get("pid_start"), _pid_start(pid)
  return recorded is not None and now is not None and recorded != now


class RunLock:
  """The lock of one run directory, taken by :meth:`acquire` and given back
  by :meth:`release`; directories it had to create for the lock file are
  removed again on release when they are left empty."""

  def __init__(self, root: pathlib.Path, log: Callable[[str], None]):
    self.root = pathlib.Path(root)
    self.path = self.root / LOCK_FILE
    self._log = log
    self._record: dict | None = None
    self._created: list[pathlib.Path] = []

  # ------------------------------------------------------------ the file

  def _read(self, path: pathlib.Path | None = None) -> tuple[bytes, dict | None]:
    """(raw bytes, owner record or None when unreadable) of a lock file."""
    raw = (path or self.path).read_bytes()
    try:
      owner = json.loads(raw)
    except ValueError:
      return raw, None
    return raw, owner if isinstance(owner, dict) else None

  def _create(self, data: bytes) -> bool:
    """Creates the lock file holding `data`; False if it exists."""
    tmp = self.root / f".{LOCK_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp.write_bytes(data)
    try:
      os.link(tmp, self.path)
      return True
    except FileExistsError:
      return False
    except OSError as e:  # no hard links here: O_EXCL
      if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
        raise
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, "wb") as f:
        f.write(data)
      return True
    finally:
      tmp.unlink(missing_ok=True)

  def _make_root(self) -> None:
    missing = []
    for d in (self.root, *self.root.parents):
      if d.exists():
        break
      missing.append(d)
    self.root.mkdir(parents=True, exist_ok=True)
    self._created = missing  # innermost first

  # ------------------------------------------------------------ taking it

  def acquire(self) -> None:
    """Takes the lock, or raises ConfigError naming the directory and the
    owner (taking over a stale one on this host, with a message)."""
    self._make_root()
    record = _owner_record()
    data = json.dumps(record, indent=1).encode() + b"\n"
    try:
      for _ in range(5):
        if self._create(data):
          self._record = record
          return
        self._handle_existing()
      raise ConfigError(f"train.run_dir: could not take {str(self.path)!r}: "
                        "other trainings keep taking it")
    except BaseException:
      self._remove_created()
      raise

  def _handle_existing(self) -> None:
    """Refuses (ConfigError) unless the existing lock is stale; a stale one
    is removed, for the caller to try again."""
    try:
      raw, owner = self._read()
    except FileNotFoundError:  # released meanwhile
      return
    if owner is None:
      raise ConfigError(
          f"train.run_dir: {str(self.root)!r} holds a lock file {str(self.path)!r} "
          f"that is not readable ({raw[:80]!r}); if no training runs in this "
          "directory, delete that file and start again")
    here = socket.gethostname()
    if owner.get("host") != here:
      raise ConfigError(
          f"train.run_dir: {str(self.root)!r} is in use by another training "
          f"({_describe(owner)}); its host is not this one ({here!r}), so "
          "whether it still runs cannot be checked from here; wait for it to "
          "end or use another train.run_dir, and if you know it is no longer "
          f"running, delete {str(self.path)!r} and start again")
    if not _is_stale(owner):
      raise ConfigError(
          f"train.run_dir: {str(self.root)!r} is in use by another training "
          f"({_describe(owner)}, still running; lock file {str(self.path)!r}); "
          "wait for it to end, stop it, or use another train.run_dir")
    self._take_over(raw, owner)

  def _take_over(self, raw: bytes, owner: dict) -> None:
    """Moves the stale lock aside under a unique name; if what was moved is
    not the stale lock (another training took it over first), puts it back."""
    aside = self.root / f".{LOCK_FILE}.stale.{uuid.uuid4().hex[:8]}"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return
    if aside.read_bytes() == raw:
      aside.unlink()
      self._log(f"train.run_dir: took over {str(self.path)!r} from a training "
                f"that is no longer running ({_describe(owner)})")
      return
    with contextlib.suppress(FileExistsError):
      os.link(aside, self.path)
    aside.unlink()

  # ------------------------------------------------------------ giving it back

  def follow(self, old_root: pathlib.Path) -> None:
    """After the run directory was renamed to `old_root` (moved aside) and
    created anew: moves the lock file back into the new one."""
    if self._record is None:
      return
    self.root.mkdir(parents=True, exist_ok=True)
    old = pathlib.Path(old_root) / LOCK_FILE
    try:
      os.link(old, self.path)
    except FileExistsError:
      raise ConfigError(
          f"train.run_dir: another training took {str(self.root)!r} while the "
          f"previous run was moved to {str(old_root)!r}") from None
    old.unlink()

  def release(self) -> None:
    """Removes the lock file if it is still this training's."""
    if self._record is not None:
      with contextlib.suppress(OSError):
        _, owner = self._read()
        if owner and owner.get("token") == self._record["token"]:
          self.path.unlink()
      self._record = None
    self._remove_created()

  def _remove_created(self) -> None:
    for d in self._created:
      try:
        d.rmdir()
      except OSError:  # not empty: something else was written there
        break
    self._created = []


@contextlib.contextmanager
def hold(root: pathlib.Path, log: Callable[[str], None]) -> Iterator[RunLock]:
  """Holds the lock of run directory `root` while in use: process 0 takes
  it, and every process stops with ConfigError if it could not."""
  lock = RunLock(root, log)
  error = None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except ConfigError as e:
      error = e
  if jax.process_count() > 1:
    taken = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not taken and error is None:
      error = ConfigError(
          f"train.run_dir: process 0 could not take the lock of "
          f"{str(root)!r} (its log says why)")
  if error is not None:
    raise error
  try:
    yield lock
  finally:
    lock.release()
