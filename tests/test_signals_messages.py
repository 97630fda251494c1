"""The messages of a signal before the first step: SIGTERM while the data
is prepared and SIGTERM while the train step compiles. (That a resume which
moves a damaged checkpoint aside prints none of orbax's 'Event loop is
closed' tracebacks is asserted by test_robustness.py's damaged-checkpoint
test, on the same resume.)"""

from __future__ import annotations

import signal
import subprocess

import pytest

from conftest import environment_without_compilation_cache, make_documents
from test_robustness import REPO, _train_cmd, checkpoint_steps


def _start(cmd, env=None):
  return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env)


def _signal_after(proc, prefix: str) -> list[str]:
  """Sends SIGTERM as soon as a stdout line starts with `prefix`; the lines
  read until then."""
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith(prefix):
      proc.send_signal(signal.SIGTERM)
      return lines
  raise AssertionError(f"no line {prefix!r}: {lines} {proc.communicate()}")


@pytest.fixture(scope="module")
def big_text(tmp_path_factory):
  """Enough text that training a BPE tokenizer on it takes a while."""
  root = tmp_path_factory.mktemp("big_text")
  for i, doc in enumerate(make_documents(3000, seed=1)):
    (root / f"doc{i:04d}.txt").write_text(doc)
  return root


def test_sigterm_while_the_data_is_prepared_says_so(tmp_path, big_text):
  run = tmp_path / "run"
  cmd = [arg for arg in _train_cmd(run, big_text, 20) if arg != "data.tokenizer=bytes"]
  proc = _start(cmd)
  _signal_after(proc, "data: ")  # the split is done; the tokenizer trains
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, (out, err)
  assert err.strip() == (
      "stopped by SIGTERM while checking the run and preparing its data, before "
      "anything was trained or written to the run directory; run the same "
      "command to start again"), err
  assert "trained a bpe tokenizer" not in out
  assert not run.exists()


def test_sigterm_while_compiling_does_not_claim_a_checkpoint(tmp_path, text_dir):
  run = tmp_path / "run"
  # Without the tests' compilation cache, so the step really compiles.
  proc = _start(_train_cmd(run, text_dir, 20), env=environment_without_compilation_cache())
  lines = _signal_after(proc, "model: ")  # built; the step compiles next
  out, err = proc.communicate(timeout=120)
  out = "".join(lines) + out
  assert proc.returncode == 0, err
  assert "received SIGTERM" in err
  assert ("stopped by SIGTERM before the first step; nothing was trained and no "
          "checkpoint written; run the same command to start again") in out, out
  assert "checkpoint saved" not in out
  assert not (run / "checkpoints").exists() or checkpoint_steps(run) == []
