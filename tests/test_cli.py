"""train.py and eval.py from the command line, as a user runs them."""

import json
import subprocess
import sys

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from eval import main as eval_main
from train import main as train_main

SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2",
         "model.ffn.inner_dim=64", "data.bpe_vocab_size=300", "data.seq_len=32",
         "data.batch_size=8", "data.val_fraction=0.1", "optimizer.warmup_steps=2",
         "train.steps=6", "train.log_every=2", "train.eval_every=3",
         "train.checkpoint_every=3"]


def run(*args):
  return subprocess.run([sys.executable, *map(str, args)], capture_output=True,
                        text=True, timeout=300)


@pytest.mark.slow
def test_train_then_eval(tmp_path, text_dir):
  run_dir = tmp_path / "run"
  proc = run("train.py", "--config", "configs/tiny_dense.yaml", *SMALL,
             f"data.source={text_dir}", f"train.run_dir={run_dir}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "validation loss" in proc.stdout and "unigram entropy" in proc.stdout
  assert str(run_dir / "checkpoints") in proc.stdout

  saved = yaml.safe_load((run_dir / "config.yaml").read_text())
  assert saved["model"]["vocab_size"] == 300  # resolved from the tokenizer
  assert saved["data"]["source"] == str(text_dir)
  assert (run_dir / "tokenizer.json").exists()
  assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()
                if p.name.isdigit()) == ["3", "6"]

  events = EventAccumulator(str(run_dir / "tensorboard"))
  events.Reload()
  tags = set(events.Tags()["scalars"])
  assert {"train/loss", "train/grad_norm", "train/lr", "train/tokens_per_sec",
          "val/loss", "val/perplexity"} <= tags
  assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
  assert [e.step for e in events.Scalars("val/loss")] == [3, 6]

  png = (run_dir / "loss.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

  summary = json.loads((run_dir / "summary.json").read_text())
  proc = run("eval.py", "loss", "--run_dir", run_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout)
  assert result["step"] == 6
  assert result["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-6)
  assert (run_dir / "eval" / "loss_step6.md").exists()

  proc = run("eval.py", "loss", "--run_dir", run_dir, "--step", "3")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout)["val_loss"] != result["val_loss"]


def test_bad_config_stops_before_anything_is_written(tmp_path, text_dir, capsys):
  """train.py's and eval.py's main in this process (the real entry points
  run above): exit status 2, the message, nothing written."""
  run_dir = tmp_path / "run"
  assert train_main(["--config", "configs/tiny_dense.yaml", *SMALL,
                     f"data.source={text_dir}", f"train.run_dir={run_dir}",
                     "model.n_heads=3"]) == 2
  assert "model.n_heads: got 3" in capsys.readouterr().err
  assert not run_dir.exists()

  assert train_main(["--config", "configs/tiny_dense.yaml", *SMALL,
                     f"data.source={tmp_path / 'missing'}",
                     f"train.run_dir={run_dir}"]) == 2
  assert "neither a corpus name" in capsys.readouterr().err
  assert not run_dir.exists()


def test_eval_refuses_a_directory_without_a_run(tmp_path, capsys):
  assert eval_main(["loss", "--run_dir", str(tmp_path)]) == 2
  assert "has no config.yaml" in capsys.readouterr().err
