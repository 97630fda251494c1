"""The logs of a resumed run: each step once in metrics.jsonl and in the
TensorBoard events, with the resumed run's values, after a SIGKILL between
checkpoints; a partial last line (a crash mid-write) read past and dropped;
and a resume that fails leaves config.yaml, tokenizer.json and metrics.jsonl
as they were."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from test_robustness import SMALL
from ultramem_jax.config import ConfigError
from ultramem_jax.training.checkpoint import CheckpointMismatch
from ultramem_jax.training.config import load_config
from ultramem_jax.training.metrics import ScalarWriter, plot_losses, read_scalars
from ultramem_jax.training.run_dir import RunDir
from ultramem_jax.training.run_lock import LOCK_FILE
from ultramem_jax.training.trainer import train

REPO = pathlib.Path(__file__).resolve().parents[1]
PARTIAL = '{"step": 9999, "train/lo'


def _overrides(run_dir, source, *extra):
  return SMALL + [f"data.source={source}", f"train.run_dir={run_dir}", *extra]


def _config(run_dir, source, *extra):
  return load_config(REPO / "configs/tiny_dense.yaml",
                     _overrides(run_dir, source, *extra))


def _loss_records(run_dir: pathlib.Path) -> list[tuple[int, float]]:
  return [(r["step"], r["train/loss"]) for r in
          map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
          if "train/loss" in r]


def _event_losses(run_dir: pathlib.Path) -> list[tuple[int, float]]:
  # purge_orphaned_data=False: the files themselves must hold each step once.
  events = EventAccumulator(str(run_dir / "tensorboard"), purge_orphaned_data=False)
  events.Reload()
  return [(e.step, e.value) for e in events.Scalars("train/loss")]


# ----------------------------------------------------------------------------- kill, resume

def test_sigkill_between_checkpoints_then_resume_logs_each_step_once(
    tmp_path, text_dir):
  run_dir, steps, every = tmp_path / "run", 60, 20
  cmd = [sys.executable, str(REPO / "train.py"), "--config",
         str(REPO / "configs/tiny_dense.yaml"),
         *_overrides(run_dir, text_dir, f"train.steps={steps}",
                     f"train.checkpoint_every={every}")]
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  metrics = run_dir / "metrics.jsonl"
  deadline = time.time() + 240
  try:
    while time.time() < deadline and proc.poll() is None:
      saved = RunDir(run_dir).latest_checkpoint_step()  # complete ones only
      if saved and len(_loss_records(run_dir)) >= saved + 2:
        break
      time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  saved = RunDir(run_dir).latest_checkpoint_step()
  logged = [s for s, _ in _loss_records(run_dir)]
  assert saved is not None and max(logged) > saved, (saved, logged)  # a real replay
  assert (run_dir / LOCK_FILE).exists()  # SIGKILL left it behind
  with open(metrics, "a") as f:  # and a crash mid-write leaves a partial line
    f.write(PARTIAL)
  steps_read, _ = read_scalars(metrics, "train/loss")  # reading reads past it
  assert steps_read == sorted(set(logged))
  plot_losses(metrics, tmp_path / "loss.png")

  messages = []
  result = train(_config(run_dir, text_dir, f"train.steps={steps}",
                         f"train.checkpoint_every={every}"), log=messages.append)
  assert any("took over" in m and "no longer running" in m for m in messages), messages
  dropped = [m for m in messages if m.startswith(f"metrics: dropped the records after step {saved}")]
  assert dropped and "1 partial line(s)" in dropped[0], messages
  assert sorted(result.losses) == list(range(saved + 1, steps + 1))

  records = _loss_records(run_dir)
  assert [s for s, _ in records] == list(range(1, steps + 1))  # each step once
  assert PARTIAL not in metrics.read_text()
  assert {s: v for s, v in records if s > saved} == {
      s: result.losses[s] for s in range(saved + 1, steps + 1)}
  events = _event_losses(run_dir)
  assert [s for s, _ in events] == list(range(1, steps + 1))
  assert [v for s, v in events if s > saved] == [
      float(np.float32(result.losses[s])) for s in range(saved + 1, steps + 1)]
  assert not (run_dir / LOCK_FILE).exists()


# ----------------------------------------------------------------------------- partial line

def test_partial_last_line_is_read_past_and_never_glued_to(tmp_path):
  jsonl = tmp_path / "metrics.jsonl"
  jsonl.write_text('{"step": 1, "train/loss": 2.5}\n' + PARTIAL)
  assert read_scalars(jsonl, "train/loss") == ([1], [2.5])
  writer = ScalarWriter(tmp_path / "tb", jsonl)
  writer.write(2, {"train/loss": 2.0})
  writer.close()
  lines = jsonl.read_text().splitlines()
  assert lines == ['{"step": 1, "train/loss": 2.5}', PARTIAL,
                   '{"step": 2, "train/loss": 2.0}']
  assert read_scalars(jsonl, "train/loss") == ([1, 2], [2.5, 2.0])


# ----------------------------------------------------------------------------- failed resume

@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_dir):
  """A 2-step run with a checkpoint at step 2."""
  run_dir = tmp_path_factory.mktemp("trained") / "run"
  train(_config(run_dir, text_dir, "train.steps=2", "train.checkpoint_every=2"),
        log=lambda s: None)
  return run_dir


def _copy(trained: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
  run_dir = tmp_path / "run"
  shutil.copytree(trained, run_dir)
  return run_dir


def _written(run_dir: pathlib.Path) -> dict[str, bytes]:
  return {name: (run_dir / name).read_bytes()
          for name in ("config.yaml", "tokenizer.json", "metrics.jsonl")}


def test_resume_with_another_process_count_changes_nothing(trained, tmp_path, text_dir):
  run_dir = _copy(trained, tmp_path)
  data = run_dir / "checkpoints" / "2" / "data"
  for f in data.glob("process_*-of-*.json"):
    f.rename(data / "process_0-of-2.json")
  (data / "process_1-of-2.json").write_text((data / "process_0-of-2.json").read_text())
  before = _written(run_dir)
  with pytest.raises(ConfigError, match=r"checkpoint 2 was written by 2 process\(es\)"):
    train(_config(run_dir, text_dir, "train.steps=4", "optimizer.lr=1e-2"),
          log=lambda s: None)
  assert _written(run_dir) == before
  assert not (run_dir / LOCK_FILE).exists()


def test_resume_whose_checkpoint_does_not_restore_changes_nothing(
    trained, tmp_path, text_dir):
  run_dir = _copy(trained, tmp_path)
  saved = yaml.safe_load((run_dir / "config.yaml").read_text())
  saved["model"]["ffn"]["inner_dim"] = 96  # the config now says other shapes
  (run_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
  before = _written(run_dir)
  with pytest.raises(CheckpointMismatch, match=r"w_down has shape \(64, 32\)"):
    train(_config(run_dir, text_dir, "train.steps=4", "optimizer.lr=1e-2",
                  "model.ffn.inner_dim=96"), log=lambda s: None)
  assert _written(run_dir) == before  # train.steps=4 was not written
  assert not (run_dir / LOCK_FILE).exists()
  assert RunDir(run_dir).checkpoint_steps() == [2]


def test_resume_that_succeeds_writes_the_new_config(trained, tmp_path, text_dir):
  run_dir = _copy(trained, tmp_path)
  train(_config(run_dir, text_dir, "train.steps=3"), log=lambda s: None)
  assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["steps"] == 3
  assert [s for s, _ in _loss_records(run_dir)] == [1, 2, 3]
