"""The run directory (training/run_dir.py): its files and checkpoint listing,
moving a run aside, the process-count check, and the one rule for "the
same model and data" as the resume check and evaluation's guard use it."""

import copy
import dataclasses
import importlib.util
import json
import pathlib

import pytest

from ultramem_jax.config import ConfigError, to_dict
from ultramem_jax.evaluation.restore import load_run_config
from ultramem_jax.training.config import load_config
from ultramem_jax.training.run_dir import (RunDir, check_resume, is_checkpoint_step,
                                           model_data_difference)
from ultramem_jax.training.trainer import train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _eval_main():
  spec = importlib.util.spec_from_file_location("eval_cli", ROOT / "eval.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.main


def tiny_config(run_dir, source, *extra):
  return load_config(ROOT / "configs/tiny_dense.yaml", [
      "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
      "model.ffn.inner_dim=64", f"data.source={source}", "data.tokenizer=bytes",
      "data.seq_len=32", "data.batch_size=8", "data.val_fraction=0.1",
      "optimizer.warmup_steps=1", "train.log_every=1", "train.progress_bar=false",
      "train.steps=2", "train.eval_every=2", "train.checkpoint_every=2",
      f"train.run_dir={run_dir}", *extra])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, text_dir):
  """A 2-step run on `text_dir` (bytes tokenizer, vocab_size 0 resolved to 257)."""
  run_dir = tmp_path_factory.mktemp("run_dir") / "run"
  train(tiny_config(run_dir, text_dir), log=lambda s: None)
  return run_dir


# ----------------------------------------------------------------------------- the rule

SAVED = {"model": {"d_model": 32, "vocab_size": 257,
                   "memory": {"kernels": "auto", "n_keys": 8}},
         "data": {"seq_len": 32, "source": "wiki"},
         "train": {"steps": 10}, "mesh": {"data": -1}}


def _with(**changes):
  """SAVED with dotted keys changed, e.g. _with(**{"model.d_model": 64})."""
  out = copy.deepcopy(SAVED)
  for key, value in changes.items():
    *parents, last = key.split(".")
    node = out
    for p in parents:
      node = node[p]
    node[last] = value
  return out


@pytest.mark.parametrize("changes", [
    {}, {"train.steps": 99}, {"mesh.data": 2}, {"model.memory.kernels": "xla"},
    {"model.vocab_size": 0}], ids=["same", "train", "mesh", "kernels", "vocab0"])
def test_rule_ignores_what_does_not_define_model_or_data(changes):
  new = _with(**changes)
  before = copy.deepcopy(new), copy.deepcopy(SAVED)
  assert model_data_difference(SAVED, new) is None
  assert model_data_difference(new, SAVED) is None  # either side
  assert (new, SAVED) == before  # neither input is changed


@pytest.mark.parametrize("changes, expected", [
    ({"model.d_model": 64}, ("model.d_model", 32, 64)),
    ({"model.vocab_size": 300}, ("model.vocab_size", 257, 300)),
    ({"model.memory.n_keys": 16}, ("model.memory.n_keys", 8, 16)),
    ({"data.seq_len": 64}, ("data.seq_len", 32, 64)),
    ({"data.source": "sotu", "model.d_model": 64}, ("model.d_model", 32, 64)),
    ({"model.memory.kernels": "xla", "data.seq_len": 64}, ("data.seq_len", 32, 64)),
])
def test_rule_names_the_first_differing_key_and_both_values(changes, expected):
  assert model_data_difference(SAVED, _with(**changes)) == expected


def test_rule_takes_configs(tmp_path, text_dir):
  cfg = tiny_config(tmp_path / "run", text_dir)
  resolved = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=257))
  assert cfg.model.vocab_size == 0
  assert model_data_difference(resolved, cfg) is None
  assert model_data_difference(to_dict(resolved), cfg) is None
  other = tiny_config(tmp_path / "run", text_dir, "data.batch_size=16")
  assert model_data_difference(resolved, other) == ("data.batch_size", 8, 16)


# ----------------------------------------------------------------------------- the directory

def test_run_dir_files_and_checkpoints(trained_run):
  run = RunDir(trained_run)
  for path in (run.config, run.tokenizer, run.metrics, run.summary, run.plot,
               run.tensorboard):
    assert path.exists(), path
  assert run.checkpoint_steps() == [2] and run.latest_checkpoint_step() == 2
  assert is_checkpoint_step(run.checkpoint(2))
  assert json.loads(run.summary.read_text())["step"] == 2
  assert run.saved_config()["model"]["vocab_size"] == 257


def test_incomplete_steps_are_not_listed(tmp_path):
  run = RunDir(tmp_path / "run")
  assert run.checkpoint_steps() == [] and run.latest_checkpoint_step() is None
  assert not run.root.exists()  # listing creates nothing
  (run.checkpoint(4)).mkdir(parents=True)  # orbax's marker missing: unfinished
  (run.checkpoints / "tmp").mkdir()
  (run.checkpoint(3)).mkdir()
  (run.checkpoint(3) / "_CHECKPOINT_METADATA").write_text("{}")
  assert run.checkpoint_steps() == [3] and not is_checkpoint_step(run.checkpoint(4))


def test_move_aside_and_process_count(tmp_path):
  run = RunDir(tmp_path / "run")
  data = run.checkpoint(5) / "data"
  data.mkdir(parents=True)
  run.check_process_count(5)  # no iterator files: nothing to check
  (data / "process_0-of-2.json").write_text("{}")
  (data / "process_1-of-2.json").write_text("{}")
  with pytest.raises(ConfigError, match=r"checkpoint 5 was written by 2 process\(es\); "
                     r"this run has 1; resume it with 2"):
    run.check_process_count(5)
  moved = run.move_aside()
  assert moved.name.startswith("run.replaced-") and (moved / "checkpoints" / "5").is_dir()
  assert not run.root.exists()


# ----------------------------------------------------------------------------- resume check

def test_resume_check_uses_the_rule(trained_run, text_dir):
  assert check_resume(tiny_config(trained_run, text_dir)) == (2, False)
  assert check_resume(tiny_config(trained_run, text_dir, "model.memory.kernels=xla",
                                  "train.steps=4")) == (2, False)
  with pytest.raises(ConfigError, match=r"^data.seq_len: the run has 32, this config 64; "
                     r".*train.overwrite=true"):
    check_resume(tiny_config(trained_run, text_dir, "data.seq_len=64"))
  assert check_resume(tiny_config(trained_run, text_dir, "model.d_model=48",
                                  "train.overwrite=true")) == (None, True)


# ----------------------------------------------------------------------------- eval guard

@pytest.mark.parametrize("command", ["loss", "tasks", "generate"])
@pytest.mark.parametrize("override, key", [("model.d_model=64", "model.d_model"),
                                           ("data.seq_len=64", "data.seq_len")])
def test_eval_refuses_model_and_data_overrides(trained_run, capsys, command,
                                               override, key):
  code = _eval_main()([command, "--run_dir", str(trained_run), "--no_progress",
                       override])
  err = capsys.readouterr().err
  assert code == 2, err
  assert f"error: {key}: the run has 32, the overrides give 64; overrides may " \
         f"not change the {key.split('.')[0]} section of a trained run" in err


def test_eval_accepts_another_kernel_choice(trained_run, capsys, tmp_path):
  cfg = load_run_config(trained_run, ["model.memory.kernels=xla", "mesh.data=4",
                                      "mesh.fsdp=2"])
  assert cfg.model.memory.kernels == "xla" and cfg.mesh.fsdp == 2
  assert _eval_main()(["loss", "--run_dir", str(trained_run), "--position_corpora",
                       "none", "--no_progress", "--out", str(tmp_path),
                       "model.memory.kernels=xla"]) == 0
  result = json.loads(capsys.readouterr().out)
  summary = json.loads((trained_run / "summary.json").read_text())
  assert result["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-6)


def test_eval_by_config_refuses_other_data(trained_run, capsys, tmp_path):
  code = _eval_main()(["loss", "--config", str(trained_run / "config.yaml"),
                       "--checkpoint", str(trained_run / "checkpoints" / "2"),
                       "--no_progress", "--out", str(tmp_path), "data.seq_len=64"])
  assert code == 2
  assert ("--config: data.seq_len: the checkpoint was trained with 32, --config "
          "has 64") in capsys.readouterr().err
