"""Training on the task suite (data.tasks) and eval.py tasks.

The config checks, the grain stream of task and text rows (deterministic,
resumable, mixed at the requested share, loss on the answers), the weighted
loss, the scoring path of eval.py tasks with stand-in predictors, and a tiny
run trained on MQAR and scored from the command line.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ultramem_jax.config import ConfigError
from ultramem_jax.data import task_data
from ultramem_jax.data.pipeline import prepare_data
from ultramem_jax.data.tokenizer import ByteTokenizer
from ultramem_jax.evaluation import tasks as eval_tasks
from ultramem_jax.evaluation.task_report import write_report
from ultramem_jax.evaluation.task_scores import BUCKETS, evaluate_tasks
from ultramem_jax.parallel.mesh import single_device_mesh, use_mesh
from ultramem_jax.tasks import TASKS, TaskSource, TokenSpace, get_task
from ultramem_jax.training.config import load_config
from ultramem_jax.training.state import create_state
from ultramem_jax.training.step import loss_fn, token_losses
from ultramem_jax.training.trainer import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BYTES = TokenSpace.for_tokenizer(ByteTokenizer())
SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2",
         "model.ffn.inner_dim=64", "data.tokenizer=bytes", "data.seq_len=32",
         "data.batch_size=8", "data.val_fraction=0.1",
         "optimizer.warmup_steps=1", "train.progress_bar=false"]


def small_config(source, *overrides):
  return load_config(ROOT / "configs/tiny_dense.yaml",
                     SMALL + [f"data.source={source}", *overrides])


def _eval_main():
  spec = importlib.util.spec_from_file_location("eval_cli", ROOT / "eval.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.main


@pytest.fixture(scope="module")
def text(text_dir):
  return prepare_data(small_config(text_dir).data)


def _tasks(source, text, spec, *overrides):
  cfg = small_config(source, f"data.tasks={spec}", *overrides)
  return cfg, task_data.build(cfg.data, text, seed=cfg.train.seed)


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("spec,needle", [
    ("mqr", "unknown task 'mqr'"), ("mqar:0", "positive"),
    ("mqar:x", "not a number"), ("mqar,,niah", "empty entry"),
    ("mqar,mqar", "twice"), ("text", "names no task"),
])
def test_bad_mixture_names_data_tasks(text_dir, spec, needle):
  with pytest.raises(ConfigError, match=r"^data\.tasks") as e:
    small_config(text_dir, f"data.tasks={spec}")
  assert needle in str(e.value)


@pytest.mark.parametrize("override,needle", [
    ("data.task_params.mqar.pairs=4", r"^data\.task_params\.mqar\.pairs: unknown"),
    ("data.task_params.mqr.num_pairs=4", r"^data\.task_params\.mqr: unknown task"),
    ("data.task_params.mqar.num_pairs=40",
     r"^data\.task_params\.mqar: .*data\.seq_len=32.*at most 7 fit"),
])
def test_bad_task_params_name_the_key(text_dir, override, needle):
  with pytest.raises(ConfigError, match=needle):
    small_config(text_dir, "data.tasks=mqar", override)


def test_text_only_config_is_unchanged(text_dir):
  cfg = small_config(text_dir, "data.tasks=mqar:1,text:3",
                     "data.task_params.mqar.num_pairs=[2,6]")
  assert cfg.data.task_params == {"mqar": {"num_pairs": [2, 6]}}
  assert task_data.mixture_weights(cfg.data.tasks) == (0.75, {"mqar": 1.0})
  assert small_config(text_dir).data.tasks == ""


# ----------------------------------------------------------------------------- the stream

def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_stream_is_deterministic_and_resumes(text_dir, text):
  cfg, tasks = _tasks(text_dir, text, "mqar:1,niah:1,text:2")
  make = lambda: iter(task_data.train_dataset(cfg.data, tasks, text.train_rows, 7))  # noqa: E731
  first = _take(make(), 6)
  assert _same(first, _take(make(), 6))
  batch = first[0]
  assert set(batch) == {"inputs", "targets", "weights"}
  assert batch["inputs"].shape == (8, 32) and batch["inputs"].dtype == np.int32
  assert batch["weights"].dtype == np.float32
  assert not _same(first, _take(iter(task_data.train_dataset(
      cfg.data, tasks, text.train_rows, 8)), 6))

  it = make()
  _take(it, 3)
  state = it.get_state()
  after = _take(it, 3)
  again = make()
  again.set_state(json.loads(json.dumps(state)))  # as the checkpoint stores it
  assert _same(after, _take(again, 3))
  assert _same(after, first[3:])


def test_processes_split_each_batch(text_dir, text):
  cfg, tasks = _tasks(text_dir, text, "mqar:1,text:1")
  whole = next(iter(task_data.train_dataset(cfg.data, tasks, text.train_rows, 0)))
  parts = [next(iter(task_data.train_dataset(cfg.data, tasks, text.train_rows,
                                             0, i, 2))) for i in range(2)]
  for k in whole:
    assert np.array_equal(np.sort(whole[k], 0),
                          np.sort(np.concatenate([p[k] for p in parts]), 0))


def test_mixes_text_and_tasks_at_the_ratio(text_dir, text):
  cfg, tasks = _tasks(text_dir, text, "mqar:1,niah:3,text:2")
  rows = task_data.row_dataset(cfg.data, tasks, text.train_rows, seed=0)
  n = 1500
  is_text, is_niah = [], []
  for i in range(n):
    row = rows[i]
    text_row = bool(row["weights"].all())
    is_text.append(text_row)
    if not text_row:
      is_niah.append(bool((row["inputs"] == BYTES.needle).any()))
  share = np.mean(is_text)
  assert abs(share - 1 / 3) < 4 * math.sqrt(1 / 3 * 2 / 3 / n)
  m = len(is_niah)
  assert abs(np.mean(is_niah) - 0.75) < 4 * math.sqrt(0.75 * 0.25 / m)
  # Text rows are the training rows, in the order of a shuffle.
  texts = {rows[i]["inputs"].tobytes() for i in range(60) if is_text[i]}
  train = {r[:-1].tobytes() for r in text.train_rows}
  assert texts <= train and len(texts) == sum(is_text[:60])


@pytest.mark.parametrize("loss_on", ["answers", "all"])
def test_weights_mask_exactly_the_answers(text_dir, text, loss_on):
  cfg, tasks = _tasks(text_dir, text, "mqar:1,niah:1,token_mapping:1",
                      f"data.task_loss={loss_on}")
  rows = task_data.row_dataset(cfg.data, tasks, text.train_rows, seed=3)
  src = TaskSource(tasks.mixture, 32, 3, tasks.space,
                             filler=tasks.train_filler)
  for i in range(40):
    row, inst = rows[i], src.instance(i)
    t = len(inst.tokens)
    want = np.zeros(33, np.float32)
    if loss_on == "answers":
      want[:t] = inst.answer_mask
    else:
      want[1:t] = 1.0
    assert np.array_equal(row["weights"], want[1:])
    assert np.array_equal(row["targets"][:t - 1], inst.tokens[1:])
    if loss_on == "answers":
      answers = row["targets"][row["weights"] > 0]
      assert np.isin(answers, tasks.space.values).all()
      assert len(answers) == sum(e - s for s, e in inst.spans)
  # The held-out rows are the eval split's, weighted the same way.
  assert tasks.val_rows.inputs.shape == (cfg.data.task_val_rows, 32)


@dataclasses.dataclass
class _Tokenizer:
  """A stand-in tokenizer of a small vocabulary (12 keys, 12 values)."""
  vocab_size: int = 64
  sep_id: int = 0


def test_task_too_big_for_the_tokenizer_is_a_config_error(text_dir, text):
  # The config check assumes the byte vocabulary (60 keys) and passes; the
  # real tokenizer has 12 keys, which build() reports before compiling.
  cfg = small_config(text_dir, "data.tasks=mqar", "data.seq_len=100",
                     "data.task_params.mqar.num_pairs=20")
  with pytest.raises(ConfigError, match=r"^data\.tasks: mqar\.num_pairs=20: "
                     r"at most 12 fit.*vocabulary of 64"):
    task_data.build(cfg.data, dataclasses.replace(text, tokenizer=_Tokenizer()),
                    seed=0)


# ----------------------------------------------------------------------------- the loss

def test_weighted_loss(text_dir):
  cfg = small_config(text_dir, "model.vocab_size=257")
  rng = np.random.default_rng(0)
  batch = {"inputs": jnp.asarray(rng.integers(0, 257, (8, 32)), jnp.int32),
           "targets": jnp.asarray(rng.integers(0, 257, (8, 32)), jnp.int32)}
  w = (rng.random((8, 32)) < 0.3).astype(np.float32)
  w[0, 0] = 2.5
  with use_mesh(single_device_mesh()):
    graphdef, state = create_state(cfg)

    @jax.jit
    def run(state, w):
      model, _ = nnx.merge(graphdef, state)
      losses = token_losses(model, batch)
      got, metrics = loss_fn(model, {**batch, "weights": w})
      plain, _ = loss_fn(model, batch)
      ones, _ = loss_fn(model, {**batch, "weights": jnp.ones((8, 32))})
      grads = nnx.grad(lambda m: loss_fn(
          m, {**batch, "weights": jnp.zeros((8, 32))})[0])(model)
      return losses, got, metrics, plain, ones, grads

    losses, got, metrics, plain, ones, grads = run(state, jnp.asarray(w))
  losses = np.asarray(losses, np.float64)
  assert float(got) == pytest.approx((losses * w).sum() / w.sum(), rel=1e-5)
  assert float(metrics["loss"]) == float(got)
  assert float(plain) == pytest.approx(losses.mean(), rel=1e-6)
  # Weights of one: the text-only mean, to the last bit.
  assert float(ones) == float(plain)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


# ----------------------------------------------------------------------------- scoring

def solver(name, space, params=None):
  """A predictor that solves `name` from the prompt by brute force."""
  task = get_task(name, **(params or {}))

  def predict(inputs):
    preds = np.full(inputs.shape, space.pad, np.int32)
    for r, row in enumerate(inputs):
      for start, answer in task.solve(row, space):
        n = min(len(answer), inputs.shape[1] - start + 1)
        preds[r, start - 1:start - 1 + n] = answer[:n]
    return preds

  return predict


@pytest.mark.parametrize("name", list(TASKS))
def test_solver_scores_100_through_the_eval_path(name, text):
  filler = task_data.filler_tokens(text.val_rows)
  result = evaluate_tasks(
      solver(name, BYTES), [name], [48, 96], n=12, seed=5, space=BYTES,
      filler=filler, rows_for=5, progress=False)
  t = result["tasks"][name]
  assert t["overall"]["accuracy"] == 1.0 and t["overall"]["n"] >= 24
  assert [r["seq_len"] for r in t["by"]["seq_len"]] == [48, 96]
  for bucket in BUCKETS[name]:
    records = t["by"][f"{bucket},seq_len"]
    assert sum(r["n"] for r in records) == t["overall"]["n"]


def test_uniform_guesser_scores_chance(tmp_path):
  rng = np.random.default_rng(0)
  guess = lambda x: rng.choice(BYTES.values, size=x.shape).astype(np.int32)  # noqa: E731
  result = evaluate_tasks(guess, ["mqar", "token_mapping"], [64],
                          n=300, seed=1, space=BYTES, rows_for=64,
                          progress=False)
  for name, t in result["tasks"].items():
    o = t["overall"]
    assert o["chance"] == pytest.approx(1 / 60)
    sd = math.sqrt(o["chance"] * (1 - o["chance"]) / o["n"])
    assert abs(o["accuracy"] - o["chance"]) < 4 * sd, name
  result.update(run_dir="r", checkpoint="r/checkpoints/1", step=1,
                trained_tasks="mqar", trained_seq_len=32, n=300, seed=1)
  written = write_report(tmp_path, result)
  names = sorted(p.name for p in written)
  assert names == ["tasks_step1.json", "tasks_step1.md",
                   "tasks_step1_mqar_length.png",
                   "tasks_step1_mqar_num_pairs.png",
                   "tasks_step1_token_mapping_length.png",
                   "tasks_step1_token_mapping_n_demos.png"]
  assert "| 64 (beyond training) |" in (tmp_path / "tasks_step1.md").read_text()


def test_argument_errors():
  with pytest.raises(ConfigError, match="--tasks: unknown task 'mqr'"):
    eval_tasks.parse_tasks("mqar,mqr")
  with pytest.raises(ConfigError, match="--lengths"):
    eval_tasks.parse_lengths("64,x")
  with pytest.raises(ConfigError, match="--params"):
    eval_tasks.parse_params(["mqar=3"], {})
  assert eval_tasks.parse_params(["mqar.num_pairs=null", "niah.depth=0.5"],
                                 {"mqar": {"num_pairs": [2, 4]}}) == {
      "mqar": {"num_pairs": None}, "niah": {"depth": 0.5}}
  with pytest.raises(ConfigError, match="--lengths: task 'mqar' at length 4"):
    evaluate_tasks(lambda x: x, ["mqar"], [4], 2, 0, BYTES,
                   progress=False)


# ----------------------------------------------------------------------------- end to end

def test_train_on_mqar_then_eval_tasks_from_the_cli(tmp_path, text_dir, capsys):
  run_dir = tmp_path / "run"
  args = ["data.tasks=mqar:3,text:1", "data.task_val_rows=16",
          "train.log_every=5", "train.eval_every=15",
          "train.checkpoint_every=15", f"train.run_dir={run_dir}"]
  full = train(small_config(text_dir, *args, "train.steps=30"), log=lambda s: None)
  assert full.final_step == 30 and math.isfinite(full.val_task_loss)
  metrics = [json.loads(line) for line in
             (run_dir / "metrics.jsonl").read_text().splitlines()]
  val = [m for m in metrics if "val/task_loss" in m]
  assert [m["step"] for m in val] == [15, 30] and all("val/loss" in m for m in val)
  summary = json.loads((run_dir / "summary.json").read_text())
  assert summary["tasks"] == "mqar:3,text:1"

  # Stopped at 15 and resumed: the same stream, so the same losses.
  other = tmp_path / "resumed"
  args[-1] = f"train.run_dir={other}"
  train(small_config(text_dir, *args, "train.steps=30"), stop_at_step=15,
        log=lambda s: None)
  resumed = train(small_config(text_dir, *args, "train.steps=30"),
                  log=lambda s: None)
  assert {s: resumed.losses[s] for s in range(16, 31)} == pytest.approx(
      {s: full.losses[s] for s in range(16, 31)}, rel=1e-5)

  capsys.readouterr()
  assert _eval_main()(["tasks", "--run_dir", str(run_dir), "--n", "16",
                       "--lengths", "32,64", "--no_progress"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert set(out) == {"mqar"} and set(out["mqar"]) == {"32", "64"}
  assert out["mqar"]["32"]["chance"] == pytest.approx(1 / 60)
  report = json.loads((run_dir / "eval" / "tasks_step30.json").read_text())
  assert report["step"] == 30 and report["trained_seq_len"] == 32
  assert (run_dir / "eval" / "tasks_step30.md").read_text().startswith("Checkpoint")
  png = (run_dir / "eval" / "tasks_step30_mqar_length.png").read_bytes()
  assert png[:8] == PNG_MAGIC

  assert _eval_main()(["tasks", "--run_dir", str(run_dir), "--tasks", "mqr"]) == 2
  assert "unknown task 'mqr'" in capsys.readouterr().err
