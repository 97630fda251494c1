"""One training at a time in a run directory (training/run_lock.py): a
second train.py is refused before it writes anything while the first trains
on, eval.py reads the directory meanwhile, and stale locks are taken over on
the owner's host and refused from another."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from test_robustness import SMALL
from ultramem_jax.config import ConfigError
from ultramem_jax.evaluation.restore import load_run_config, restore_listed
from ultramem_jax.training.config import load_config
from ultramem_jax.training.run_dir import RunDir
from ultramem_jax.training.run_lock import LOCK_FILE, RunLock
from ultramem_jax.training.trainer import train

REPO = pathlib.Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
  env = dict(os.environ)
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _train_cmd(run_dir, source, *extra):
  return [sys.executable, str(REPO / "train.py"), "--config",
          str(REPO / "configs/tiny_dense.yaml"), *SMALL, f"data.source={source}",
          f"train.run_dir={run_dir}", *extra]


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def _write_lock(root: pathlib.Path, **owner) -> pathlib.Path:
  root.mkdir(parents=True, exist_ok=True)
  path = root / LOCK_FILE
  record = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": None,
            "started": "2026-01-01 00:00:00 UTC", "token": "x", **owner}
  path.write_text(json.dumps(record))
  return path


# ----------------------------------------------------------------------------- the lock


def test_lock_records_the_owner_and_refuses_a_second(tmp_path):
  root = tmp_path / "a" / "run"
  first = RunLock(root, print)
  first.acquire()
  owner = json.loads((root / LOCK_FILE).read_text())
  assert owner["host"] == socket.gethostname() and owner["pid"] == os.getpid()
  assert owner["started"] and owner["pid_start"]
  with pytest.raises(ConfigError, match=(
      rf"train.run_dir: '{root}' is in use by another training \(host "
      rf"'{socket.gethostname()}', pid {os.getpid()}, started .*still running")):
    RunLock(root, print).acquire()
  assert json.loads((root / LOCK_FILE).read_text()) == owner  # untouched
  first.release()
  assert not (root / LOCK_FILE).exists()
  assert not (tmp_path / "a").exists()  # the directories it made, left empty


def test_stale_lock_on_this_host_is_taken_over(tmp_path):
  messages = []
  dead = _dead_pid()
  path = _write_lock(tmp_path / "run", pid=dead)
  lock = RunLock(tmp_path / "run", messages.append)
  lock.acquire()
  assert json.loads(path.read_text())["pid"] == os.getpid()
  assert any("took over" in m and f"pid {dead}" in m and "no longer running" in m
             for m in messages), messages
  lock.release()
  assert not path.exists() and (tmp_path / "run").is_dir()  # it was there before


def test_reused_pid_is_stale(tmp_path):
  # This process's pid, but another start time: an earlier owner's pid reused.
  path = _write_lock(tmp_path / "run", pid_start="1")
  lock = RunLock(tmp_path / "run", lambda s: None)
  lock.acquire()
  assert json.loads(path.read_text())["pid_start"] != "1"
  lock.release()


def test_lock_of_another_host_is_refused_with_how_to_remove_it(tmp_path):
  path = _write_lock(tmp_path / "run", host="elsewhere-7", pid=_dead_pid())
  before = path.read_bytes()
  with pytest.raises(ConfigError, match=(
      r"in use by another training \(host 'elsewhere-7', pid \d+, .*cannot be "
      rf"checked from here.*if you know it is no longer running, delete "
      rf"'{path}'")):
    RunLock(tmp_path / "run", print).acquire()
  assert path.read_bytes() == before


def test_unreadable_lock_is_refused(tmp_path):
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / LOCK_FILE).write_text("{not json")
  with pytest.raises(ConfigError, match=r"lock file .* that is not readable"):
    RunLock(tmp_path / "run", print).acquire()


def test_run_dir_names_its_lock(tmp_path):
  run = RunDir(tmp_path / "run")
  assert run.lock_file == tmp_path / "run" / LOCK_FILE
  with run.lock(print):
    assert run.lock_file.exists()
    with pytest.raises(ConfigError, match="in use by another training"):
      with run.lock(print):
        pass
    assert run.lock_file.exists()  # the refused one leaves it
  assert not run.lock_file.exists()


# ----------------------------------------------------------------------------- two runs


def _wait_for_checkpoint(run_dir: pathlib.Path, proc, timeout=240) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"training exited early: {proc.communicate()}")
    if RunDir(run_dir).checkpoint_steps():
      return
    time.sleep(0.1)
  raise AssertionError("no checkpoint in time")


def _records(run_dir: pathlib.Path) -> list[int]:
  return [json.loads(line)["step"]
          for line in (run_dir / "metrics.jsonl").read_text().splitlines()
          if "train/loss" in line]


def test_second_training_is_refused_while_the_first_trains_and_eval_reads(
    tmp_path, text_dir):
  run_dir = tmp_path / "run"
  first = subprocess.Popen(
      _train_cmd(run_dir, text_dir, "train.steps=100000",
                 "train.checkpoint_every=5", "train.max_to_keep=2"),
      cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)
  try:
    _wait_for_checkpoint(run_dir, first)
    written = {p: p.read_bytes() for p in (run_dir / "config.yaml",
                                           run_dir / "tokenizer.json")}
    second = subprocess.run(
        _train_cmd(run_dir, text_dir, "train.steps=500", "optimizer.lr=1e-2",
                   "train.checkpoint_every=2"),
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, second.stderr
    assert (f"error: train.run_dir: '{run_dir}' is in use by another training "
            f"(host '{socket.gethostname()}', pid {first.pid}, started ") in second.stderr
    assert "still running" in second.stderr
    assert {p: p.read_bytes() for p in written} == written
    assert first.poll() is None  # the first trains on

    # eval.py reads the directory being trained (a complete checkpoint only),
    # while the training saves and deletes checkpoints.
    evaluated = subprocess.run(
        [sys.executable, str(REPO / "eval.py"), "loss", "--run_dir", str(run_dir),
         "--no_progress", "--position_corpora", "none", "--out",
         str(tmp_path / "eval")],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == first.pid
    assert first.poll() is None
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=300)
  finally:
    if first.poll() is None:
      first.kill()
  assert first.returncode == 0, err
  step = int(out.split("stopped by SIGTERM after step ")[1].split(";")[0])
  assert step > 5
  assert "Unable to find the step" not in out + err
  assert _records(run_dir) == list(range(1, step + 1))  # each step once
  assert RunDir(run_dir).checkpoint_steps() == [(step - 1) // 5 * 5, step]
  assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()
                if not p.name.isdigit()) == []  # eval wrote nothing there
  assert not (run_dir / LOCK_FILE).exists()


def test_eval_reads_the_newest_step_when_the_training_deletes_its_step(
    tmp_path, text_dir):
  run_dir = tmp_path / "run"
  train(load_config(REPO / "configs/tiny_dense.yaml",
                    SMALL + [f"data.source={text_dir}", f"train.run_dir={run_dir}",
                             "train.steps=4", "train.checkpoint_every=2"]),
        log=lambda s: None)
  run = RunDir(run_dir)
  assert run.checkpoint_steps() == [2, 4]
  cfg = load_run_config(run_dir, [])
  shutil.rmtree(run.checkpoint(2))  # as the training's max_to_keep does
  *_, step = restore_listed(cfg, run, 2, pinned=False)
  assert step == 4
  shutil.rmtree(run.checkpoint(4))
  (run.checkpoint(6)).mkdir()  # another step, still incomplete: not read
  with pytest.raises(ConfigError, match=r"--step: checkpoint 4 of .* was deleted "
                     r"while it was read .*train.max_to_keep=\d+\); the run has "
                     r"checkpoints at steps \[\]"):
    restore_listed(cfg, run, 4, pinned=False)
