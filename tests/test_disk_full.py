"""A full disk during a checkpoint save: one message, exit status 5, the
earlier checkpoints untouched, and a clean resume once space is freed.

The disk is a real one: a small tmpfs mounted on the run's checkpoint
directory (where the machine lets the tests mount one; otherwise those tests
are skipped and only the in-process ones, which fake the free space and the
failed write, run)."""

from __future__ import annotations

import errno
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import pytest

from ultramem_jax.training import checkpoint as checkpoint_lib
from ultramem_jax.training.checkpoint import CheckpointDiskFull, Checkpointer
from ultramem_jax.training.trainer import train

from test_robustness import (REPO, _train_cmd, checkpoint_steps, damage_checkpoint,
                             logged_losses, small)

STEPS = 6
# The free space the tests leave is sized to this model's train state and
# checkpoint (test_robustness's small config has one block).
TWO_BLOCKS = ["model.n_layers=2"]


def _mount_tmpfs(where: pathlib.Path, size: str) -> bool:
  where.mkdir(parents=True, exist_ok=True)
  try:
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                           str(where)], capture_output=True, timeout=30)
  except (OSError, subprocess.SubprocessError):
    return False
  return done.returncode == 0


def _umount(where: pathlib.Path) -> None:
  subprocess.run(["umount", str(where)], capture_output=True, timeout=30)


@pytest.fixture
def small_disk(tmp_path):
  """A run directory whose checkpoints/ is an 8 MiB tmpfs (a checkpoint of
  the small model takes about 0.46 MB: a train state of 0.35 MB, 28,864
  parameters and AdamW's two moments, and orbax's metadata); the tests fill
  it with a file."""
  run = tmp_path / "run"
  if not _mount_tmpfs(run / "checkpoints", "8m"):
    pytest.skip("this machine does not allow mounting a tmpfs")
  yield run
  _umount(run / "checkpoints")


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory, text_dir):
  """An uninterrupted run of the config, checkpoints 2, 4 and 6, trained
  once for the module: the reference losses, and copied by the fixtures
  below."""
  root = tmp_path_factory.mktemp("six_steps")
  train(small(root, text_dir, f"train.steps={STEPS}", "train.checkpoint_every=2",
             *TWO_BLOCKS),
        log=lambda s: None)
  return root / "run"


@pytest.fixture(scope="module")
def reference(six_steps):
  """train/loss by step of an uninterrupted run of the same config."""
  return logged_losses(six_steps)


def _cmd(run, text_dir, steps=STEPS, every=2):
  cmd = _train_cmd(run, text_dir, steps) + TWO_BLOCKS
  cmd[cmd.index("train.checkpoint_every=1000")] = f"train.checkpoint_every={every}"
  return cmd


def _run(cmd):
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def _hashes(directory: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob("*")) if p.is_file()}


def _fill(directory: pathlib.Path, leave: int) -> pathlib.Path:
  """A file that leaves `leave` bytes free on `directory`'s file system."""
  filler = directory / "filler"
  free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
  with open(filler, "wb") as f:
    f.write(b"\0" * max(free - leave, 0))
  return filler


def test_a_checkpoint_that_cannot_fit_stops_the_run_and_it_resumes(
    small_disk, text_dir, reference):
  run, ckpt = small_disk, small_disk / "checkpoints"
  first = _run(_cmd(run, text_dir, steps=2))
  assert first.returncode == 0, first.stderr
  assert checkpoint_steps(run) == [2]
  before = _hashes(ckpt / "2")
  filler = _fill(ckpt, leave=300_000)

  full = _run(_cmd(run, text_dir))
  assert full.returncode == 5, full.stderr
  assert full.stderr.strip().splitlines() == [full.stderr.strip()], full.stderr
  message = full.stderr.strip()
  assert message.startswith(
      f"error: checkpoint 4: not enough disk space in {ckpt}: needs about "), message
  assert "(the size of checkpoint 2)" in message and " MB free" in message
  assert "the checkpoints before it are intact (latest: 2)" in message
  assert "run the same command to resume" in message
  assert "Traceback" not in full.stdout + full.stderr
  assert checkpoint_steps(run) == [2]
  assert _hashes(ckpt / "2") == before
  assert not list(ckpt.glob("*orbax-checkpoint-tmp*"))

  filler.unlink()
  again = _run(_cmd(run, text_dir))
  assert again.returncode == 0, again.stderr
  assert f"resumed from {ckpt / '2'}" in again.stdout
  assert "Traceback" not in again.stderr and "Event loop is closed" not in again.stderr
  assert logged_losses(run) == reference
  assert checkpoint_steps(run) == [2, 4, 6]


def test_a_write_that_runs_out_of_space_stops_the_run_promptly(small_disk, text_dir):
  """The free space passes the check (the state's bytes) but the checkpoint,
  with its metadata, does not fit: the asynchronous write of step 20 fails,
  and the run stops within a few steps, not at the next checkpoint (40)."""
  run, ckpt = small_disk, small_disk / "checkpoints"
  filler = _fill(ckpt, leave=400_000)   # the state's 0.35 MB, not 0.46 MB
  cmd = _cmd(run, text_dir, steps=40, every=20)
  full = _run(cmd)
  assert full.returncode == 5, full.stderr
  message = full.stderr.strip()
  assert message.splitlines() == [message], full.stderr
  assert message.startswith(
      f"error: checkpoint 20: not enough disk space in {ckpt}: needs about "), message
  assert "(the size of the train state); the write ran out of space (" in message
  assert "no earlier checkpoint was written" in message
  assert "Traceback" not in full.stdout + full.stderr
  assert 20 <= max(logged_losses(run)) < 35
  assert checkpoint_steps(run) == []
  assert not list(ckpt.glob("*orbax-checkpoint-tmp*"))

  filler.unlink()
  again = _run(cmd)
  assert again.returncode == 0, again.stderr
  assert "Traceback" not in again.stderr
  assert sorted(logged_losses(run)) == list(range(1, 41))
  assert checkpoint_steps(run) == [20, 40]


# ------------------------------------------------- in process, faked space


@pytest.fixture(scope="module")
def saved(tmp_path_factory, six_steps):
  """A run with checkpoints 2 and 4: a copy of the 6-step run without its
  checkpoint 6 (the checkpointer sees only the step directories)."""
  run = tmp_path_factory.mktemp("saved") / "run"
  shutil.copytree(six_steps, run)
  shutil.rmtree(run / "checkpoints" / "6")
  assert checkpoint_steps(run) == [2, 4]
  return run


def test_save_refused_when_the_free_space_is_below_the_last_checkpoint(
    saved, monkeypatch):
  ckpt = saved / "checkpoints"
  before = _hashes(ckpt)
  real = checkpoint_lib.shutil.disk_usage
  monkeypatch.setattr(checkpoint_lib.shutil, "disk_usage",
                      lambda p: real(p)._replace(free=1000))
  checkpointer = Checkpointer(ckpt, 3)
  try:
    with pytest.raises(CheckpointDiskFull) as info:
      checkpointer.save(6, {"x": jnp.zeros(4)}, None, {})
  finally:
    checkpointer.close()
  assert info.value.errno == errno.ENOSPC
  assert str(info.value.strerror) == (
      f"checkpoint 6: not enough disk space in {ckpt}: needs about "
      f"{checkpoint_lib._tree_bytes(ckpt / '4') / 1e6:.1f} MB (the size of "
      "checkpoint 4), 0.0 MB free; the checkpoints before it are intact "
      "(latest: 4); free some space and run the same command to resume")
  assert _hashes(ckpt) == before


def test_a_failed_async_write_surfaces_at_the_next_check(saved, monkeypatch):
  ckpt = saved / "checkpoints"
  checkpointer = Checkpointer(ckpt, 3)
  failure = ValueError("RESOURCE_EXHAUSTED: Failed to write 73019 bytes to file "
                       "5: No space left on device [os_error_code='28']")

  def failed_wait():
    raise failure

  checkpointer._pending = 6
  monkeypatch.setattr(checkpointer._manager, "is_saving_in_progress", lambda: False)
  monkeypatch.setattr(checkpointer._manager, "wait_until_finished", failed_wait)
  with pytest.raises(CheckpointDiskFull, match="checkpoint 6: not enough disk "
                     "space .* the write ran out of space"):
    checkpointer.check_for_errors()
  with pytest.raises(CheckpointDiskFull):  # and again at the next save, not another error
    checkpointer.save(8, {}, None, {})
  monkeypatch.undo()
  checkpointer.close()  # the error is not raised twice
  assert checkpoint_steps(saved) == [2, 4]


def _abandoned(filename: str, error: Exception, gathered: bool) -> None:
  """Runs, in its own event loop, a coroutine (compiled as if defined in
  `filename`) that raises `error`, as a task or inside asyncio.gather, and
  drops the task or the gathering future unretrieved: asyncio logs "...
  exception was never retrieved" when it is collected, as it does for
  orbax's parallel array writes after the first has failed."""
  import asyncio
  import gc
  scope: dict = {}
  exec(compile("async def write():\n  raise error\n", filename, "exec"),
       {"error": error}, scope)

  async def main():
    future = (asyncio.gather(scope["write"]()) if gathered
              else asyncio.ensure_future(scope["write"]()))
    for _ in range(3):
      await asyncio.sleep(0)
    del future

  asyncio.run(main())
  gc.collect()


NO_SPACE = ("RESOURCE_EXHAUSTED: Failed to write 3264 bytes to file 6: No space left "
            "on device [os_error_code='28']")


@pytest.mark.parametrize("defined_in, error, logged", [
    ("/x/orbax/checkpoint/serialization.py", ValueError(NO_SPACE), False),
    ("/x/orbax/checkpoint/serialization.py", ValueError("another failure"), True),
    ("/x/elsewhere/serialization.py", OSError(errno.ENOSPC, "No space left on device"),
     True),
])
@pytest.mark.parametrize("gathered", [False, True], ids=["task", "gather"])
def test_an_abandoned_orbax_write_out_of_space_is_not_logged_again(
    tmp_path, defined_in, error, logged, gathered, caplog):
  Checkpointer(tmp_path / "checkpoints", 3).close()  # installs the filters
  with caplog.at_level("ERROR", logger="asyncio"):
    _abandoned(defined_in, error, gathered)
  # caplog's handler sits on the root logger, so it sees what the asyncio
  # logger's filters let through.
  found = [r for r in caplog.records if "never retrieved" in r.getMessage()]
  assert len(found) == (1 if logged else 0), [r.getMessage() for r in caplog.records]


# ------------------------------------------- eval.py on a damaged checkpoint


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, six_steps):
  """A run with checkpoints 2, 4 and 6 whose 6 has every array file cut to
  half its length (a copy of the 6-step run)."""
  run = tmp_path_factory.mktemp("damaged") / "run"
  shutil.copytree(six_steps, run)
  damage_checkpoint(run / "checkpoints" / "6")
  return run


@pytest.mark.parametrize("command", [["loss", "--no_progress"],
                                     ["generate", "--prompt", "The",
                                      "--max_new_tokens", "2"]])
def test_eval_on_a_damaged_latest_checkpoint_names_the_steps_that_restore(
    damaged, command):
  before = _hashes(damaged)
  # A fresh process: this one's tensorstore cache holds what it wrote.
  done = subprocess.run([sys.executable, str(REPO / "eval.py"), command[0],
                         "--run_dir", str(damaged), *command[1:]],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 2, done.stderr
  message = done.stderr.strip().splitlines()[-1]
  assert message.startswith(f"error: --step: checkpoint 6 in {damaged / 'checkpoints'} "
                            "is damaged ("), done.stderr
  assert message.endswith("the checkpoints that restore are at steps [2, 4]: "
                          "pass --step 4"), message
  assert "Traceback" not in done.stderr and "Event loop is closed" not in done.stderr
  assert _hashes(damaged) == before  # nothing moved or written
