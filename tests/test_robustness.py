"""Training that survives: preemption, damaged checkpoints, divergence, bad
input and determinism. Every test provokes its fault for real and asserts
that it happened."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import fresh_compiles
from ultramem_jax.config import ConfigError
from ultramem_jax.data.pipeline import prepare_data
from ultramem_jax.training.checkpoint import CheckpointMismatch
from ultramem_jax.training.config import load_config
from ultramem_jax.training.health import Diverged, HealthMonitor
from ultramem_jax.training.trainer import train

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2",
         "model.ffn.inner_dim=64", "data.tokenizer=bytes", "data.seq_len=32",
         "data.batch_size=8", "data.val_fraction=0.1", "optimizer.warmup_steps=1",
         "train.log_every=1", "train.eval_every=1000", "train.progress_bar=false"]


def damage_checkpoint(step_dir: pathlib.Path) -> None:
  """Every array-data file of a checkpoint step's state cut to half its
  length (a crash or a full disk mid-write)."""
  victims = [p for p in (step_dir / "state").rglob("*")
             if p.is_file() and p.parent.name == "d"]
  assert victims
  for victim in victims:
    with open(victim, "r+b") as f:
      f.truncate(victim.stat().st_size // 2)


def small(tmp_path, source, *extra):
  return load_config(REPO / "configs/tiny_dense.yaml",
                     SMALL + [f"data.source={source}",
                              f"train.run_dir={tmp_path / 'run'}", *extra])


def quiet(s):
  pass


def logged_losses(run_dir: pathlib.Path) -> dict[int, float]:
  """train/loss by step from metrics.jsonl (a step logged twice keeps the last)."""
  out = {}
  for line in (run_dir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if "train/loss" in record:
      out[record["step"]] = record["train/loss"]
  return out


def checkpoint_steps(run_dir: pathlib.Path) -> list[int]:
  ckpt = run_dir / "checkpoints"
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())


# --------------------------------------------------------------- preemption


def _train_cmd(run_dir, source, steps):
  return [sys.executable, str(REPO / "train.py"), "--config",
          str(REPO / "configs/tiny_dense.yaml"), *SMALL, f"data.source={source}",
          f"train.run_dir={run_dir}", f"train.steps={steps}",
          "train.checkpoint_every=1000"]


def _start(cmd):
  return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _wait_for_step(run_dir: pathlib.Path, proc, step: int, timeout=240):
  metrics = run_dir / "metrics.jsonl"
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"training exited early: {proc.communicate()}")
    if metrics.exists() and len(logged_losses(run_dir)) >= step:
      return
    time.sleep(0.05)
  raise AssertionError("training did not reach the step in time")


def test_sigterm_saves_and_resume_continues_the_same_losses(tmp_path, text_dir):
  steps = 30
  full_dir, cut_dir = tmp_path / "full" / "run", tmp_path / "cut"
  # The uninterrupted reference in this process (train.py's own loop; one
  # process start fewer), as test_disk_full's.
  train(small(tmp_path / "full", text_dir, f"train.steps={steps}",
              "train.checkpoint_every=1000"), log=quiet)

  proc = _start(_train_cmd(cut_dir, text_dir, steps))
  _wait_for_step(cut_dir, proc, 5)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  assert "received SIGTERM" in err
  stopped = [line for line in out.splitlines() if line.startswith("stopped by SIGTERM")]
  assert stopped, out
  step = int(stopped[0].split("after step ")[1].split(";")[0])
  assert 5 <= step < steps  # the signal really cut the run short
  assert checkpoint_steps(cut_dir) == [step]  # saved on the way out

  again = subprocess.run(_train_cmd(cut_dir, text_dir, steps), cwd=REPO,
                         capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr
  assert f"resumed from {cut_dir / 'checkpoints' / str(step)}" in again.stdout
  # Bitwise the same loss at every step, on both sides of the cut.
  assert logged_losses(cut_dir) == logged_losses(full_dir)
  assert len(logged_losses(full_dir)) == steps


def test_second_signal_exits_at_once_and_keeps_checkpoints_whole(tmp_path, text_dir):
  run_dir = tmp_path / "run"
  cmd = _train_cmd(run_dir, text_dir, 400)
  cmd[cmd.index("train.checkpoint_every=1000")] = "train.checkpoint_every=4"
  proc = _start(cmd)
  _wait_for_step(run_dir, proc, 9)
  before = checkpoint_steps(run_dir)
  proc.send_signal(signal.SIGTERM)
  line = proc.stderr.readline()
  while line and "received SIGTERM" not in line:
    line = proc.stderr.readline()
  proc.send_signal(signal.SIGINT)  # while the first stop is still saving
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGINT, (out, err)
  assert "received SIGINT again" in err or "received SIGINT" in err
  assert "stopped by" not in out  # it did not finish the graceful path
  assert before and set(before) <= set(checkpoint_steps(run_dir))
  # Whatever is listed restores: the run resumes from its newest checkpoint.
  resume = _train_cmd(run_dir, text_dir, max(checkpoint_steps(run_dir)) + 2)
  again = subprocess.run(resume, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr
  assert "is damaged" not in again.stdout
  assert "resumed from" in again.stdout


# -------------------------------------------------------------- checkpoints


def _largest_data_file(directory: pathlib.Path) -> pathlib.Path:
  """The biggest file of array data (tensorstore's d/ directories)."""
  files = [p for p in directory.rglob("*") if p.is_file() and p.parent.name == "d"]
  return max(files, key=lambda p: p.stat().st_size)


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory, text_dir):
  """A run of 6 steps with checkpoints 2, 4 and 6, trained once; each test
  damages its own copy."""
  root = tmp_path_factory.mktemp("six_steps")
  train(small(root, text_dir, "train.steps=6", "train.checkpoint_every=2"), log=quiet)
  return root / "run"


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, text_dir, damage,
                                                              six_steps):
  run = tmp_path / "run"
  shutil.copytree(six_steps, run)
  assert checkpoint_steps(run) == [2, 4, 6]
  state_dir = run / "checkpoints" / "6" / "state"
  if damage == "truncate":  # every array-data file cut to half its length
    victims = [p for p in state_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    for victim in victims:
      size = victim.stat().st_size
      with open(victim, "r+b") as f:
        f.truncate(size // 2)
      assert victim.stat().st_size == size // 2
  else:
    victim = _largest_data_file(state_dir)
    victim.unlink()
    assert not victim.exists()
  # Resume in a fresh process: this one's tensorstore cache still holds the
  # arrays it wrote, as a restarted job's would not.
  cmd = _train_cmd(run, text_dir, 8)
  cmd[cmd.index("train.checkpoint_every=1000")] = "train.checkpoint_every=2"
  done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  text = done.stdout
  assert "checkpoint 6 is damaged" in text, text
  assert f"resumed from {run / 'checkpoints' / '4'}" in text
  # The failed read's echoes are not printed.
  assert "Event loop is closed" not in done.stderr, done.stderr
  assert "Traceback" not in done.stderr, done.stderr
  assert sorted(logged_losses(run)) == list(range(1, 9))
  # Moved aside, not deleted; the good ones are still there.
  aside = list((run / "checkpoints.unreadable").iterdir())
  assert len(aside) == 1 and aside[0].name.startswith("6-")
  assert 4 in checkpoint_steps(run) and 8 in checkpoint_steps(run)


def test_shape_mismatch_names_the_first_parameter(tmp_path, text_dir):
  cfg = small(tmp_path, text_dir, "train.steps=2", "train.checkpoint_every=2")
  train(cfg, log=quiet)
  (tmp_path / "run" / "config.yaml").unlink()  # so the config check can't see it
  wider = small(tmp_path, text_dir, "train.steps=4", "model.ffn.inner_dim=96")
  with pytest.raises(CheckpointMismatch, match=r"blocks/0/ffn/w_down.*\(64, 32\).*\(96, 32\)"):
    train(wider, log=quiet)
  assert checkpoint_steps(tmp_path / "run") == [2]


def test_max_to_keep_below_two_is_refused(tmp_path, text_dir):
  with pytest.raises(ConfigError, match="train.max_to_keep: got 1"):
    small(tmp_path, text_dir, "train.max_to_keep=1")


# --------------------------------------------------------------- divergence


def test_non_finite_step_is_skipped_and_counted(tmp_path, text_dir):
  clean = train(small(tmp_path / "a", text_dir, "train.steps=6"), log=quiet)
  messages = []
  faulty = train(small(tmp_path / "b", text_dir, "train.steps=6",
                       "train.fault_nan_steps=3"), log=messages.append)
  assert faulty.skipped_steps == 1 and clean.skipped_steps == 0
  assert any("step 3: non-finite" in m for m in messages), messages
  skipped = {json.loads(l)["step"]: json.loads(l).get("train/skipped")
             for l in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()
             if "train/skipped" in l}
  assert skipped == {1: 0, 2: 0, 3: 1, 4: 0, 5: 0, 6: 0}
  # Step 3's loss was computed before its (skipped) update; from step 4 the
  # faulty run lags the clean one by that update.
  assert faulty.losses[3] == clean.losses[3]
  assert faulty.losses[4] != clean.losses[4]
  assert np.isfinite(list(faulty.losses.values())).all()
  assert np.isfinite(faulty.val_loss)


def test_too_many_non_finite_steps_stop_the_run(tmp_path, text_dir):
  cfg = small(tmp_path, text_dir, "train.steps=20", "train.checkpoint_every=2",
              "train.fault_nan_steps=5,6,7,8,9", "train.max_skipped_steps=3")
  with pytest.raises(Diverged, match=r"3 consecutive steps up to step 7"):
    train(cfg, log=quiet)
  run = tmp_path / "run"
  steps = checkpoint_steps(run)
  assert steps and max(steps) <= 8
  # The newest checkpoint restores and training continues from it.
  ok = dataclasses.replace(cfg, train=dataclasses.replace(
      cfg.train, fault_nan_steps="", steps=max(steps) + 2))
  result = train(ok, log=quiet)
  assert result.final_step == max(steps) + 2 and np.isfinite(result.val_loss)


def test_cli_exit_status_on_divergence(tmp_path, text_dir):
  cmd = _train_cmd(tmp_path / "run", text_dir, 10) + [
      "train.fault_nan_steps=2,3", "train.max_skipped_steps=2"]
  done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 3, done.stderr
  assert "training diverged" in done.stderr


def test_loss_spikes_are_reported():
  monitor = HealthMonitor(max_skipped=3, spike_factor=3.0)
  for i in range(20):
    assert monitor.observe(i, 1.0 + 0.01 * (i % 3), False) == (None, 0.0)
  message, ratio = monitor.observe(20, 4.0, False)
  assert ratio == pytest.approx(4.0 / np.mean([1.0 + 0.01 * (i % 3) for i in range(20)]))
  assert "loss spike" in message
  assert HealthMonitor(3, 0.0).observe(0, 1e9, False) == (None, 0.0)


# -------------------------------------------------------------- bad input


def test_undecodable_files_skipped_when_asked(tmp_path, text_dir):
  data = tmp_path / "texts"
  data.mkdir()
  for p in sorted(pathlib.Path(text_dir).iterdir()):
    (data / p.name).write_bytes(p.read_bytes())
  (data / "broken.txt").write_bytes(b"fine text then \xff\xfe broken")
  cfg = small(tmp_path, data)
  with pytest.raises(Exception, match=r"broken.txt: not valid UTF-8 at byte offset 15"):
    prepare_data(cfg.data)
  skip = small(tmp_path, data, "data.on_decode_error=skip")
  messages = []
  out = prepare_data(skip.data, log=messages.append)
  assert any("skipped 1 file(s)" in m and "broken.txt" in m for m in messages)
  assert out.stats["train_documents"] + out.stats["val_documents"] == 60


def test_overwrite_moves_a_different_run_aside(tmp_path, text_dir):
  cfg = small(tmp_path, text_dir, "train.steps=2", "train.checkpoint_every=2")
  train(cfg, log=quiet)
  other = small(tmp_path, text_dir, "train.steps=2", "model.d_model=48")
  with pytest.raises(ConfigError, match="train.overwrite=true"):
    train(other, log=quiet)
  messages = []
  replaced = dataclasses.replace(other, train=dataclasses.replace(other.train, overwrite=True))
  train(replaced, log=messages.append)
  moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
  assert len(moved) == 1 and checkpoint_steps(moved[0]) == [2]
  assert any(str(moved[0]) in m for m in messages)
  assert checkpoint_steps(tmp_path / "run") == [2]


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_unwritable_run_dir_is_refused_before_anything(tmp_path, text_dir, where):
  if where == "under_a_file":
    (tmp_path / "plain").write_text("x")
    run_dir = tmp_path / "plain" / "run"
  else:
    run_dir = pathlib.Path("/proc/ultramem-test-run")
  cfg = small(tmp_path, text_dir, f"train.run_dir={run_dir}")
  with pytest.raises(ConfigError, match="train.run_dir"):
    train(cfg, log=quiet)
  assert not run_dir.exists()


def test_mesh_that_does_not_divide_a_dimension_is_refused(tmp_path, text_dir):
  cfg = small(tmp_path, text_dir, "mesh.data=1", "mesh.tensor=8")
  with pytest.raises(ConfigError, match=r"mesh.tensor: 8 shards do not divide "
                     r"dimension \d \(size \d+, logical axis '\w+'\) of \S+"):
    train(cfg, log=quiet)
  assert not (tmp_path / "run").exists()


# -------------------------------------------------------------- determinism


@pytest.mark.parametrize("memory", [[], ["model.memory.layers=all", "model.memory.n_keys=8",
                                         "model.memory.key_dim=8", "model.memory.top_m=4",
                                         "model.memory.value_dim=16",
                                         "model.memory.pre_value_dim=16",
                                         "model.memory.init=released"]],
                         ids=["dense", "ultramem_v2"])
def test_same_config_and_seed_give_bitwise_identical_losses(tmp_path, text_dir, memory):
  a = train(small(tmp_path / "a", text_dir, "train.steps=5", *memory), log=quiet)
  with fresh_compiles():  # b's programs are compiled anew, not a's from the cache
    b = train(small(tmp_path / "b", text_dir, "train.steps=5", *memory), log=quiet)
  assert a.losses == b.losses and a.val_loss == b.val_loss
  c = train(small(tmp_path / "c", text_dir, "train.steps=5", "train.seed=1", *memory),
            log=quiet)
  assert c.losses != a.losses  # the seed matters, so equality is not vacuous
