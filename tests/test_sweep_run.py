"""Sweeps that train, from the command line: a local sweep of 3 tiny points
killed midway (SIGKILL of the sweep and of its running trainings) and run
again finishes only the missing points, leaving the finished points' files
byte for byte; a Ray sweep of one of the points on a local 2-CPU cluster
gives the same losses, bit for bit, and runs eval.py loss after training,
while a second point that fails, running beside it, is retried and reported
without stopping it."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import yaml

from ultramem_jax.sweep.__main__ import main
from ultramem_jax.sweep.execute import job_of
from ultramem_jax.sweep.points import resolve
from ultramem_jax.sweep.ray_backend import run_ray
from ultramem_jax.sweep.spec import read_sweep

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = {"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2,
         "model.ffn.inner_dim": 64, "data.tokenizer": "bytes", "data.seq_len": 32,
         "data.batch_size": 8, "data.val_fraction": 0.1,
         "optimizer.warmup_steps": 1, "train.steps": 4, "train.log_every": 1,
         "train.eval_every": 1000, "train.checkpoint_every": 2}


def sweep_file(path: pathlib.Path, text_dir, out: pathlib.Path, **extra) -> pathlib.Path:
  body = {"config": str(REPO / "configs/tiny_dense.yaml"),
          "overrides": {**SMALL, "data.source": str(text_dir)},
          "grid": {"optimizer.lr": [0.003]}, "seeds": [0, 1, 2],
          "sweep_dir": str(out), **extra}
  path.write_text(yaml.safe_dump(body, sort_keys=False))
  return path


def sweep_cmd(path, *args):
  return [sys.executable, "-m", "ultramem_jax.sweep", "run", str(path),
          "--no_progress", *args]


def files_of(run_dir: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(run_dir)): p.read_bytes()
          for p in sorted(run_dir.rglob("*")) if p.is_file()}


def train_losses(run_dir: pathlib.Path) -> dict[int, float]:
  out = {}
  for line in (run_dir / "metrics.jsonl").read_text().splitlines():
    r = json.loads(line)
    if "train/loss" in r:
      out[r["step"]] = r["train/loss"]
  return out


def summary_step(run_dir: pathlib.Path) -> int | None:
  try:
    return json.loads((run_dir / "summary.json").read_text())["step"]
  except (OSError, ValueError, KeyError):
    return None


def live_trainings(run_dirs) -> list[int]:
  """The pids in the train.lock files of `run_dirs` that are alive."""
  pids = []
  for d in run_dirs:
    try:
      pid = json.loads((d / "train.lock").read_text())["pid"]
      os.kill(pid, 0)
      stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError, KeyError):
      continue
    if stat.rpartition(")")[2].split()[0] == "Z":   # killed, not yet reaped
      continue
    pids.append(pid)
  return pids


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, text_dir):
  """The local sweep (--parallel 2): started, SIGKILLed with its running
  trainings once a point has finished and another is training, run again."""
  root = tmp_path_factory.mktemp("sweep")
  path = sweep_file(root / "local.yaml", text_dir, root / "out")
  proc = subprocess.Popen(sweep_cmd(path, "--parallel", "2"), cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while True:
    assert proc.poll() is None, proc.communicate()[0]
    assert time.time() < deadline, "the sweep did not get going"
    dirs = [d for d in (root / "out").glob("*") if d.is_dir()] if (root / "out").exists() else []
    finished = [d for d in dirs if summary_step(d) == SMALL["train.steps"]]
    training = live_trainings(d for d in dirs if d not in finished)
    if finished and training:
      break
    time.sleep(0.05)
  proc.kill()
  proc.wait()
  dirs = [d for d in (root / "out").glob("*") if d.is_dir()]
  # Kill the trainings short of their end; let those that wrote their
  # summary exit (they still write loss.png and release the lock).
  while True:
    alive = {d: live_trainings([d]) for d in dirs}
    if not any(alive.values()):
      break
    for d, pids in alive.items():
      if pids and summary_step(d) != SMALL["train.steps"]:
        os.kill(pids[0], signal.SIGKILL)
    time.sleep(0.1)
  finished = {d.name: files_of(d) for d in dirs
              if summary_step(d) == SMALL["train.steps"]}
  checkpointed = {d.name for d in dirs if d.name not in finished
                  and (d / "checkpoints").exists()
                  and any(p.name.isdigit() for p in (d / "checkpoints").iterdir())}
  again = subprocess.run(sweep_cmd(path, "--parallel", "2"), cwd=REPO,
                         capture_output=True, text=True, timeout=600)
  return root, path, finished, checkpointed, again


def test_killed_local_sweep_reruns_only_the_missing_points(killed_and_resumed):
  root, _, finished, checkpointed, again = killed_and_resumed
  assert again.returncode == 0, again.stdout + again.stderr
  dirs = sorted(d for d in (root / "out").iterdir() if d.is_dir())
  assert len(dirs) == 3 and 1 <= len(finished) < 3
  for d in dirs:
    assert summary_step(d) == SMALL["train.steps"]
    assert sorted(train_losses(d)) == [1, 2, 3, 4]
    if d.name in finished:
      assert f"{d.name}: done before, skipped" in again.stdout
      assert files_of(d) == finished[d.name]  # byte for byte
    else:
      assert f"{d.name}: done in" in again.stdout
  assert f"{3 - len(finished)} run, {len(finished)} done before, 0 failed" in again.stdout
  for name in checkpointed:   # train.py's own resume, from the last checkpoint
    log = (root / "out" / name / "sweep" / "train.log").read_text()
    assert f"resumed from {root / 'out' / name / 'checkpoints'}" in log


def test_ray_sweep_gives_the_local_losses(killed_and_resumed, text_dir, capsys):
  root, _, _, _, _ = killed_and_resumed
  names = sorted(d.name for d in (root / "out").iterdir() if d.is_dir())
  chosen = [names[-1]]
  path = sweep_file(root / "ray.yaml", text_dir, root / "ray", evals=["loss"],
                    resources={"num_cpus": 1}, retries=1)
  sweep = read_sweep(path)
  jobs = [job_of(p, sweep) for p in resolve(sweep) if p.name in chosen]
  # A second point whose train.py fails (its config file is missing): Ray
  # retries it once, and the other finishes regardless.
  broken = dataclasses.replace(
      jobs[0], name="broken", run_dir=str(root / "ray" / "broken"),
      train=("--config", str(root / "missing.yaml")))
  outcome = run_ray(jobs + [broken], sweep.resources, sweep.retries,
                    num_cpus=2, progress=False, say=print)
  assert outcome == {chosen[0]: "done", "broken": outcome["broken"]}
  assert "broken: train.py exited with status 2" in outcome["broken"]
  record = json.loads((root / "ray" / "broken" / "sweep" / "status.json").read_text())
  assert record["state"] == "failed" and record["attempt"] == 2
  for name in chosen:   # the same names: evals do not change a point's name
    local, ray = root / "out" / name, root / "ray" / name
    assert train_losses(ray) == train_losses(local)
    s_local = json.loads((local / "summary.json").read_text())
    s_ray = json.loads((ray / "summary.json").read_text())
    assert s_ray["val_loss"] == s_local["val_loss"]
    result = json.loads((ray / "eval" / "loss_step4.json").read_text())
    assert result["val_loss"] == pytest.approx(s_ray["val_loss"], rel=1e-6)
  # The report of the Ray sweep: the point with numbers, the rest pending.
  capsys.readouterr()
  assert main(["report", str(path)]) == 0
  md = capsys.readouterr().out
  for name in names:
    loss = json.loads((root / "out" / name / "summary.json").read_text())["val_loss"]
    row = f"| {name} | done | {loss:.4f} |" if name in chosen else f"| {name} | pending | pending |"
    assert row in md
