"""Bad input that once gave a traceback: each case is provoked for real and
must stop with exit status 2 and a message naming the key or file, before
anything is compiled or written, leaving what was already written as it was.

The tests run as root, for whom permission bits do not make a directory
unwritable; an unwritable place is a path under a regular file, or /proc.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import pathlib
import shutil
import time

import pytest

from test_robustness import SMALL
from ultramem_jax.config import ConfigError
from ultramem_jax.data import corpora
from ultramem_jax.data.corpora import DataError, load_documents
from ultramem_jax.training.config import load_config
from ultramem_jax.training.run_dir import model_data_difference
from ultramem_jax.training.trainer import train

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load_cli(name: str):
  spec = importlib.util.spec_from_file_location(f"{name}_cli", REPO / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.main


train_main, eval_main = _load_cli("train"), _load_cli("eval")


def train_args(run_dir, source, *extra):
  return ["--config", str(REPO / "configs/tiny_dense.yaml"), *SMALL,
          f"data.source={source}", f"train.run_dir={run_dir}", *extra]


def snapshot(root: pathlib.Path) -> dict[str, str]:
  """sha256 of every file under `root` (nothing: {})."""
  if not root.exists():
    return {}
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def refused(main, args, capsys, *needles, within_s: float = 60.0) -> str:
  """Runs a command line in this process: exit status 2, a message on stderr
  holding every needle, in less than `within_s`; returns the message."""
  t0 = time.perf_counter()
  status = main([str(a) for a in args])
  elapsed = time.perf_counter() - t0
  err = capsys.readouterr().err
  assert status == 2, err[-3000:]
  for needle in needles:
    assert needle in err, err[-3000:]
  assert "Traceback" not in err
  assert elapsed < within_s, f"took {elapsed:.1f}s"
  return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_dir):
  """A finished three-step run (config, tokenizer, checkpoint 3)."""
  run_dir = tmp_path_factory.mktemp("inputs") / "run"
  cfg = load_config(REPO / "configs/tiny_dense.yaml", SMALL + [
      f"data.source={text_dir}", f"train.run_dir={run_dir}", "train.steps=3",
      "train.checkpoint_every=3"])
  train(cfg, log=lambda s: None)
  return run_dir


@pytest.fixture
def plain_file(tmp_path) -> pathlib.Path:
  path = tmp_path / "plain"
  path.write_text("a regular file\n")
  return path


# ----------------------------------------------------------------- data cache


def test_unwritable_data_dir_is_refused_before_anything(tmp_path, plain_file,
                                                        capsys):
  run_dir = tmp_path / "run"
  refused(train_main, train_args(run_dir, "wiki", f"data.data_dir={plain_file}/cache"),
          capsys, "data.data_dir", f"{plain_file}/cache", "is not a directory")
  assert not run_dir.exists()
  assert plain_file.read_text() == "a regular file\n"


def test_unwritable_env_data_dir_names_the_variable(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("ULTRAMEM_DATA_DIR", "/proc/ultramem-test-cache")
  run_dir = tmp_path / "run"
  refused(train_main, train_args(run_dir, "wiki"), capsys,
          "ULTRAMEM_DATA_DIR", "/proc/ultramem-test-cache", "not writable")
  assert not run_dir.exists() and not pathlib.Path("/proc/ultramem-test-cache").exists()


def test_data_dir_is_checked_before_the_download(plain_file):
  calls = []
  with pytest.raises(DataError, match=r"data.data_dir: .* is not a directory"):
    load_documents("wiki", plain_file, downloader=lambda *a: calls.append(a))
  assert calls == []


def test_a_complete_cache_is_read_without_writing(tmp_path, monkeypatch):
  """A cache that holds the archive and its parsed documents is only read:
  a read-only shared cache keeps working."""
  spec = corpora.CORPORA["sotu"]
  archive = tmp_path / "sotu" / spec.filename
  archive.parent.mkdir()
  archive.write_bytes(b"archive")
  monkeypatch.setitem(corpora.CORPORA, "sotu", dataclasses.replace(
      spec, sha256=hashlib.sha256(b"archive").hexdigest(),
      parse=lambda path: ["one document"]))
  assert load_documents("sotu", tmp_path) == ["one document"]
  before = snapshot(tmp_path)
  monkeypatch.setattr(corpora, "_check_cache_dir", lambda *a: pytest.fail("checked"))
  assert load_documents("sotu", tmp_path) == ["one document"]
  assert snapshot(tmp_path) == before


# ----------------------------------------------------------------- sizes


def test_absurd_vocab_size_is_refused_before_the_run_dir_is_written(
    tmp_path, text_dir, capsys):
  run_dir = tmp_path / "run"
  refused(train_main, train_args(run_dir, text_dir, "model.vocab_size=50000000"),
          capsys, "model.vocab_size: got 50000000; must be at most 16,777,216")
  assert not run_dir.exists()


def test_vocab_that_cannot_fit_memory_is_refused_before_any_data(tmp_path, capsys):
  """16M entries (under the bound) with a batch of 64 x 1024 tokens need
  terabytes of logits; refused from the abstract model, before the data
  (here a source that does not exist) is read."""
  run_dir = tmp_path / "run"
  err = refused(train_main, train_args(
      run_dir, tmp_path / "no-such-text", "model.vocab_size=16000000",
      "data.batch_size=64", "data.seq_len=1024"), capsys,
      "model.vocab_size: got 16000000; training needs at least",
      "are available (", "logits of data.batch_size=64 x data.seq_len=1024")
  assert "data.source" not in err
  assert not run_dir.exists()


def test_generate_beyond_memory_is_refused_before_restoring(trained, capsys):
  before = snapshot(trained)
  prompts = [a for i in range(8) for a in ("--prompt", f"p{i}")]
  refused(eval_main, ["generate", "--run_dir", trained, *prompts,
                      "--max_new_tokens", 100000000, "--no_progress"], capsys,
          "--max_new_tokens: got 100000000", "100,000,002 slots x 8 row(s)",
          "are available (", "data.seq_len=32", within_s=20)
  refused(eval_main, ["generate", "--run_dir", trained, "--max_new_tokens",
                      3000000000], capsys,
          "--max_new_tokens: got 3000000000", "int32 positions")
  assert snapshot(trained) == before


# ----------------------------------------------------------------- --out


@pytest.mark.parametrize("command", ["loss", "tasks"])
def test_unwritable_out_is_refused_before_evaluating(trained, plain_file, command,
                                                     capsys, monkeypatch):
  before = snapshot(trained)
  evaluated = []
  monkeypatch.setattr(  # evaluating at all is the failure
      "ultramem_jax.evaluation.restore.restore_state",
      lambda *a, **k: evaluated.append(a) or pytest.fail("restored"))
  refused(eval_main, [command, "--run_dir", trained, "--out",
                      f"{plain_file}/report", "--no_progress"], capsys,
          "--out:", f"{plain_file}/report", "is not a directory")
  assert evaluated == [] and snapshot(trained) == before


def test_default_out_in_an_unwritable_run_dir(trained, tmp_path, capsys):
  run_dir = tmp_path / "copy"
  shutil.copytree(trained, run_dir)
  (run_dir / "eval").write_text("not a directory\n")
  before = snapshot(run_dir)
  refused(eval_main, ["loss", "--run_dir", run_dir, "--no_progress"], capsys,
          "--out (default RUN/eval, here):", f"{run_dir}/eval")
  assert snapshot(run_dir) == before


def test_unwritable_cost_out_is_refused_before_compiling(plain_file, capsys):
  refused(eval_main, ["cost", "--config", REPO / "configs/tiny_dense.yaml",
                      "--out", f"{plain_file}/sub/table"], capsys,
          "--out:", f"{plain_file}/sub", "cannot be created", within_s=20)


# ----------------------------------------------------------------- config.yaml


DAMAGED = {"malformed": "model: {d_model: [32\n", "empty": "",
           "scalar": "just a string\n", "section": "model: 3\ndata: {}\n"}
MESSAGES = {"malformed": "is not valid YAML", "empty": "is empty",
            "scalar": "not a mapping of config sections",
            "section": "section 'model' of the run's saved config is not a mapping"}


@pytest.mark.parametrize("damage", sorted(DAMAGED))
def test_damaged_saved_config_names_the_file(trained, tmp_path, text_dir, damage,
                                             capsys):
  run_dir = tmp_path / "copy"
  shutil.copytree(trained, run_dir)
  (run_dir / "config.yaml").write_text(DAMAGED[damage])
  before = snapshot(run_dir)
  config = str(run_dir / "config.yaml")
  for command in ("loss", "generate", "tasks"):
    refused(eval_main, [command, "--run_dir", run_dir, "--no_progress"], capsys,
            repr(config), MESSAGES[damage])
  refused(train_main, train_args(run_dir, text_dir, "train.steps=6"), capsys,
          repr(config), MESSAGES[damage], "train.overwrite=true")
  assert snapshot(run_dir) == before


def test_saved_config_that_does_not_load_names_the_file(trained, tmp_path, capsys):
  run_dir = tmp_path / "copy"
  shutil.copytree(trained, run_dir)
  (run_dir / "config.yaml").write_text("model: {d_model: many}\n")
  refused(eval_main, ["loss", "--run_dir", run_dir], capsys,
          repr(str(run_dir / "config.yaml")), "does not load: model.d_model: got 'many'")


def test_overwrite_moves_a_run_with_a_damaged_config_aside(trained, tmp_path,
                                                           text_dir):
  run_dir = tmp_path / "copy"
  shutil.copytree(trained, run_dir)
  (run_dir / "config.yaml").write_text("")
  before = snapshot(run_dir)
  messages = []
  train(load_config(REPO / "configs/tiny_dense.yaml", SMALL + [
      f"data.source={text_dir}", f"train.run_dir={run_dir}", "train.steps=2",
      "train.overwrite=true"]), log=messages.append)
  moved = list(tmp_path.glob("copy.replaced-*"))
  assert len(moved) == 1 and snapshot(moved[0]) == before
  assert any(str(moved[0]) in m for m in messages)


# ----------------------------------------------------------------- part 5


def test_home_is_expanded_in_every_path_key(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  cfg = load_config(REPO / "configs/tiny_dense.yaml", [
      "train.run_dir=~/runs/x", "data.data_dir=~/cache", "data.source=~/texts"])
  assert cfg.train.run_dir == str(tmp_path / "runs/x")
  assert cfg.data.data_dir == str(tmp_path / "cache")
  assert cfg.data.source == str(tmp_path / "texts")
  assert load_config(REPO / "configs/tiny_dense.yaml").data.source == "wiki"
  # A run saved before the expansion is still the same data.
  assert model_data_difference({"data": {"source": "~/texts"}},
                               {"data": {"source": str(tmp_path / "texts")}}) is None


def test_tilde_run_dir_is_created_in_home(tmp_path, text_dir, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.chdir(tmp_path)
  train(load_config(REPO / "configs/tiny_dense.yaml", SMALL + [
      f"data.source={text_dir}", "train.run_dir=~/run", "train.steps=2"]),
      log=lambda s: None)
  assert (tmp_path / "home/run/config.yaml").is_file()
  assert not (tmp_path / "~").exists()


def test_layout_is_checked_before_the_tokenizer_is_trained(tmp_path, text_dir,
                                                           monkeypatch):
  trained_tokenizers = []
  monkeypatch.setattr("ultramem_jax.data.pipeline.train_tokenizer",
                      lambda *a: trained_tokenizers.append(a) or pytest.fail("trained"))
  for tokenizer in ("bytes", "bpe"):
    cfg = load_config(REPO / "configs/tiny_dense.yaml", SMALL + [
        f"data.source={text_dir}", f"train.run_dir={tmp_path / 'run'}",
        f"data.tokenizer={tokenizer}", "data.bpe_vocab_size=300",
        "mesh.data=1", "mesh.tensor=8"])
    with pytest.raises(ConfigError, match=r"mesh.tensor: 8 shards do not divide"):
      train(cfg, log=lambda s: None)
  assert trained_tokenizers == [] and not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "inf", "nan", "1e400"])
def test_non_finite_floats_are_refused(value, tmp_path, text_dir, capsys):
  with pytest.raises(ConfigError, match=r"optimizer.lr: got .*; must be a finite number"):
    load_config(REPO / "configs/tiny_dense.yaml", [f"optimizer.lr={value}"])
  with pytest.raises(ConfigError, match=r"model.memory.share_ratio: got .*; must be a finite"):
    load_config(REPO / "configs/tiny_dense.yaml", [f"model.memory.share_ratio={value}"])
  if value == ".inf":
    refused(train_main, train_args(tmp_path / "run", text_dir, f"optimizer.lr={value}"),
            capsys, "optimizer.lr: got inf; must be a finite number")
    assert not (tmp_path / "run").exists()


def test_a_directory_as_config_is_named_a_directory(tmp_path, capsys):
  refused(train_main, ["--config", tmp_path], capsys,
          f"config file {str(tmp_path)!r} is a directory; expected a YAML file")
  refused(eval_main, ["cost", "--config", tmp_path, "--no_xla"], capsys,
          "is a directory; expected a YAML file")


def test_upper_case_suffixes_are_read(tmp_path):
  (tmp_path / "A.TXT").write_text("upper text")
  (tmp_path / "b.Md").write_text("mixed markdown")
  (tmp_path / "c.JSONL").write_text('{"text": "a json line"}\n')
  (tmp_path / "d.JSON").write_text('{"text": "not read"}')
  (tmp_path / "e.csv").write_text("not read")
  assert load_documents(str(tmp_path)) == ["upper text", "mixed markdown",
                                           "a json line"]
  with pytest.raises(DataError, match=r"a .json file is not read as text"):
    load_documents(str(tmp_path / "d.JSON"))
