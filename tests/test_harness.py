"""lm-evaluation-harness on our models (eval.py harness, evaluation/harness_*.py).

References are computed directly from the model's forward pass
(``training.step.token_losses``), never through the LM class:
- loglikelihood of a continuation = minus the sum of the token losses of
  its tokens after the separator and the context (1e-5), for dense, MoE
  and UltraMemV2, including a context truncated from the left and an empty
  one; the same for any batch size and request order;
- loglikelihood_rolling of a document longer than the window = the sum of
  the losses of its windows, each computed by hand;
- generate_until stops at a stop sequence and equals ``eval.py generate``;
- a task in the harness's own YAML format over a JSON-lines file runs end
  to end through ``eval.py harness`` with an accuracy equal to one from
  per-choice log-likelihoods computed directly.
No network: the datasets library is told it is offline.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import functools  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from ultramem_jax.config import ConfigError  # noqa: E402
from ultramem_jax.data.corpora import DataError  # noqa: E402
from ultramem_jax.data.tokenizer import ByteTokenizer  # noqa: E402
from ultramem_jax.evaluation.harness_model import UltraMemLM  # noqa: E402
from ultramem_jax.evaluation.harness_report import report_stem  # noqa: E402
from ultramem_jax.evaluation.harness_scoring import bucket_length  # noqa: E402
from ultramem_jax.evaluation.harness_tasks import (  # noqa: E402
    PAPER_TASKS, load_tasks, parse_tasks, task_manager)
from ultramem_jax.model.transformer import build_model  # noqa: E402
from ultramem_jax.parallel.mesh import single_device_mesh, use_mesh  # noqa: E402
from ultramem_jax.training.config import load_config  # noqa: E402
from ultramem_jax.training.step import token_losses  # noqa: E402

# The tiny trained run of test_generate (a fixture of its own in this module).
from test_generate import trained_run  # noqa: E402,F401

ROOT = pathlib.Path(__file__).resolve().parents[1]
WINDOW = 16
SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2",
         "model.vocab_size=257", "data.tokenizer=bytes",
         f"data.seq_len={WINDOW}"]
KINDS = {
    "dense": ("configs/tiny_dense.yaml", ["model.ffn.inner_dim=64"]),
    "moe": ("configs/tiny_moe.yaml", ["model.ffn.moe.num_experts=8",
                                      "model.ffn.moe.top_k=2",
                                      "model.ffn.moe.expert_dim=16"]),
    "ultramem_v2": ("configs/tiny_ultramem_v2.yaml", [
        "model.ffn.inner_dim=64", "model.memory.layers=all",
        "model.memory.n_keys=6", "model.memory.key_dim=8", "model.memory.top_m=4",
        "model.memory.value_dim=16", "model.memory.pre_value_dim=16",
        "model.memory.init_samples=32", "model.memory.init=released"]),
}
SEP = ByteTokenizer.sep_id
# (context, continuation): plain, empty context, trailing space moved to
# the continuation, a context longer than the window (truncated), and two
# answers that differ only in their last token (they share a row).
PAIRS = [("The cat", " sat."), ("", "Hello"), ("A river ", "runs"),
         ("x" * 7 + "a long context past the window", " end"),
         ("one", " two three four"), ("Q:", " A"), ("Q:", " B")]


def requests(kind: str, args_list) -> list[Instance]:
  return [Instance(kind, {}, args, i) for i, args in enumerate(args_list)]


@pytest.fixture(scope="module")
def mesh():
  with use_mesh(single_device_mesh()) as m:
    yield m


@pytest.fixture(scope="module")
def models(mesh, tmp_path_factory):
  """{kind: (graphdef, params, config)}, randomly initialised."""
  out = {}
  for kind, (path, extra) in KINDS.items():
    run = tmp_path_factory.mktemp(kind)
    cfg = load_config(ROOT / path, [*SMALL, *extra, f"train.run_dir={run}"])
    graphdef, params = nnx.split(build_model(cfg.model, seed=1))
    out[kind] = (graphdef, params, cfg)
  return out


def make_lm(models, kind, mesh, batch_size=4) -> UltraMemLM:
  graphdef, params, cfg = models[kind]
  return UltraMemLM(graphdef, params, cfg, ByteTokenizer(), mesh,
                    batch_size=batch_size, progress=False)


def byte_ids(text: str) -> list[int]:
  return list(text.encode("utf-8"))


@functools.partial(jax.jit, static_argnums=0)
def _direct(graphdef, params, inputs, targets):
  """The model's token losses and argmax tokens for rows of inputs."""
  model = nnx.merge(graphdef, params)
  losses = token_losses(model, {"inputs": inputs, "targets": targets})
  return losses, jnp.argmax(model(inputs), axis=-1)


def direct(graphdef, params, tokens: list[int], n_scored: int
           ) -> tuple[float, bool]:
  """(minus the sum of the token losses of the last `n_scored` targets of
  `tokens`, whether each is its position's argmax): one row of exactly
  those tokens (inputs tokens[:-1], targets tokens[1:])."""
  t = np.asarray(tokens, np.int32)[None]
  losses, argmax = _direct(graphdef, params, jnp.asarray(t[:, :-1]),
                           jnp.asarray(t[:, 1:]))
  losses = np.asarray(losses, np.float64)[0, -n_scored:]
  greedy = (np.asarray(argmax)[0, -n_scored:] == t[0, -n_scored:]).all()
  return -float(losses.sum()), bool(greedy)


def direct_logprob(graphdef, params, tokens: list[int], n_scored: int) -> float:
  return direct(graphdef, params, tokens, n_scored)[0]


def reference_pair(context: str, continuation: str) -> tuple[list[int], int]:
  """The harness's convention with our separator, by hand (bytes)."""
  spaces = len(context) - len(context.rstrip())
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  tokens = [SEP] + byte_ids(context) + byte_ids(continuation)
  return tokens[-(WINDOW + 1):], len(byte_ids(continuation))


@pytest.mark.parametrize("kind", list(KINDS))
def test_loglikelihood_is_minus_the_summed_token_losses(models, mesh, kind):
  graphdef, params, _ = models[kind]
  lm = make_lm(models, kind, mesh)
  got = lm.loglikelihood(requests("loglikelihood", PAIRS))
  assert lm.scorer.forwarded == len(PAIRS) - 1
  for (context, continuation), (logp, greedy) in zip(PAIRS, got):
    want, want_greedy = direct(graphdef, params, *reference_pair(context, continuation))
    np.testing.assert_allclose(logp, want, rtol=1e-5, atol=1e-5)
    assert greedy == want_greedy
  assert any(len(c) + len(x) + 1 > WINDOW + 1 for c, x in PAIRS)   # truncated


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_results_do_not_depend_on_batch_size_or_order(models, mesh, kind):
  pairs = PAIRS + [("The dog", " ran"), ("B", "c")]
  base = make_lm(models, kind, mesh, batch_size=4).loglikelihood(
      requests("loglikelihood", pairs))
  order = np.random.default_rng(0).permutation(len(pairs))
  for size in (4, 1):
    shuffled = make_lm(models, kind, mesh, batch_size=size).loglikelihood(
        requests("loglikelihood", [pairs[i] for i in order]))
    for j, i in enumerate(order):
      np.testing.assert_allclose(shuffled[j][0], base[i][0], rtol=1e-6, atol=1e-6)
      assert shuffled[j][1] == base[i][1]


def test_rolling_loglikelihood_sums_the_windows(models, mesh):
  graphdef, params, _ = models["dense"]
  doc = "The quick brown fox jumps over the lazy dog!"   # 44 bytes
  ids = byte_ids(doc)
  assert len(ids) > 2 * WINDOW
  # By hand: W tokens after the separator; the next W with the W tokens
  # before them as inputs; the last 12 with a full window before them.
  want = direct_logprob(graphdef, params, [SEP] + ids[:WINDOW], WINDOW)
  want += direct_logprob(graphdef, params, ids[WINDOW - 1:2 * WINDOW], WINDOW)
  rest = len(ids) - 2 * WINDOW
  want += direct_logprob(graphdef, params, ids[-WINDOW - 1:], rest)
  lm = make_lm(models, "dense", mesh)
  (got,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(doc,)]))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  short = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [("Hi",)]))
  np.testing.assert_allclose(short[0], direct_logprob(
      graphdef, params, [SEP] + byte_ids("Hi"), 2), rtol=1e-5)


def test_generate_until_stops_at_the_stop_sequence(models, mesh):
  lm = make_lm(models, "dense", mesh)
  free = lm.generate_until(requests("generate_until", [
      ("The cat", {"until": [], "max_gen_toks": 8})]))[0]
  assert len(free.encode("utf-8", "surrogateescape")) > 0
  stop = free[3:5]
  cut = lm.generate_until(requests("generate_until", [
      ("The cat", {"until": [stop], "max_gen_toks": 8}),
      ("Other prompt", {"until": [stop], "max_gen_toks": 8})]))
  assert cut[0] == free[:free.index(stop)] and stop not in cut[1]


def test_bucket_lengths_are_powers_of_two_up_to_the_window():
  assert [bucket_length(n, 100) for n in (1, 16, 17, 33, 64, 65, 100)] == [
      16, 16, 32, 64, 64, 100, 100]
  with pytest.raises(ValueError, match="exceed the window"):
    bucket_length(101, 100)


def test_report_names_never_overwrite(tmp_path):
  stem = report_stem(tmp_path, 300, list(PAPER_TASKS), True, None, None)
  assert stem.name == "harness_step300_paper"
  (tmp_path / "harness_step300_paper.json").write_text("{}")
  assert report_stem(tmp_path, 300, list(PAPER_TASKS), True, None, None).name == (
      "harness_step300_paper-2")
  assert report_stem(tmp_path, 3, ["a", "b"], False, 5, 0.5).name == (
      "harness_step3_a-b_5shot_limit0.5")


def test_task_names_and_the_offline_error(tmp_path):
  assert parse_tasks("paper") == list(PAPER_TASKS)
  assert parse_tasks("piqa, paper") == ["piqa"] + [t for t in PAPER_TASKS if t != "piqa"]
  with pytest.raises(ConfigError, match="--tasks"):
    parse_tasks(" , ")
  (tmp_path / "hub.yaml").write_text(
      "task: hub_task\ndataset_path: someone/not_here\noutput_type: "
      "multiple_choice\ntest_split: test\ndoc_to_text: q\ndoc_to_choice: "
      "['a', 'b']\ndoc_to_target: 0\n")
  manager = task_manager(["hub_task"], [tmp_path])
  with pytest.raises(DataError, match=r"task 'hub_task' could not load its "
                     r"dataset 'someone/not_here'.*network access"):
    load_tasks(manager, ["hub_task"])


# ------------------------------------------------------- a trained run, CLI

MC = [("What does the cat see?", ["the dog", "a river", "green stone"], 0),
      ("Where is the bird?", ["near the tree", "under the house", "blue"], 1),
      ("Which is small?", ["the fish", "the river"], 0),
      ("The old dog likes", ["red fish", "new house", "slowly", "stone"], 2),
      ("A red bird finds", ["a fish", "the stone", "one tree"], 2),
      ("Every cat runs", ["quickly", "under the tree"], 1)]


def write_task(root: pathlib.Path) -> pathlib.Path:
  root.mkdir()
  data = root / "mc.jsonl"
  data.write_text("".join(json.dumps({"question": q, "choices": c, "label": a}) + "\n"
                          for q, c, a in MC))
  (root / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
  # A second task over the same file and a group of the two, as mmlu is.
  (root / "tiny_mc_b.yaml").write_text(
      "include: tiny_mc.yaml\ntask: tiny_mc_b\n"
      "doc_to_text: \"Q: {{question}}\\nA:\"\n")
  (root / "tiny_group.yaml").write_text(
      "group: tiny_group\ntask:\n  - tiny_mc\n  - tiny_mc_b\n"
      "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n")
  return root


def eval_main():
  """eval.py's main, run in this process."""
  spec = importlib.util.spec_from_file_location("eval_cli", ROOT / "eval.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.main


def test_a_yaml_task_runs_end_to_end_and_generation_matches(trained_run, tmp_path,
                                                            capsys):
  tasks = write_task(tmp_path / "tasks")
  main = eval_main()
  assert main(["harness", "--run_dir", str(trained_run), "--tasks", "tiny_mc",
               "--include_path", str(tasks), "--batch_size", "4",
               "--no_progress"]) == 0
  printed = capsys.readouterr().out
  assert main(["generate", "--run_dir", str(trained_run), "--prompt", "The cat",
               "--max_new_tokens", "10", "--no_progress"]) == 0
  generated = capsys.readouterr().out
  lm = UltraMemLM.from_run(trained_run, batch_size=2, progress=False)
  tok, sep = lm.tok, lm.sep

  # Every (question, choice) row right-padded to the window in one call:
  # attention is causal, so what follows a row's tokens changes nothing.
  rows, spans = [], []
  for question, choices, _ in MC:
    context = f"Question: {question}\nAnswer:"
    ctx = tok.encode_batch([context])[0].tolist()
    for choice in choices:
      cont = tok.encode_batch([f"{context} {choice}"])[0].tolist()[len(ctx):]
      rows.append(([sep] + ctx + cont)[-(lm.window + 1):])   # from the left
      spans.append(len(cont))
  width = max(map(len, rows))
  assert width == lm.window + 1     # some rows were truncated
  padded = np.full((len(rows), width), sep, np.int32)
  for r, row in enumerate(rows):
    padded[r, :len(row)] = row
  with use_mesh(lm.mesh):
    losses, _ = _direct(lm.graphdef, lm.params, jnp.asarray(padded[:, :-1]),
                        jnp.asarray(padded[:, 1:]))
    losses = np.asarray(losses, np.float64)
    lls = [-losses[r, len(row) - 1 - n:len(row) - 1].sum()
           for r, (row, n) in enumerate(zip(rows, spans))]
    correct, start = 0, 0
    for _, choices, answer in MC:
      correct += int(np.argmax(lls[start:start + len(choices)]) == answer)
      start += len(choices)
    files = sorted((trained_run / "eval").glob("harness_step3_tiny_mc.*"))
    assert [f.suffix for f in files] == [".json", ".md"]
    result = json.loads(files[0].read_text())["results"]["tiny_mc"]
    assert result["acc,none"] == pytest.approx(correct / len(MC), abs=1e-12)
    assert result["acc_stderr,none"] > 0
    assert "| tiny_mc | 6 | acc |" in printed and printed == files[1].read_text()
    assert main(["harness", "--run_dir", str(trained_run), "--tasks",
                 "tiny_group", "--include_path", str(tasks), "--limit", "3",
                 "--no_progress"]) == 0
    group = capsys.readouterr().out
    assert "| tiny_group | 6 | acc |" in group and "tiny_mc_b" not in group
    assert (trained_run / "eval/harness_step3_tiny_group_limit3.json").is_file()

    sample = generated.split("=== sample 1 of 1 ===\n", 1)[1][:-1]  # print's "\n"
    (free,) = lm.generate_until(requests("generate_until", [
        ("The cat", {"until": [], "max_gen_toks": 10})]))
    assert sample == "The cat" + free
    stop = free[2:4]
    (cut,) = lm.generate_until(requests("generate_until", [
        ("The cat", {"until": [stop], "max_gen_toks": 10})]))
    assert cut == free[:free.index(stop)]


def test_importing_the_harness_does_not_import_torch():
  code = ("import sys, ultramem_jax.evaluation.harness, lm_eval.evaluator; "
          "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, text=True,
                        capture_output=True, timeout=120,
                        env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == "[]"


def test_bad_arguments_are_refused_before_anything_is_built(tmp_path, capsys):
  main = eval_main()
  assert main(["harness", "--run_dir", str(tmp_path), "--tasks", "paper"]) == 2
  assert "has no config.yaml" in capsys.readouterr().err
  for flag, value, needle in [("--batch_size", "0", "--batch_size: got 0"),
                              ("--limit", "0", "--limit: got 0"),
                              ("--num_fewshot", "-1", "--num_fewshot: got -1")]:
    assert main(["harness", "--run_dir", str(tmp_path), "--tasks", "paper",
                 flag, value]) == 2
    assert needle in capsys.readouterr().err
