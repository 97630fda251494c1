"""eval.py loss: loss per corpus, loss by position against a brute-force
reference, bucket arithmetic, the written report and its errors."""

import dataclasses
import importlib.util
import json
import math
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import make_documents
from ultramem_jax.data.corpora import DataError
from ultramem_jax.data.pipeline import prepare_data
from ultramem_jax.data.tokenizer import ByteTokenizer
from ultramem_jax.evaluation import positions as pos
from ultramem_jax.evaluation.held_out import load_corpus, packed_rows
from ultramem_jax.evaluation.loss import evaluate_loss
from ultramem_jax.evaluation.loss_report import markdown
from ultramem_jax.evaluation.plots import line_plot
from ultramem_jax.evaluation.restore import restore_run
from ultramem_jax.parallel.mesh import MeshConfig, batch_sharding, make_mesh, use_mesh
from ultramem_jax.training.config import load_config
from ultramem_jax.training.state import create_state
from ultramem_jax.training.trainer import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _eval_main():
  spec = importlib.util.spec_from_file_location("eval_cli", ROOT / "eval.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.main


def tiny_config(run_dir, source, **train):
  return load_config(ROOT / "configs/tiny_dense.yaml", [
      "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
      "model.ffn.inner_dim=64", f"data.source={source}", "data.tokenizer=bytes",
      "data.seq_len=32", "data.batch_size=8", "data.val_fraction=0.1",
      "optimizer.warmup_steps=1", "train.log_every=1", "train.progress_bar=false",
      f"train.run_dir={run_dir}",
  ] + [f"train.{k}={v}" for k, v in train.items()])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, text_dir):
  """A 2-step run on `text_dir` (bytes tokenizer, 8 devices)."""
  run_dir = tmp_path_factory.mktemp("loss") / "run"
  train(tiny_config(run_dir, text_dir, steps=2, eval_every=2, checkpoint_every=2),
        log=lambda s: None)
  return run_dir


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory):
  """A second corpus of 30 longer documents (20-40 sentences)."""
  root = tmp_path_factory.mktemp("long")
  for i, doc in enumerate(make_documents(30, seed=7, sentences=(20, 40))):
    (root / f"long{i:02d}.txt").write_text(doc)
  return root


# ----------------------------------------------------------------------------- positions

def test_position_loss_matches_brute_force_log_softmax(tmp_path, text_dir):
  cfg = tiny_config(tmp_path / "run", text_dir)
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=257))
  rng = np.random.default_rng(0)
  context = 12
  lengths = [3, 12, 30, 11, 12, 19, 40]  # 3 and 11 are too short
  docs = [rng.integers(0, 256, size=n).astype(np.int32) for n in lengths]
  windows = pos.document_windows(docs, 256, context, "random")
  assert windows.shape == (5, context + 1)
  assert (windows[:, 0] == 256).all()
  np.testing.assert_array_equal(windows[2, 1:], docs[4][:context])

  mesh = make_mesh(MeshConfig())  # 8 devices: a batch of 8 rows, 3 of them padding
  with use_mesh(mesh):
    graphdef, state = create_state(cfg)
    sums, counts = pos.position_sums(pos.make_position_step(graphdef), state,
                                     windows, 8, batch_sharding(mesh))
  # Reference: the model on one document at a time, unjitted and outside the
  # mesh, then -log p of each target from a float64 log-softmax in numpy.
  model, _ = nnx.merge(graphdef, state)
  ref_sums, ref_counts = np.zeros(context), np.zeros(context)
  for doc in (d for d in docs if len(d) >= context):
    inputs = np.concatenate([[256], doc[:context - 1]])
    logits = np.asarray(model(jnp.asarray(inputs[None])), np.float64)[0]
    top = logits.max(axis=-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
    ref_sums += -logp[np.arange(context), doc[:context]]
    ref_counts += 1
  np.testing.assert_array_equal(counts, ref_counts)
  np.testing.assert_allclose(sums, ref_sums, rtol=2e-5)
  assert 0 < sums[0] / counts[0] < 2 * math.log(257)


def test_document_windows_error_names_the_corpus():
  docs = [np.arange(5, dtype=np.int32), np.arange(9, dtype=np.int32)]
  with pytest.raises(DataError, match=r"corpus 'tiny text'.*none of its 2 documents"
                     r".*--context=10.*longest has 9"):
    pos.document_windows(docs, 0, 10, "tiny text")
  assert pos.document_windows(docs, 0, 9, "tiny text").shape == (1, 10)


def test_buckets_exact_on_hand_made_values():
  assert pos.bucket_edges(10) == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 10)]
  assert pos.bucket_edges(8) == [(0, 1), (1, 2), (2, 4), (4, 8)]
  assert pos.bucket_edges(1) == [(0, 1)]
  assert pos.bucket_edges(10, 4) == [(0, 4), (4, 8), (8, 10)]
  assert pos.bucket_edges(10, 1) == [(i, i + 1) for i in range(10)]

  sums = np.array([8.0, 6.0, 4.0, 2.0, 3.0, 5.0, 1.0, 1.0, 0.5, 1.5])
  counts = np.array([2.0, 2.0, 1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0])
  got = pos.bucket_stats(sums, counts, pos.bucket_edges(10))
  assert got == [
      {"start": 0, "end": 1, "loss": 4.0, "tokens": 2},
      {"start": 1, "end": 2, "loss": 3.0, "tokens": 2},
      {"start": 2, "end": 4, "loss": 3.0, "tokens": 2},
      {"start": 4, "end": 8, "loss": 10.0 / 6.0, "tokens": 6},
      {"start": 8, "end": 10, "loss": 1.0, "tokens": 2}]
  width = pos.bucket_stats(sums, counts, pos.bucket_edges(10, 4))
  assert [(b["loss"], b["tokens"]) for b in width] == [(20 / 6, 6), (10 / 6, 6), (1.0, 2)]
  empty = pos.bucket_stats(np.zeros(2), np.array([0.0, 3.0]), [(0, 1), (1, 2)])
  assert math.isnan(empty[0]["loss"]) and empty[0]["tokens"] == 0

  el = pos.early_late(sums, counts)  # quarters of 10 positions: 2 each
  assert el["early_positions"] == [0, 2] and el["late_positions"] == [8, 10]
  assert el["early_loss"] == 14.0 / 4 and el["late_loss"] == 1.0
  assert el["late_minus_early"] == 1.0 - 3.5


# ----------------------------------------------------------------------------- corpora

def test_held_out_rows_of_the_training_source_are_its_validation_rows(
    tmp_path, text_dir, long_dir):
  cfg = tiny_config(tmp_path / "run", text_dir)
  data = prepare_data(cfg.data, tokenizer=ByteTokenizer())
  own = load_corpus(str(text_dir), cfg.data, ByteTokenizer())
  assert own.trained_on and "6 validation documents of 60" in own.selection
  np.testing.assert_array_equal(packed_rows(own, 256, 32), data.val_rows)

  other = load_corpus(str(long_dir), cfg.data, ByteTokenizer())
  assert not other.trained_on and len(other.token_docs) == 3
  every = load_corpus(str(long_dir), cfg.data, ByteTokenizer(), all_documents=True)
  assert len(every.token_docs) == 30 and every.selection == "all 30 documents"
  same = load_corpus(str(text_dir), cfg.data, ByteTokenizer(), all_documents=True)
  assert len(same.token_docs) == 6  # the training source stays held out


# ----------------------------------------------------------------------------- report

def test_report_over_two_corpora(trained_run, text_dir, long_dir, capsys):
  main = _eval_main()
  corpora = f"{text_dir},{long_dir}"
  assert main(["loss", "--run_dir", str(trained_run), "--corpora", corpora,
               "--context", "64", "--no_progress"]) == 0
  printed = json.loads(capsys.readouterr().out)
  out = trained_run / "eval"
  result = json.loads((out / "loss_step2.json").read_text())
  assert printed == result
  assert result["step"] == 2 and result["seq_len"] == 32
  summary = json.loads((trained_run / "summary.json").read_text())
  assert result["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-6)
  own, other = result["corpora"][str(text_dir)], result["corpora"][str(long_dir)]
  assert own["loss"] == result["val_loss"] and own["trained_on"]
  assert not other["trained_on"] and other["documents"] == 3
  for c in (own, other):
    assert c["perplexity"] == pytest.approx(math.exp(c["loss"]))
    assert 0 < c["unigram_entropy"] < math.log(257) and c["tokens"] > 0

  p = result["positions"]
  assert p["context"] == 64 and p["beyond_trained_length"]
  for c in p["corpora"].values():
    assert [(b["start"], b["end"]) for b in c["buckets"]] == pos.bucket_edges(64)
    assert all(b["tokens"] == c["documents"] * (b["end"] - b["start"])
               for b in c["buckets"])
    means = sum(b["loss"] * b["tokens"] for b in c["buckets"]) / sum(
        b["tokens"] for b in c["buckets"])
    assert math.isfinite(means) and math.isfinite(c["late_minus_early"])
  assert p["corpora"][str(long_dir)]["documents"] == 3

  md = (out / "loss_step2.md").read_text()
  assert f"| {long_dir} | 3 |" in md and "| 32-63 |" in md and "late - early" in md
  assert "beyond the trained sequence length (32)" in md
  png = (out / "loss_by_position_step2.png").read_bytes()
  assert png[:8] == PNG_MAGIC and len(png) > 5_000

  # The same checkpoint named by its config and step directory.
  other_out = trained_run.parent / "by_config"
  assert main(["loss", "--config", str(trained_run / "config.yaml"), "--checkpoint",
               str(trained_run / "checkpoints" / "2"), "--position_corpora", "none",
               "--out", str(other_out), "--no_progress"]) == 0
  by_config = json.loads((other_out / "loss_step2.json").read_text())
  assert by_config["val_loss"] == result["val_loss"]
  assert "positions" not in by_config
  assert not (other_out / "loss_by_position_step2.png").exists()


def test_cli_errors_exit_2(trained_run, text_dir, capsys):
  main = _eval_main()
  assert main(["loss", "--run_dir", str(trained_run), "--corpora",
               "wiki,no_such_corpus", "--no_progress"]) == 2
  assert "'no_such_corpus' is neither a corpus name" in capsys.readouterr().err
  assert main(["loss", "--run_dir", str(trained_run), "--context", "100000",
               "--no_progress"]) == 2
  err = capsys.readouterr().err
  assert f"corpus {str(text_dir)!r}: none of its 6 documents" in err
  assert main(["loss", "--run_dir", str(trained_run), "--buckets", "0"]) == 2
  assert "--buckets" in capsys.readouterr().err
  assert main(["loss", "--run_dir", str(trained_run), "--checkpoint",
               str(trained_run)]) == 2
  assert "either --run_dir, or --config" in capsys.readouterr().err


def test_default_positions_skip_a_corpus_without_long_documents(trained_run, text_dir):
  run = restore_run(trained_run, None, [])
  name = str(text_dir)
  with pytest.raises(DataError, match=f"corpus {name!r}"):
    evaluate_loss(run, [name], [name], 100_000, None, progress=False)
  result = evaluate_loss(run, [name], [name], 100_000, None, progress=False,
                         skip_short=True)
  assert "positions" not in result and "--context=100000" in result["positions_skipped"][name]
  assert "No loss by position: corpus" in markdown({"checkpoint": "c", **result})


def test_line_plot_writes_a_png_with_gaps(tmp_path):
  path = line_plot(tmp_path / "sub" / "p.png",
                   {"a": ([0, 1, 3], [2.0, float("nan"), 1.0]), "b": ([0, 2], [1.0, 1.5])},
                   xlabel="x", ylabel="y", xscale="symlog", vlines={"v": 2},
                   hlines={"h": 1.2})
  assert path.read_bytes()[:8] == PNG_MAGIC
