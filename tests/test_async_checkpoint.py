"""Saves that do not stall training (training/checkpoint.py): the loop
runs steps while a checkpoint is written in the background, and a SIGTERM
that arrives during a save leaves that checkpoint complete, and a resume
from it continues with bitwise the same losses."""

from __future__ import annotations

import logging
import os
import pathlib
import re
import signal

import pytest

from test_robustness import checkpoint_steps, logged_losses
from ultramem_jax.training import checkpoint as C
from ultramem_jax.training.config import load_config
from ultramem_jax.training.trainer import train

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 8


def _cfg(run_dir, text_dir, *extra):
  return load_config(REPO / "configs/tiny_dense.yaml", [
      "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
      "model.ffn.inner_dim=64", "data.tokenizer=bytes", "data.seq_len=16",
      "data.batch_size=8", "data.val_fraction=0.1", "optimizer.warmup_steps=1",
      "train.log_every=1", "train.eval_every=1000", "train.progress_bar=false",
      f"train.steps={STEPS}", "train.checkpoint_every=3", f"data.source={text_dir}",
      f"train.run_dir={run_dir}", *extra])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, text_dir):
  """An uninterrupted run, with the debug log's (time, message) pairs."""
  run_dir = tmp_path_factory.mktemp("async") / "full"
  records: list[logging.LogRecord] = []
  handler = logging.Handler(logging.DEBUG)
  handler.emit = records.append
  loggers = [logging.getLogger(n) for n in ("ultramem_jax.training.checkpoint",
                                            "ultramem_jax.training.trainer")]
  for lg in loggers:
    lg.addHandler(handler)
    lg.setLevel(logging.DEBUG)
  try:
    train(_cfg(run_dir, text_dir), log=lambda s: None)
  finally:
    for lg in loggers:
      lg.removeHandler(handler)
      lg.setLevel(logging.NOTSET)
  return run_dir, [(r.created, r.getMessage()) for r in records]


def _times(log, pattern: str) -> dict[int, float]:
  """{number in the message: time} of the messages matching `pattern`."""
  out = {}
  for t, message in log:
    m = re.fullmatch(pattern, message)
    if m:
      out[int(m.group(1))] = t
  return out


def test_a_save_overlaps_train_steps(full_run, text_dir):
  run_dir, log = full_run
  started = _times(log, r"checkpoint (\d+): save started")
  written = _times(log, r"checkpoint (\d+): files written in the background")
  computed = _times(log, r"steps \d+-(\d+): metrics fetched \(computed\)")
  assert sorted(started) == sorted(written) == [3, 6, 8]
  # Steps whose results were fetched (so computed) after a save began and
  # before its files were written: the loop did not wait for the write.
  overlapping = {s: [k for k, t in computed.items() if started[s] < t < written[s]]
                 for s in (3, 6)}
  assert any(overlapping.values()), (started, written, computed)
  # The end of the run waited for the last one: it is listed, and complete.
  assert checkpoint_steps(run_dir) == [3, 6, 8]
  blocking = [r for r in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "checkpoint/blocking_sec" in r]
  assert len(blocking) == 3


def test_sigterm_during_a_save_leaves_it_complete_and_resumes_bitwise(
    full_run, tmp_path, text_dir, monkeypatch):
  full_dir, _ = full_run
  run_dir = tmp_path / "cut"
  real_save = C.Checkpointer.save
  in_flight = []

  def save_then_sigterm(self, step, *args, **kwargs):
    real_save(self, step, *args, **kwargs)
    if step == 3:   # preempted while checkpoint 3 is being written
      in_flight.append(self._manager.is_saving_in_progress())
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(C.Checkpointer, "save", save_then_sigterm)
  result = train(_cfg(run_dir, text_dir), log=lambda s: None)
  monkeypatch.setattr(C.Checkpointer, "save", real_save)
  assert in_flight == [True]          # the signal came during the write
  assert result.stopped_by == "SIGTERM" and result.final_step == 3
  assert checkpoint_steps(run_dir) == [3]   # complete: listed, not a tmp dir
  assert not list((run_dir / "checkpoints").glob("*tmp*"))

  again = train(_cfg(run_dir, text_dir), log=lambda s: None)
  assert again.final_step == STEPS and again.stopped_by is None
  assert logged_losses(run_dir) == logged_losses(full_dir)   # bitwise
  assert len(logged_losses(full_dir)) == STEPS
