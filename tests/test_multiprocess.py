"""Two ``jax.distributed`` CPU processes on localhost, 4 devices each, train
as one 8-device run: train.py in both, against the same run in the test's own
process (train(), 8 devices), both on the mesh data=2 x memory=4.

Tolerance: 1e-5 relative on each step's training loss and on the validation
loss. Both runs see the same rows at every step (process i reads rows i,
i+2, ... of each global batch, which together are the one process's batch);
only which device holds which row differs, so sums over the batch add in
another order. That is float32 rounding: measured 1 ulp (8e-8 relative) of
the loss over these 3 steps, far below what a wrong row, step or learning
rate changes (1e-3 and more).
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from ultramem_jax.config import ConfigError
from ultramem_jax.data.pipeline import eval_batches
from ultramem_jax.evaluation.restore import restore_run
from ultramem_jax.parallel import distributed
from ultramem_jax.training.config import load_config
from ultramem_jax.training.run_dir import latest_checkpoint_step
from ultramem_jax.training.trainer import train
from train import main as train_main

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_V2 = ["--config", "configs/tiny_ultramem_v2.yaml",
           "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
           "model.ffn.inner_dim=64", "model.memory.n_keys=6",
           "model.memory.key_dim=8", "model.memory.top_m=4",
           "model.memory.value_dim=16", "model.memory.pre_value_dim=16",
           "model.memory.init_samples=32", "data.bpe_vocab_size=300",
           "data.seq_len=16", "data.batch_size=8", "optimizer.warmup_steps=1",
           "train.steps=3", "train.log_every=1", "train.eval_every=100",
           "train.eval_batches=2", "train.checkpoint_every=3",
           "train.progress_bar=false", "mesh.data=2", "mesh.memory=4"]
# A hang (a process that never joins) fails the test instead of blocking it.
TIMEOUT_S = 400


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def environment(devices: int, compilation_cache: bool = True) -> dict[str, str]:
  """This process's environment with `devices` emulated CPU devices (the
  other XLA flags, those `make test` sets, stay the same); proxy variables
  can stall the coordinator's connections, and everything here is on
  localhost. Without `compilation_cache`, the tests' cache (conftest.py) is
  off: programs that no other test compiles only cost the writing of their
  entries."""
  env = {k: v for k, v in os.environ.items() if "_proxy" not in k.lower()}
  env["JAX_PLATFORMS"] = "cpu"
  if not compilation_cache:
    env["JAX_COMPILATION_CACHE_DIR"] = ""
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(
      [f"--xla_force_host_platform_device_count={devices}", *flags])
  return env


def start(args: list[str], devices: int, log: pathlib.Path,
          compilation_cache: bool = True) -> subprocess.Popen:
  with log.open("w") as out:
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT,
                            env=environment(devices, compilation_cache), stdout=out,
                            stderr=subprocess.STDOUT)


def wait_all(procs: list[subprocess.Popen], logs: list[pathlib.Path]) -> None:
  deadline = time.monotonic() + TIMEOUT_S
  try:
    for proc in procs:
      proc.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    tails = "\n".join(f"--- {log.name}\n{log.read_text()[-2000:]}" for log in logs)
    pytest.fail(f"train.py did not finish in {TIMEOUT_S}s\n{tails}")
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()


def losses(run_dir: pathlib.Path) -> dict[int, float]:
  records = [json.loads(line)
             for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  steps = [r["step"] for r in records if "train/loss" in r]
  assert len(steps) == len(set(steps)), "a step was logged twice"
  return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path, text_dir):
  port = free_port()
  two, one = tmp_path / "two", tmp_path / "one"
  common = [*TINY_V2, f"data.source={text_dir}"]
  logs = [tmp_path / "process0.log", tmp_path / "process1.log"]
  procs = [start([f"--coordinator=localhost:{port}", "--num_processes=2",
                  f"--process_id={i}", *common, f"train.run_dir={two}"], 4, logs[i],
                 compilation_cache=False)
           for i in range(2)]
  # The reference run meanwhile, in this process (its 8 devices and XLA
  # flags are those of environment(8); one interpreter start fewer).
  said: list[str] = []
  try:
    train(load_config(ROOT / common[1], [*common[2:], f"train.run_dir={one}"]),
          log=said.append)
  finally:
    wait_all(procs, logs)
  out = [log.read_text() for log in logs] + ["\n".join(said)]
  for proc, text in zip(procs, out):
    assert proc.returncode == 0, text[-3000:]

  for i in range(2):
    assert (f"distributed: process {i} of 2, coordinator localhost:{port}, "
            "4 local / 8 global cpu devices") in out[i]
    assert f"2 process(es); this process reads part {i + 1} of 2" in out[i]
  assert "distributed:" not in out[2]

  got, want = losses(two), losses(one)
  assert sorted(got) == sorted(want) == [1, 2, 3]
  for step in want:
    assert got[step] == pytest.approx(want[step], rel=1e-5), step
  val_two = json.loads((two / "summary.json").read_text())["val_loss"]
  val_one = json.loads((one / "summary.json").read_text())["val_loss"]
  assert val_two == pytest.approx(val_one, rel=1e-5)

  # One checkpoint for the run, with each process's data-iterator position.
  # Every array of this model is replicated over the processes and smaller
  # than orbax's replica-parallel threshold (training/checkpoint.py), so
  # process 0 writes them all; the checkpoint is whole: it restores here,
  # every array checked against its saved fingerprint.
  assert latest_checkpoint_step(two) == 3
  step_dir = two / "checkpoints" / "3"
  assert sorted(p.name for p in (step_dir / "data").glob("*.json")) == [
      "process_0-of-2.json", "process_1-of-2.json"]
  assert (step_dir / "state" / "ocdbt.process_0").exists()
  restored = restore_run(two, 3, [])
  assert restored.step == 3


@pytest.mark.parametrize("flags,message", [
    (["--coordinator=localhost:1234", "--num_processes=2"],
     "--process_id missing"),
    (["--coordinator=localhost", "--num_processes=2", "--process_id=0"],
     "--coordinator: got 'localhost'; expected HOST:PORT"),
    (["--coordinator=localhost:1234", "--num_processes=2", "--process_id=2"],
     "--process_id: got 2; must be in 0..1"),
])
def test_bad_distributed_arguments_stop_before_jax_starts(tmp_path, flags, message,
                                                          capsys, monkeypatch):
  """train.py's main, in this process: argparse's exit 2 with the message,
  before the distributed runtime would start (initialize is replaced by a
  failure) and before the run directory is made."""
  def started(launch):
    raise AssertionError(f"jax.distributed would start: {launch}")
  monkeypatch.setattr(distributed, "initialize", started)
  run_dir = tmp_path / "run"
  with pytest.raises(SystemExit) as stop:
    train_main(["--config", str(ROOT / "configs/tiny_dense.yaml"), *flags,
                f"train.run_dir={run_dir}"])
  assert stop.value.code == 2
  assert message in capsys.readouterr().err
  assert not run_dir.exists()


def test_eval_batch_parts_make_up_the_global_batch():
  rows = np.arange(11 * 5).reshape(11, 5)
  whole = list(eval_batches(rows, 4))
  parts = [list(eval_batches(rows, 4, part=i, parts=2)) for i in range(2)]
  for k, batch in enumerate(whole):
    for key in batch:
      np.testing.assert_array_equal(
          np.concatenate([parts[0][k][key], parts[1][k][key]]), batch[key])


def test_resuming_with_another_process_count_is_refused(tmp_path):
  """A checkpoint's data positions are per process: another number of
  processes is told so, not taken for damage (which would move it aside)."""
  step_dir = tmp_path / "run" / "checkpoints" / "3"
  (step_dir / "data").mkdir(parents=True)
  (step_dir / "_CHECKPOINT_METADATA").write_text("{}")
  for i in range(2):
    (step_dir / "data" / f"process_{i}-of-2.json").write_text("{}")
  cfg = load_config("configs/tiny_dense.yaml", [f"train.run_dir={tmp_path / 'run'}"])
  with pytest.raises(ConfigError, match="checkpoint 3 was written by 2 process"):
    train(cfg)
  assert step_dir.exists()
