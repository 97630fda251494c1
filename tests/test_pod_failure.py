"""A pod that stops when one host fails: two ``jax.distributed`` CPU
processes on localhost (one device each, mesh data=2), a tiny dense model.

- process 1 killed with SIGKILL mid-training: process 0 stops within the
  failure timeout, non-zero, naming process 1;
- process 1 raising at a step (``train.fault_raise``): both stop, both
  logs carry its message, neither exits 0;
- SIGTERM to process 1 alone: both stop after the same step with one
  checkpoint; then the latest checkpoint damaged: both resume from the same
  earlier step, process 0 alone having moved it aside; and ``eval.py loss``
  in one process reads the two-process checkpoint.

Timeouts are short (--failure_timeout 8) so the file stays fast.
"""

from __future__ import annotations

import json
import math
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from tests.test_multiprocess import ROOT, environment, free_port, start, wait_all
from tests.test_robustness import damage_checkpoint
from train import main as train_main
from ultramem_jax.parallel import distributed
from ultramem_jax.training.run_dir import checkpoint_steps

FAILURE_TIMEOUT = 8
TINY = ["--config", "configs/tiny_dense.yaml", "model.d_model=32",
        "model.n_layers=1", "model.n_heads=2", "model.ffn.inner_dim=64",
        "data.bpe_vocab_size=300", "data.seq_len=16", "data.batch_size=4",
        "optimizer.warmup_steps=1", "train.log_every=1", "train.eval_every=1000",
        "train.eval_batches=1", "train.progress_bar=false", "mesh.data=2"]


def launch(tmp_path: pathlib.Path, name: str, text_dir, *overrides: str
           ) -> tuple[list[subprocess.Popen], list[pathlib.Path]]:
  """Both processes of one run, each logging to <name>.<i>.log."""
  port = free_port()
  logs = [tmp_path / f"{name}.{i}.log" for i in range(2)]
  procs = [start([f"--coordinator=localhost:{port}", "--num_processes=2",
                  f"--process_id={i}", f"--failure_timeout={FAILURE_TIMEOUT}",
                  *TINY, f"data.source={text_dir}", *overrides], 1, logs[i])
           for i in range(2)]
  return procs, logs


def wait_for(log: pathlib.Path, text: str, proc: subprocess.Popen,
             timeout: float = 300) -> None:
  deadline = time.monotonic() + timeout
  while text not in log.read_text():
    if proc.poll() is not None or time.monotonic() > deadline:
      pytest.fail(f"{text!r} not in {log.name}:\n{log.read_text()[-3000:]}")
    time.sleep(0.2)


@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_process_stops_the_other_within_the_timeout(tmp_path, text_dir,
                                                             victim):
  """Process 1 killed: process 0's watcher names it and exits 4. Process 0
  killed: it held the coordination service, whose loss JAX itself turns
  into an abort of process 1 at once (SIGABRT), naming the leader task."""
  procs, logs = launch(tmp_path, "kill", text_dir, "train.steps=100000",
                       "train.checkpoint_every=100000",
                       f"train.run_dir={tmp_path / 'run'}")
  for proc, log in zip(procs, logs):
    wait_for(log, "compiled the train step", proc)
  time.sleep(1.0)  # training
  procs[victim].send_signal(signal.SIGKILL)
  t_kill = time.monotonic()
  wait_all(procs, logs)
  elapsed = time.monotonic() - t_kill
  survivor = 1 - victim
  out = logs[survivor].read_text()
  assert procs[victim].returncode == -signal.SIGKILL
  if victim == 1:
    assert procs[0].returncode == 4, out[-3000:]
    assert "error: process 1 failed: stopped responding" in out, out[-3000:]
    assert "error: stopping process 0 too" in out
  else:
    assert procs[1].returncode == -signal.SIGABRT, out[-3000:]
    assert ("Failed to send RPC to coordination service. Either the leader "
            "task was preempted/died") in out, out[-3000:]
  # The watcher's timeout, a beat and the grace; far below JAX's 100 s.
  assert elapsed < FAILURE_TIMEOUT + 10, elapsed
  assert checkpoint_steps(tmp_path / "run") == []


def test_an_exception_in_one_process_stops_both(tmp_path, text_dir):
  run = tmp_path / "run"
  procs, logs = launch(tmp_path, "raise", text_dir, "train.steps=100000",
                       "train.checkpoint_every=2", "train.fault_raise=1@5",
                       f"train.run_dir={run}")
  wait_all(procs[1:], logs)
  t_failed = time.monotonic()
  wait_all(procs, logs)
  elapsed = time.monotonic() - t_failed
  out = [log.read_text() for log in logs]
  message = "train.fault_raise: process 1 raises at step 5 (a test fault)"
  assert procs[1].returncode == 1, out[1][-3000:]
  assert f"RuntimeError: {message}" in out[1]
  assert "error: process 1 failed (RuntimeError" in out[1]
  assert procs[0].returncode == 4, out[0][-3000:]
  assert f"error: process 1 failed: RuntimeError: {message}" in out[0]
  assert "error: stopping process 0 too" in out[0]
  assert elapsed < FAILURE_TIMEOUT, elapsed  # the watcher's beat and grace
  # The checkpoints written before the fault are as they were.
  assert checkpoint_steps(run) == [2, 4]


def test_sigterm_to_one_stops_both_at_one_step_and_damage_is_agreed(
    tmp_path, text_dir):
  run = tmp_path / "run"
  common = ["train.checkpoint_every=2", "train.max_to_keep=3",
            f"train.run_dir={run}"]
  procs, logs = launch(tmp_path, "term", text_dir, "train.steps=100000", *common)
  for proc, log in zip(procs, logs):
    wait_for(log, "compiled the train step", proc)
  wait_for(tmp_path / "run" / "metrics.jsonl", '"step": 5,', procs[0])
  procs[1].send_signal(signal.SIGTERM)
  wait_all(procs, logs)
  out = [log.read_text() for log in logs]
  for proc, text in zip(procs, out):
    assert proc.returncode == 0, text[-3000:]
  stopped = [int(text.split("stopped by SIGTERM on process 1 after step ")
                 [1].split(";")[0]) for text in out]
  assert stopped[0] == stopped[1], stopped
  last = stopped[0]
  assert (f"SIGTERM on process 1: every process stops after step {last} with "
          "a checkpoint") in out[0]
  assert "received SIGTERM" not in out[0]
  assert ("received SIGTERM: finishing the steps up to the next log step, "
          "where every process stops,") in out[1]
  assert checkpoint_steps(run)[-1] == last
  assert sorted(p.name for p in (run / "checkpoints" / str(last) / "data").glob(
      "process_*")) == ["process_0-of-2.json", "process_1-of-2.json"]

  # The latest checkpoint damaged: both resume from the one before.
  previous = checkpoint_steps(run)[-2]
  damage_checkpoint(run / "checkpoints" / str(last))
  procs, logs = launch(tmp_path, "resume", text_dir,
                       f"train.steps={last + 1}", *common)
  wait_all(procs, logs)
  out = [log.read_text() for log in logs]
  for proc, text in zip(procs, out):
    assert proc.returncode == 0, text[-3000:]
    assert f"checkpoint {last} is damaged (process " in text
    assert "process 0 moved it to" in text
    assert f"resumed from {run / 'checkpoints' / str(previous)}" in text
  aside = list((run / "checkpoints.unreadable").iterdir())
  assert len(aside) == 1 and aside[0].name.startswith(f"{last}-")
  assert checkpoint_steps(run)[-1] == last + 1

  # One process evaluates the two-process run's checkpoint.
  done = subprocess.run(
      [sys.executable, "eval.py", "loss", "--run_dir", str(run), "--no_progress",
       "--position_corpora", "none", "--out", str(tmp_path / "eval")],
      cwd=ROOT, env=environment(2), capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads((tmp_path / "eval" / f"loss_step{last + 1}.json").read_text())
  assert result["step"] == last + 1
  assert math.isfinite(result["val_loss"])


def test_a_bad_failure_timeout_stops_before_jax_starts(tmp_path, capsys, monkeypatch):
  """train.py's main, in this process: exit 2 before the distributed
  runtime would start (initialize is replaced by a failure)."""
  def started(launch):
    raise AssertionError(f"jax.distributed would start: {launch}")
  monkeypatch.setattr(distributed, "initialize", started)
  run_dir = tmp_path / "run"
  with pytest.raises(SystemExit) as stop:
    train_main(["--config", str(ROOT / "configs/tiny_dense.yaml"),
                "--coordinator=localhost:1234", "--num_processes=2", "--process_id=0",
                "--failure_timeout=0", f"train.run_dir={run_dir}"])
  assert stop.value.code == 2
  assert "--failure_timeout: got 0.0; must be at least 1 (seconds)" in capsys.readouterr().err
  assert not run_dir.exists()
