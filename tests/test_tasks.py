"""The task generators: determinism, correctness by construction, scoring."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from conftest import make_documents
from ultramem_jax.config import ConfigError
from ultramem_jax.data.tokenizer import ByteTokenizer
from ultramem_jax.tasks import (
    FactRetrieval, MQAROverwrite, NIAH, TASKS, TaskError, TaskMixture,
    TaskSource, TokenSpace, aggregate, chance, collate, exact_match, get_task,
    make_instances, make_rows, parse_mixture, score)
from ultramem_jax.tasks.space import FREE, KEY, VALUE

BYTES = TokenSpace.for_tokenizer(ByteTokenizer())
BPE = TokenSpace.for_vocab(4096, exclude=(0,))
# A small alphabet (8 keys, 8 values) so chance levels are measurable.
SMALL = TokenSpace.for_vocab(64, num_reserved=24)

# Parameter variants exercised for every task: defaults, multi-token keys
# and answers, ranges.
VARIANTS = {
    "niah": [{}, {"num_needles": 4, "key_len": 2, "value_len": 1},
             {"depth": 0.0}, {"depth": 1.0, "value_len": 3}],
    "mqar": [{}, {"key_len": 2, "value_len": 2}, {"num_pairs": (1, 12)},
             {"num_pairs": 8, "num_queries": (1, 4)}],
    "mqar_overwrite": [{}, {"rounds": 5, "overwrite_fraction": 1.0},
                       {"rounds": (1, 4), "key_len": 2, "value_len": 2},
                       {"pairs_per_round": (2, 6), "queries_per_round": 2}],
    "token_mapping": [{}, {"n_demos": (1, 20), "domain": 4},
                      {"key_len": 2, "value_len": 2, "num_queries": None}],
    "fact_retrieval": [{}, {"entity_len": 1, "n_entities": 40,
                            "object_len": 2, "qa_fraction": 0.0},
                       {"form": "qa_heldout", "items": (1, 5)},
                       {"qa_fraction": 1.0, "n_relations": 1}],
}


@pytest.fixture(scope="module")
def filler() -> np.ndarray:
  """Tokenized natural-ish text with some reserved ids mixed in."""
  text = " ".join(make_documents(40, seed=3))
  ids = ByteTokenizer().encode_batch([text])[0]
  ids = ids.copy()
  ids[::97] = BYTES.needle  # must never be taken for a needle
  ids[5::89] = BYTES.keys[3]
  return ids


def _expected(inst):
  return [(int(s), inst.tokens[s:e].tolist()) for s, e in inst.spans]


def _solved(task, tokens, space):
  return [(s, a.tolist()) for s, a in task.solve(tokens, space)]


def _corrupt(inst, space, rng):
  """The tokens with every answer token replaced by a random value id."""
  tokens = inst.tokens.copy()
  mask = inst.answer_mask
  tokens[mask] = rng.choice(space.values, size=int(mask.sum()))
  return tokens


# ----------------------------------------------------------------------------
# Token space


def test_token_space_conventions():
  assert BYTES.vocab_size == 257
  assert BYTES.reserved[:8] == tuple(range(128, 136))
  assert (BYTES.bos, BYTES.pad, BYTES.query) == (128, 129, 130)
  np.testing.assert_array_equal(BYTES.keys, np.arange(136, 196))
  np.testing.assert_array_equal(BYTES.values, np.arange(196, 256))
  assert 256 not in BYTES.reserved and 256 not in BYTES.free
  assert len(BYTES.free) == 128
  # BPE: the 512 rarest merges, the separator (id 0) never touched.
  assert BPE.reserved == tuple(range(4096 - 512, 4096))
  assert (len(BPE.keys), len(BPE.values)) == (252, 252)
  for space in (BYTES, BPE, SMALL):
    kinds = space.kind[np.asarray(space.reserved)]
    assert (kinds != FREE).all()
    assert not set(space.keys) & set(space.values)
  with pytest.raises(TaskError, match="at least"):
    TokenSpace.for_vocab(20, num_reserved=8)
  with pytest.raises(TaskError, match="cannot reserve"):
    TokenSpace.for_vocab(16, num_reserved=17)


# ----------------------------------------------------------------------------
# Determinism and correctness by construction


@pytest.mark.parametrize("name", list(TASKS))
def test_deterministic_for_seed(name, filler):
  task = get_task(name)
  for split in ("train", "eval"):
    a = make_instances(task, 4, 160, seed=7, space=BYTES, split=split,
                       filler=filler)
    b = make_instances(task, 4, 160, seed=7, space=BYTES, split=split,
                       filler=filler)
    c = make_instances(task, 4, 160, seed=8, space=BYTES, split=split,
                       filler=filler)
    for x, y, z in zip(a, b, c):
      np.testing.assert_array_equal(x.tokens, y.tokens)
      np.testing.assert_array_equal(x.spans, y.spans)
      assert x.meta == y.meta
      assert x.answer_meta.keys() == y.answer_meta.keys()
      for k in x.answer_meta:
        np.testing.assert_array_equal(x.answer_meta[k], y.answer_meta[k])
      assert not np.array_equal(x.tokens, z.tokens)
  # The train and eval streams of one seed differ.
  t = make_instances(task, 1, 160, seed=7, space=BYTES, split="train",
                     filler=filler)[0]
  e = make_instances(task, 1, 160, seed=7, space=BYTES, split="eval",
                     filler=filler)[0]
  assert not np.array_equal(t.tokens, e.tokens)


@pytest.mark.parametrize("name", list(TASKS))
def test_solver_recovers_answers(name, filler):
  """A brute-force parse of the prompt recovers every answer, for many
  seeds, lengths and parameters, and never reads the answers themselves."""
  rng = np.random.default_rng(0)
  n_answers = 0
  for v, params in enumerate(VARIANTS[name]):
    task = get_task(name, **params)
    for space in (BYTES, BPE):
      for length in (48, 129, 300):
        for split in ("train", "eval"):
          for inst in make_instances(task, 6, length, seed=100 * v + length,
                                     space=space, split=split, filler=filler):
            assert inst.meta["task"] == name
            assert len(inst.tokens) <= length
            assert len(inst.spans) >= 1
            assert (inst.tokens >= 0).all()
            assert (inst.tokens < space.vocab_size).all()
            assert not np.isin(inst.tokens, space.exclude).any()
            # Every answer is a run of value tokens.
            answer_ids = inst.tokens[inst.answer_mask]
            assert (space.kind[answer_ids] == VALUE).all()
            assert _solved(task, inst.tokens, space) == _expected(inst)
            corrupted = _corrupt(inst, space, rng)
            assert _solved(task, corrupted, space) == _expected(inst)
            n_answers += len(inst.spans)
  assert n_answers >= 250


@pytest.mark.parametrize("name", list(TASKS))
def test_longer_than_trained(name, filler):
  """Lengths far beyond a training seq_len generate and solve."""
  # Two-token keys: one-token keys give at most 252 distinct pairs.
  params = {"key_len": 2} if name.startswith("mqar") else {}
  task = get_task(name, **params)
  short = make_instances(task, 1, 129, seed=1, space=BPE, filler=filler)[0]
  for length in (1025, 4097):
    inst = make_instances(task, 1, length, seed=1, space=BPE,
                          filler=filler)[0]
    assert length - 20 <= len(inst.tokens) <= length
    assert _solved(task, inst.tokens, BPE) == _expected(inst)
    if name.startswith("mqar"):  # more pairs, not padding
      assert len(inst.spans) >= length // 160 * len(short.spans)


def test_size_errors_name_the_parameter():
  with pytest.raises(TaskError, match="mqar.num_pairs=40: at most"):
    get_task("mqar", num_pairs=40).sample(0, BYTES, 129)
  with pytest.raises(TaskError, match="niah: length 6 is too short"):
    get_task("niah").sample(0, BYTES, 6)
  with pytest.raises(TaskError, match="niah.depth=1.5"):
    get_task("niah", depth=1.5).sample(0, BYTES, 100)
  with pytest.raises(TaskError, match="fact_retrieval.n_entities=5000"):
    get_task("fact_retrieval", n_entities=5000).sample(0, BYTES, 100)
  with pytest.raises(TaskError, match="overwrite_fraction=1.5"):
    get_task("mqar_overwrite", overwrite_fraction=1.5).sample(0, BYTES, 100)
  with pytest.raises(TaskError, match="unknown task 'nope'"):
    get_task("nope")
  with pytest.raises(TaskError, match="mqar.depth: unknown parameter"):
    get_task("mqar", depth=0.5)
  # Ranges are clipped to what fits; a list (YAML) is a range.
  inst = get_task("mqar", num_pairs=[20, 100]).sample(0, BYTES, 129)
  assert 20 <= inst.meta["num_pairs"] <= 31


# ----------------------------------------------------------------------------
# Task specifics


def test_niah_depth_filler_and_buckets(filler):
  hay = filler[BYTES.kind[filler] == FREE]
  for depth in (0.0, 0.5, 1.0):
    for length in (64, 512):
      inst = get_task("niah", depth=depth).sample(3, BYTES, length,
                                                  filler=filler)
      assert len(inst.tokens) == length
      assert inst.meta["depth"] == depth and inst.meta["length"] == length
      n_fill = length - 1 - 2 * 4
      assert inst.meta["needle_pos"] == 1 + round(depth * n_fill)
      assert inst.tokens[inst.meta["needle_pos"]] == BYTES.needle
      # The haystack is a contiguous window of the natural filler, with the
      # reserved ids taken out.
      pos = inst.meta["needle_pos"]
      rest = np.delete(inst.tokens, np.r_[0, pos + np.arange(4),
                                          length - 4 + np.arange(4)])
      assert (BYTES.kind[rest] == FREE).all()
      start = np.flatnonzero(hay == rest[0])
      assert any(np.array_equal(np.take(hay, s + np.arange(len(rest)),
                                        mode="wrap"), rest) for s in start)
  insts = make_instances("niah", 60, 100, seed=0, space=BYTES)
  depths = {i.meta["depth"] for i in insts}
  assert depths <= set(i / 10 for i in range(11)) and len(depths) > 5


def test_mqar_overwrite_answers_latest_value():
  task = MQAROverwrite(rounds=4, overwrite_fraction=0.5)
  n_over = n_first_wrong = 0
  for inst in make_instances(task, 40, 200, seed=0, space=BYTES):
    toks = inst.tokens
    answers = {int(s): inst.answer_info(i)
               for i, (s, _) in enumerate(inst.spans)}
    history: dict[int, list[int]] = {}
    querying = False
    for i, t in enumerate(toks[:-1]):
      if t in (BYTES.query, BYTES.round):
        querying = t == BYTES.query
      elif BYTES.kind[t] == KEY and not querying:
        history.setdefault(int(t), []).append(int(toks[i + 1]))
      elif BYTES.kind[t] == KEY:
        meta = answers[i + 1]
        writes = history[int(t)]
        assert toks[i + 1] == writes[-1]
        assert meta["writes"] == len(writes)
        assert meta["overwritten"] == (len(writes) > 1)
        if len(writes) > 1:
          n_over += 1
          assert writes[-1] != writes[-2]  # an overwrite changes the value
          n_first_wrong += writes[0] != writes[-1]
    assert set(inst.answer_meta["round"].tolist()) == {1, 2, 3, 4}
  # A solver that keeps the first value fails on most overwritten keys.
  assert n_over > 100 and n_first_wrong > 0.8 * n_over


def test_token_mapping_demos_and_shown_counts():
  task = get_task("token_mapping", domain=6)
  for n in (1, 3, 10, 30):
    inst = dataclasses.replace(task, n_demos=n).sample(n, BYTES, 200)
    assert inst.meta["n_demos"] == n
    q = int(np.flatnonzero(inst.tokens == BYTES.query)[0])
    demo_x = inst.tokens[1:q:3]
    assert len(demo_x) == n
    for (s, _), shown in zip(inst.spans, inst.answer_meta["shown"]):
      x = inst.tokens[s - 2]
      assert shown == int((demo_x == x).sum()) >= 1


def test_fact_retrieval_is_parametric():
  task = FactRetrieval(n_entities=64, n_relations=3)
  fb = task.facts(BYTES)
  assert fb is task.facts(BYTES)  # cached, fixed by fact_seed
  other = dataclasses.replace(task, fact_seed=1).facts(BYTES)
  assert not np.array_equal(fb.objects, other.objects)
  # The corpus states every fact once, and reading it gives the fact base.
  corpus = task.corpus(BYTES)
  assert sum(len(i.spans) for i in corpus) == fb.num_facts == 192
  known = task.learn(corpus, BYTES)
  assert len(known) == 192
  for e in range(64):
    for r in range(3):
      key = (tuple(fb.entities[e].tolist()), int(fb.relations[r]))
      assert known[key] == tuple(fb.objects[e, r].tolist())
  heldout = {tuple(x) for x in fb.entities[~fb.qa_seen].tolist()}
  assert len(heldout) == 32
  forms = {"train": set(), "eval": set()}
  for split in ("train", "eval"):
    for inst in make_instances(task, 30, 129, seed=5, space=BYTES, split=split):
      asked = []
      for (s, e), form in zip(inst.spans, inst.answer_meta["form"]):
        forms[split].add(str(form))
        ids = inst.tokens[s - 3:s].tolist()
        entity, rel = ((ids[:2], ids[2]) if form == "statement"
                       else (ids[1:], ids[0]))
        asked.append((tuple(entity), rel))
        # Held-out entities are never trained in the query form.
        if split == "train" and form != "statement":
          assert tuple(entity) not in heldout
        if form == "qa_heldout":
          assert tuple(entity) in heldout
      # Distinct facts: no answer can be copied from the prompt.
      assert len(set(asked)) == len(asked)
  assert forms == {"train": {"statement", "qa_seen"},
                   "eval": {"statement", "qa_seen", "qa_heldout"}}


# ----------------------------------------------------------------------------
# Scoring: a perfect copier, a random guesser


def _copier(name, inputs, space):
  """A 'model' that solves each row from its inputs: pred[t] for tokens[t+1]."""
  task = get_task(name)
  pred = np.full(inputs.shape, space.pad, np.int32)
  for r, row in enumerate(inputs):
    for start, ans in task.solve(row, space):
      pred[r, start - 1:start - 1 + len(ans)] = ans
  return pred


@pytest.mark.parametrize("name", list(TASKS))
def test_perfect_copier_scores_100(name, filler):
  rng = np.random.default_rng(1)
  insts = make_instances(name, 24, 257, seed=2, space=BYTES, filler=filler)
  rows = collate(insts, 256, BYTES)
  # The answers are hidden from the copier: it must find them in the prompt.
  hidden = collate([dataclasses.replace(i, tokens=_corrupt(i, BYTES, rng))
                    for i in insts], 256, BYTES)
  pred = _copier(name, hidden.inputs, BYTES)
  correct = score(insts, pred)
  assert all(c.all() for c in correct)
  # The loss mask marks exactly the answer targets the copier is scored on.
  assert rows.loss_mask.sum() == sum(i.answer_mask.sum() for i in insts)
  assert ((pred == rows.targets) | (rows.loss_mask == 0)).all()


@pytest.mark.parametrize("name,params", [
    ("niah", {"value_len": 1}), ("niah", {"value_len": 2}), ("mqar", {}),
    ("mqar_overwrite", {}), ("token_mapping", {"domain": 8}),
    ("fact_retrieval", {"n_entities": 32, "object_len": 1}),
])
def test_random_guesser_scores_chance(name, params):
  """Uniform guesses over the value alphabet match the analytic chance
  level, |values| ** -answer_len, within a binomial tolerance."""
  task = get_task(name, **params)
  rng = np.random.default_rng(0)
  insts = make_instances(task, 300, 80, seed=0, space=SMALL)
  rows = collate(insts, 79, SMALL)
  pred = rng.choice(SMALL.values, size=rows.targets.shape)
  correct = np.concatenate(score(insts, pred))
  p = np.concatenate([chance(i, SMALL) for i in insts])
  n = len(correct)
  assert n >= 300
  expected = p.mean()
  assert expected == pytest.approx(8.0 ** -(1 + (params.get("value_len") == 2)))
  sd = math.sqrt((p * (1 - p)).sum()) / n
  assert abs(correct.mean() - expected) < 4.5 * sd + 1e-9


def test_exact_match_needs_every_answer_token():
  inst = get_task("niah", value_len=3).sample(0, BYTES, 60)
  (s, e), = inst.spans
  pred = inst.tokens[1:].copy()
  assert exact_match(pred, inst).tolist() == [True]
  pred[e - 2] = BYTES.values[int(pred[e - 2] == BYTES.values[0])]
  assert exact_match(pred, inst).tolist() == [False]
  padded = np.concatenate([inst.tokens[1:], np.zeros(10, np.int32)])
  assert exact_match(padded, inst).tolist() == [True]
  with pytest.raises(TaskError, match="predictions"):
    exact_match(pred[:10], inst)


def test_aggregate_by_bucket():
  insts = []
  for depth in (0.0, 0.5, 1.0):
    for length in (64, 128):
      insts += make_instances(NIAH(depth=depth), 5, length, seed=0, space=BYTES)
  correct = [np.asarray([i.meta["depth"] == 0.5]) for i in insts]
  table = aggregate(insts, correct, by=("depth", "length"), space=BYTES)
  assert list(table) == [(0.0, 64), (0.0, 128), (0.5, 64), (0.5, 128),
                         (1.0, 64), (1.0, 128)]
  assert table[(0.5, 64)] == {"n": 5, "correct": 5, "accuracy": 1.0,
                              "chance": pytest.approx(60.0 ** -2)}
  assert table[(1.0, 128)]["accuracy"] == 0.0
  overall = aggregate(insts, correct)
  assert overall[()]["accuracy"] == pytest.approx(1 / 3)
  # Answer-level metadata is a bucket too.
  fr = make_instances(FactRetrieval(n_entities=64), 10, 129, seed=0,
                      space=BYTES)
  by_form = aggregate(fr, [np.ones(len(i.spans), bool) for i in fr],
                      by=("form",))
  assert set(by_form) == {("statement",), ("qa_seen",), ("qa_heldout",)}


# ----------------------------------------------------------------------------
# Rows and mixtures


def test_make_rows_shapes_masks_and_determinism(filler):
  tok = ByteTokenizer()
  rows = make_rows("mqar:1,niah:0.5", 16, 64, seed=3, tokenizer=tok,
                   filler=filler)
  again = make_rows("mqar:1,niah:0.5", 16, 64, seed=3, vocab_size=257,
                    space=BYTES, filler=filler)
  for a, b in zip(rows, again):
    np.testing.assert_array_equal(a, b)
  assert (rows.inputs.shape == rows.targets.shape == rows.loss_mask.shape
          == (16, 64))
  assert rows.inputs.dtype == np.int32 and rows.loss_mask.dtype == np.float32
  np.testing.assert_array_equal(rows.inputs[:, 1:], rows.targets[:, :-1])
  assert (rows.inputs[:, 0] == BYTES.bos).all()
  pad = rows.targets == BYTES.pad
  assert (rows.loss_mask[pad] == 0).all()
  assert (BYTES.kind[rows.targets[rows.loss_mask > 0]] == VALUE).all()
  full = make_rows("mqar:1,niah:0.5", 16, 64, seed=3, tokenizer=tok,
                   filler=filler, loss_on="all")
  np.testing.assert_array_equal(full.targets, rows.targets)
  np.testing.assert_array_equal(full.loss_mask, (~pad).astype(np.float32))
  # Random access: row i of a source is instance i of the same stream.
  src = TaskSource("mqar:1,niah:0.5", 64, 3, BYTES, filler=filler)
  for i in (0, 5, 15):
    item = src[i]
    np.testing.assert_array_equal(item["inputs"], rows.inputs[i])
    np.testing.assert_array_equal(item["weights"], rows.loss_mask[i])
  tail = make_rows("mqar:1,niah:0.5", 4, 64, seed=3, tokenizer=tok,
                   filler=filler, start=12)
  np.testing.assert_array_equal(tail.inputs, rows.inputs[12:])
  with pytest.raises(TaskError, match="does not fit"):
    collate(make_instances("niah", 1, 100, 0, BYTES), 64, BYTES)


def test_mixture_follows_weights():
  mix = TaskMixture("mqar:3,token_mapping:1", params={"mqar": {"num_pairs": 4}})
  names = [mix.instance(i, 0, BYTES, 64).meta["task"] for i in range(400)]
  share = names.count("mqar") / 400
  assert abs(share - 0.75) < 4.5 * math.sqrt(0.75 * 0.25 / 400)
  assert all(mix.instance(i, 0, BYTES, 64).meta.get("num_pairs", 4) == 4
             for i in range(20))
  with pytest.raises(TaskError, match="unknown task 'nope'"):
    TaskMixture("mqar", params={"nope": {}})


def test_parse_mixture():
  assert parse_mixture("mqar:1,niah:0.5") == {"mqar": 1.0, "niah": 0.5}
  assert parse_mixture(" mqar , fact_retrieval:2 ") == {"mqar": 1.0,
                                                        "fact_retrieval": 2.0}
  assert parse_mixture({"niah": 2}) == {"niah": 2.0}
  assert parse_mixture("text:3,mqar:1", extra=("text",)) == {"text": 3.0,
                                                             "mqar": 1.0}
  bad = {
      "mqar:1,nope:2": r"entry 'nope:2': unknown task 'nope'; known: niah",
      "mqar:x": r"entry 'mqar:x': weight 'x' is not a number",
      "mqar:-1": r"entry 'mqar:-1': weight '-1' must be a positive",
      "mqar:0": r"must be a positive",
      "mqar:inf": r"must be a positive",
      "mqar,mqar:2": r"entry 'mqar:2': task 'mqar' appears twice",
      "mqar,,niah": r"an empty entry",
      "": r"an empty entry",
      "text:1": r"unknown task 'text'",
  }
  for spec, msg in bad.items():
    with pytest.raises(ConfigError, match=msg) as err:
      parse_mixture(spec)
    assert str(err.value).startswith("data.tasks")
  with pytest.raises(ConfigError, match="no tasks"):
    parse_mixture({})
