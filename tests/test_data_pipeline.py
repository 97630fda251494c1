"""Tests for the data path: split, packing, entropy, tokenizers, prepare_data and the grain pipeline."""

from __future__ import annotations

import collections
import math
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from ultramem_jax.data.config import DataConfig
from ultramem_jax.data.corpora import DataError, load_documents
from ultramem_jax.data.packing import pack_documents, split_documents, unigram_entropy
from ultramem_jax.data.pipeline import eval_batches, prepare_data, train_dataset
from ultramem_jax.data.tokenizer import (SEPARATOR, BPETokenizer, ByteTokenizer, load_tokenizer,
                                         train_tokenizer)
from ultramem_jax.training.checkpoint import Checkpointer, abstract_like

WORDS = ("the of and to in a is was for on that with as by at from his her it an were which are this be "
         "river mountain garden village winter summer quickly slowly bright dark ancient modern library "
         "station music paper window silver market forest harbour engine letter morning evening").split()
UNICODE_SAMPLES = ["naïve café — 東京", "Ünïcödé: ñ, ß, ø, €, 😀🚀", "tabs\tand\nnew\r\nlines  ", "",
                   " leading and trailing spaces ", "Ελληνικά and русский and עברית", "x" * 300]


def _sentence(rng: np.random.Generator) -> str:
  words = [WORDS[i] for i in rng.integers(0, len(WORDS), size=rng.integers(4, 12))]
  return " ".join(words).capitalize() + rng.choice([".", "!", "?", ","])


def _documents(seed: int, n_docs: int, sentences: int) -> list[str]:
  rng = np.random.default_rng(seed)
  return [" ".join(_sentence(rng) for _ in range(sentences)) for _ in range(n_docs)]


def _corpus_dir(tmp_path: pathlib.Path, docs: list[str]) -> pathlib.Path:
  root = tmp_path / "corpus"
  root.mkdir()
  for i, doc in enumerate(docs):
    (root / f"doc{i:03d}.txt").write_text(doc)
  return root


@pytest.fixture(scope="module")
def bpe_texts() -> list[str]:
  return _documents(seed=1, n_docs=60, sentences=6)


@pytest.fixture(scope="module")
def bpe(bpe_texts) -> BPETokenizer:
  return BPETokenizer.train(bpe_texts, vocab_size=350)


# ----------------------------------------------------------------------------- split_documents

@pytest.mark.parametrize("n,frac", [(2, 0.05), (2, 0.5), (3, 0.5), (10, 0.05), (10, 0.25), (37, 0.1),
                                    (100, 0.2), (101, 0.5), (1000, 0.05)])
def test_split_sizes_disjoint_and_complete(n, frac):
  docs = [f"document number {i}" for i in range(n)]
  train, val = split_documents(docs, frac, seed=3)
  assert len(val) == max(1, round(n * frac))
  assert len(train) + len(val) == n
  assert not set(train) & set(val)
  assert sorted(train + val) == sorted(docs)
  # each split keeps the original document order
  assert train == [d for d in docs if d in set(train)] and val == [d for d in docs if d in set(val)]


def test_split_always_leaves_a_training_document():
  train, val = split_documents(["a", "b", "c"], 0.9, seed=0)  # round(2.7) = 3 would leave no train
  assert len(train) == 1 and len(val) == 2 and sorted(train + val) == ["a", "b", "c"]


def test_split_seeded():
  docs = [f"d{i}" for i in range(100)]
  first = split_documents(docs, 0.2, seed=5)
  assert split_documents(docs, 0.2, seed=5) == first
  assert split_documents(list(docs), 0.2, seed=5) == first
  others = [split_documents(docs, 0.2, seed=s)[1] for s in (6, 7, 8)]
  assert all(set(v) != set(first[1]) for v in others)


@pytest.mark.parametrize("docs", [[], ["only one"]])
def test_split_needs_two_documents(docs):
  with pytest.raises(DataError, match=rf"found {len(docs)} document\(s\); at least 2 are needed"):
    split_documents(docs, 0.1, seed=0)


# ----------------------------------------------------------------------------- pack_documents

def _reference_stream(docs, order, sep) -> list[int]:
  stream = []
  for i in order:
    stream += [int(t) for t in docs[i]] + [sep]
  return stream


def _reference_rows(docs, order, sep, seq_len) -> np.ndarray:
  """Brute force: rows of seq_len + 1 tokens starting every seq_len tokens, tail dropped."""
  stream = _reference_stream(docs, order, sep)
  rows, start = [], 0
  while start + seq_len + 1 <= len(stream):
    rows.append(stream[start:start + seq_len + 1])
    start += seq_len
  return np.asarray(rows, dtype=np.int32).reshape(len(rows), seq_len + 1)


def _unique_docs(rng, n_docs, max_len) -> list[np.ndarray]:
  """Non-empty documents whose tokens are all distinct, so a stream tells which doc is where."""
  docs, next_id = [], 1
  for _ in range(n_docs):
    length = int(rng.integers(1, max_len + 1))
    docs.append(np.arange(next_id, next_id + length, dtype=np.int32))
    next_id += length
  return docs


def _recover_order(rows, docs, sep) -> list[int]:
  """Document order read back from packed rows (of _unique_docs); docs cut off by the dropped tail
  are appended in index order, which cannot change the rows."""
  stream = np.concatenate([rows[0], rows[1:, 1:].ravel()]).tolist() if len(rows) else []
  by_first = {int(d[0]): i for i, d in enumerate(docs)}
  seen, pos = [], 0
  while pos < len(stream):
    i = by_first[stream[pos]]
    doc = docs[i].tolist()
    piece = stream[pos:pos + len(doc)]
    assert piece == doc[:len(piece)]
    seen.append(i)
    pos += len(doc)
    if pos < len(stream):
      assert stream[pos] == sep
      pos += 1
  assert len(set(seen)) == len(seen)
  return seen + sorted(set(range(len(docs))) - set(seen))


@pytest.mark.parametrize("seq_len", [1, 3, 8, 17])
def test_pack_matches_brute_force_in_given_order(seq_len):
  rng = np.random.default_rng(seq_len)
  docs = [rng.integers(0, 50, size=rng.integers(0, 20)).astype(np.int32) for _ in range(12)]
  docs[3] = np.zeros((0,), np.int32)  # an empty document still gets its separator
  rows = pack_documents(docs, sep_id=99, seq_len=seq_len, seed=None)
  expected = _reference_rows(docs, range(len(docs)), 99, seq_len)
  assert rows.dtype == np.int32 and rows.shape == expected.shape and len(rows) > 0
  np.testing.assert_array_equal(rows, expected)
  # every stream token but the first is a target exactly once; the dropped tail is shorter than a row
  stream = _reference_stream(docs, range(len(docs)), 99)
  assert rows[:, 1:].ravel().tolist() == stream[1:1 + len(rows) * seq_len]
  assert len(stream) - 1 - len(rows) * seq_len < seq_len
  np.testing.assert_array_equal(rows[1:, 0], rows[:-1, -1])  # consecutive rows overlap by one


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_pack_seeded_is_a_permutation_matching_brute_force(seed):
  rng = np.random.default_rng(100 + seed)
  docs = _unique_docs(rng, n_docs=15, max_len=12)
  seq_len = 7
  rows = pack_documents(docs, sep_id=0, seq_len=seq_len, seed=seed)
  order = _recover_order(rows, docs, sep=0)
  assert sorted(order) == list(range(len(docs)))
  np.testing.assert_array_equal(rows, _reference_rows(docs, order, 0, seq_len))
  np.testing.assert_array_equal(pack_documents(docs, 0, seq_len, seed=seed), rows)  # same seed: same rows


def test_pack_seed_none_keeps_order_and_seeds_shuffle():
  docs = _unique_docs(np.random.default_rng(0), n_docs=20, max_len=6)
  assert _recover_order(pack_documents(docs, 0, 5, seed=None), docs, 0) == list(range(20))
  orders = {tuple(_recover_order(pack_documents(docs, 0, 5, seed=s), docs, 0)) for s in range(4)}
  assert len(orders) == 4  # four seeds, four different orders
  assert tuple(range(20)) not in orders


def test_pack_too_short_stream():
  docs = [np.array([1, 2], np.int32), np.array([3], np.int32)]  # stream 1 2 9 3 9: 5 tokens
  for seq_len in (5, 6, 100):
    rows = pack_documents(docs, 9, seq_len, seed=None)
    assert rows.shape == (0, seq_len + 1) and rows.dtype == np.int32
  np.testing.assert_array_equal(pack_documents(docs, 9, 4, seed=None), [[1, 2, 9, 3, 9]])  # exactly one row
  np.testing.assert_array_equal(pack_documents(docs, 9, 2, seed=None), [[1, 2, 9], [9, 3, 9]])
  assert pack_documents([], 9, 4, seed=0).shape == (0, 5)


# ----------------------------------------------------------------------------- unigram_entropy

@pytest.mark.parametrize("k", [1, 2, 5, 257])
def test_entropy_uniform(k):
  symbols = np.arange(k) * 3 + 7  # not contiguous, not starting at 0
  tokens = np.repeat(symbols, 4).reshape(-1, 2) if k > 1 else np.full((3, 4), 11)
  assert unigram_entropy(tokens) == pytest.approx(math.log(k), abs=1e-12)


def test_entropy_single_symbol_is_zero():
  assert unigram_entropy(np.full((10,), 42)) == 0.0


def test_entropy_brute_force_on_random_counts():
  rng = np.random.default_rng(0)
  for _ in range(5):
    tokens = rng.integers(0, 40, size=(13, 29)) ** 2  # skewed, with gaps
    counts = collections.Counter(tokens.ravel().tolist())
    total = sum(counts.values())
    expected = -sum(c / total * math.log(c / total) for c in counts.values())
    assert unigram_entropy(tokens) == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------- tokenizers

def test_byte_tokenizer_round_trip_random_unicode():
  tok = ByteTokenizer()
  assert tok.sep_id == 256 and tok.vocab_size == 257
  rng = np.random.default_rng(0)
  points = [p for p in rng.integers(1, 0x10FFFF, size=2000).tolist() if not 0xD800 <= p <= 0xDFFF]
  texts = UNICODE_SAMPLES + ["".join(chr(p) for p in points[i:i + 50]) for i in range(0, len(points), 50)]
  for text, ids in zip(texts, tok.encode_batch(texts)):
    assert ids.dtype == np.int32 and ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
  # the separator is dropped when decoding
  a, b = tok.encode_batch(["ab", "cd"])
  assert tok.decode(np.concatenate([a, [256], b, [256]])) == "abcd"


def test_bpe_round_trip_and_compression(bpe, bpe_texts):
  assert 257 < bpe.vocab_size <= 350
  texts = bpe_texts + UNICODE_SAMPLES + ["Unseen words: zyxx qwop, " + bpe_texts[0][::-1]]
  encoded = bpe.encode_batch(texts)
  for text, ids in zip(texts, encoded):
    assert ids.dtype == np.int32
    assert ((0 <= ids) & (ids < bpe.vocab_size)).all()
    assert bpe.decode(ids) == text
  n_tokens = sum(len(ids) for ids in encoded[:len(bpe_texts)])
  n_bytes = sum(len(t.encode()) for t in bpe_texts)
  assert n_tokens < 0.6 * n_bytes  # merges were learned and used


def test_bpe_separator_is_one_special_token(bpe, bpe_texts):
  assert bpe.encode_batch([SEPARATOR])[0].tolist() == [bpe.sep_id]
  assert bpe.decode([bpe.sep_id]) == SEPARATOR
  ordinary = bpe_texts + UNICODE_SAMPLES + ["<|endoftext", "|>", "< | endoftext | >", "endoftext"]
  for ids in bpe.encode_batch(ordinary):
    assert bpe.sep_id not in ids.tolist()
  a, b = bpe.encode_batch(["first doc", "second doc"])
  assert bpe.decode(np.concatenate([a, [bpe.sep_id], b])) == "first doc" + SEPARATOR + "second doc"


def test_bpe_training_is_deterministic(tmp_path, bpe, bpe_texts):
  again = BPETokenizer.train(bpe_texts, vocab_size=350)
  bpe.save(tmp_path / "a.json")
  again.save(tmp_path / "b.json")
  assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
  assert again.sep_id == bpe.sep_id and again.vocab_size == bpe.vocab_size
  texts = bpe_texts[:10] + UNICODE_SAMPLES
  for x, y in zip(bpe.encode_batch(texts), again.encode_batch(texts)):
    np.testing.assert_array_equal(x, y)
  assert train_tokenizer("bpe", bpe_texts, 350).encode_batch(texts[:1])[0].tolist() == \
    bpe.encode_batch(texts[:1])[0].tolist()


def test_save_and_load_tokenizer_round_trip(tmp_path, bpe, bpe_texts):
  texts = bpe_texts[:5] + UNICODE_SAMPLES
  for name, tok in [("bytes", ByteTokenizer()), ("bpe", bpe)]:
    path = tmp_path / f"{name}.json"
    tok.save(path)
    loaded = load_tokenizer(path)
    assert type(loaded) is type(tok)
    assert (loaded.vocab_size, loaded.sep_id) == (tok.vocab_size, tok.sep_id)
    for x, y in zip(tok.encode_batch(texts), loaded.encode_batch(texts)):
      np.testing.assert_array_equal(x, y)
    assert loaded.decode(loaded.encode_batch([texts[-1]])[0]) == texts[-1]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["bpe.json", "bytes.json"]  # no temp files left


def test_train_tokenizer_kinds(bpe_texts):
  assert isinstance(train_tokenizer("bytes", bpe_texts, 0), ByteTokenizer)
  with pytest.raises(ValueError, match="data.tokenizer: got 'wordpiece'"):
    train_tokenizer("wordpiece", bpe_texts, 300)


# ----------------------------------------------------------------------------- prepare_data

def _split_stream(rows: np.ndarray, sep: int) -> list[list[int]]:
  """Complete sep-terminated pieces of the token stream the rows were cut from."""
  stream = np.concatenate([rows[0], rows[1:, 1:].ravel()]).tolist()
  pieces, cur = [], []
  for t in stream:
    if t == sep:
      pieces.append(cur)
      cur = []
    else:
      cur.append(t)
  return pieces


@pytest.fixture(scope="module")
def corpus_docs() -> list[str]:
  return _documents(seed=2, n_docs=30, sentences=4)


def test_prepare_data_bytes_reconstructs_documents(tmp_path, corpus_docs):
  source = _corpus_dir(tmp_path, corpus_docs)
  cfg = DataConfig(source=str(source), tokenizer="bytes", seq_len=32, batch_size=8, val_fraction=0.2,
                   split_seed=4)
  data = prepare_data(cfg)
  assert isinstance(data.tokenizer, ByteTokenizer)
  s = data.stats
  assert (s["train_documents"], s["val_documents"]) == (24, 6)
  assert s["train_tokens"] + s["val_tokens"] == sum(len(d.encode()) + 1 for d in corpus_docs)
  assert s["train_sequences"] == len(data.train_rows) == (s["train_tokens"] - 1) // 32
  assert s["val_sequences"] == len(data.val_rows) == (s["val_tokens"] - 1) // 32
  assert data.train_rows.shape[1] == data.val_rows.shape[1] == 33 and s["vocab_size"] == 257
  # the packed streams are the documents, each followed by the separator, split by document
  train_pieces = [bytes(p).decode() for p in _split_stream(data.train_rows, 256)]
  val_pieces = [bytes(p).decode() for p in _split_stream(data.val_rows, 256)]
  assert set(train_pieces) <= set(corpus_docs) and set(val_pieces) <= set(corpus_docs)
  assert len(train_pieces) >= 20 and len(val_pieces) >= 4
  assert not set(train_pieces) & set(val_pieces)
  assert set(val_pieces) <= set(split_documents(corpus_docs, 0.2, 4)[1])
  assert val_pieces == [d for d in corpus_docs if d in set(val_pieces)]  # validation is not shuffled


def test_prepare_data_bpe_deterministic(tmp_path, corpus_docs):
  source = _corpus_dir(tmp_path, corpus_docs)
  cfg = DataConfig(source=str(source), tokenizer="bpe", bpe_vocab_size=300, seq_len=16, batch_size=4,
                   val_fraction=0.2)
  logs = []
  first = prepare_data(cfg, log=logs.append)
  assert any("24 train / 6 validation" in line for line in logs)
  assert isinstance(first.tokenizer, BPETokenizer) and first.stats["vocab_size"] == first.tokenizer.vocab_size
  assert first.train_rows.shape == (first.stats["train_sequences"], 17)
  assert first.val_rows.shape == (first.stats["val_sequences"], 17)
  assert first.stats["train_sequences"] == (first.stats["train_tokens"] - 1) // 16
  assert int(first.train_rows.max()) < first.tokenizer.vocab_size
  assert (first.train_rows == first.tokenizer.sep_id).sum() >= 20
  second = prepare_data(cfg)
  np.testing.assert_array_equal(first.train_rows, second.train_rows)
  np.testing.assert_array_equal(first.val_rows, second.val_rows)
  assert first.stats == second.stats
  given = prepare_data(cfg, tokenizer=first.tokenizer)
  np.testing.assert_array_equal(first.train_rows, given.train_rows)
  np.testing.assert_array_equal(first.val_rows, given.val_rows)
  # the validation rows decode back to the validation documents
  val_docs = split_documents(load_documents(str(source)), 0.2, 0)[1]
  decoded = [first.tokenizer.decode(p) for p in _split_stream(first.val_rows, first.tokenizer.sep_id)]
  assert decoded and decoded == val_docs[:len(decoded)]


def test_prepare_data_uses_the_given_tokenizer(tmp_path, corpus_docs, bpe):
  source = _corpus_dir(tmp_path, corpus_docs)
  cfg = DataConfig(source=str(source), tokenizer="bytes", seq_len=16, batch_size=4, val_fraction=0.2)
  data = prepare_data(cfg, tokenizer=bpe)
  assert data.tokenizer is bpe and data.stats["vocab_size"] == bpe.vocab_size
  assert (data.train_rows == bpe.sep_id).any() and int(data.train_rows.max()) >= 257


def test_prepare_data_val_unigram_entropy(tmp_path, corpus_docs):
  source = _corpus_dir(tmp_path, corpus_docs)
  data = prepare_data(DataConfig(source=str(source), tokenizer="bytes", seq_len=32, batch_size=8,
                                 val_fraction=0.2))
  targets = data.val_rows[:, 1:].ravel().tolist()
  counts = collections.Counter(targets)
  expected = -sum(c / len(targets) * math.log(c / len(targets)) for c in counts.values())
  assert data.val_unigram_entropy == pytest.approx(expected, rel=1e-12)
  assert data.val_unigram_entropy == pytest.approx(unigram_entropy(data.val_rows[:, 1:]), rel=1e-12)
  assert 1.0 < data.val_unigram_entropy < math.log(257)


def test_prepare_data_too_small_for_a_batch(tmp_path, corpus_docs):
  source = _corpus_dir(tmp_path, corpus_docs)
  cfg = DataConfig(source=str(source), tokenizer="bytes", seq_len=32, batch_size=1000, val_fraction=0.2)
  with pytest.raises(DataError, match=r"fewer than one batch \(data\.batch_size=1000\)"):
    prepare_data(cfg)


def test_prepare_data_max_documents(tmp_path, corpus_docs):
  source = _corpus_dir(tmp_path, corpus_docs)
  data = prepare_data(DataConfig(source=str(source), tokenizer="bytes", seq_len=16, batch_size=4,
                                 val_fraction=0.25, max_documents=12))
  assert (data.stats["train_documents"], data.stats["val_documents"]) == (9, 3)


# ----------------------------------------------------------------------------- train_dataset

SEQ = 6


def _rows(n: int) -> np.ndarray:
  """Distinct rows: row i holds i * 100 + 0..SEQ."""
  return (np.arange(n)[:, None] * 100 + np.arange(SEQ + 1)[None, :]).astype(np.int32)


def _row_ids(batch: dict, rows: np.ndarray) -> list[int]:
  """Index in `rows` of every example of a batch, checking inputs/targets against that row."""
  lookup = {tuple(r[:-1].tolist()): i for i, r in enumerate(rows)}
  ids = []
  for inputs, targets in zip(batch["inputs"], batch["targets"]):
    i = lookup[tuple(inputs.tolist())]
    np.testing.assert_array_equal(inputs, rows[i, :-1])
    np.testing.assert_array_equal(targets, rows[i, 1:])
    ids.append(i)
  return ids


def _take(it, n: int) -> list[dict]:
  return [next(it) for _ in range(n)]


def _assert_batches_equal(xs: list[dict], ys: list[dict]) -> None:
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert sorted(x) == sorted(y) == ["inputs", "targets"]
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_batches_shapes_and_shift():
  rows = _rows(24)
  batch = next(iter(train_dataset(rows, global_batch=8, seed=0)))
  assert sorted(batch) == ["inputs", "targets"]
  assert batch["inputs"].shape == batch["targets"].shape == (8, SEQ)
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  assert len(set(_row_ids(batch, rows))) == 8


def test_epochs_visit_every_row_once_and_reshuffle():
  rows = _rows(24)
  it = iter(train_dataset(rows, global_batch=8, seed=1))
  epochs = [[i for b in _take(it, 3) for i in _row_ids(b, rows)] for _ in range(3)]
  for order in epochs:
    assert sorted(order) == list(range(24))
  assert epochs[0] != list(range(24))  # shuffled
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]  # a new order each epoch


def test_dataset_seeded():
  rows = _rows(24)
  first = _take(iter(train_dataset(rows, 8, seed=3)), 5)
  _assert_batches_equal(first, _take(iter(train_dataset(rows, 8, seed=3)), 5))
  other = _take(iter(train_dataset(rows, 8, seed=4)), 5)
  assert [_row_ids(b, rows) for b in first] != [_row_ids(b, rows) for b in other]


@pytest.mark.parametrize("advance", [3, 7])  # 7 crosses into the third epoch
def test_iterator_state_resumes(advance):
  rows = _rows(24)
  it = iter(train_dataset(rows, 8, seed=0))
  _take(it, advance)
  state = it.get_state()
  expected = _take(it, 4)
  fresh = iter(train_dataset(rows, 8, seed=0))
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 4), expected)
  untouched = iter(train_dataset(rows, 8, seed=0))  # the restored position matters
  assert [_row_ids(b, rows) for b in _take(untouched, 4)] != [_row_ids(b, rows) for b in expected]


def test_orbax_checkpoint_restores_iterator(tmp_path):
  rows = _rows(24)
  state = {"w": jnp.arange(4.0), "b": {"c": jnp.ones((2, 3), jnp.int32)}}
  it = iter(train_dataset(rows, 8, seed=2))
  _take(it, 3)
  ckpt = Checkpointer(tmp_path / "ck", max_to_keep=2)
  ckpt.save(3, state, it, {"step": 3, "note": "test"})
  ckpt.wait()
  expected = _take(it, 2)
  assert ckpt.latest_step() == 3 and ckpt.all_steps() == [3]
  ckpt.close()

  again = Checkpointer(tmp_path / "ck", max_to_keep=2)
  fresh = iter(train_dataset(rows, 8, seed=2))
  restored, meta = again.restore(3, abstract_like(state), fresh)
  again.close()
  assert meta == {"step": 3, "note": "test"}
  np.testing.assert_array_equal(restored["w"], np.arange(4.0))
  np.testing.assert_array_equal(restored["b"]["c"], np.ones((2, 3), np.int32))
  assert restored["b"]["c"].dtype == jnp.int32
  _assert_batches_equal(_take(fresh, 2), expected)


def test_process_sharding_splits_each_epoch():
  rows = _rows(24)
  single = [i for b in _take(iter(train_dataset(rows, 8, seed=5)), 3) for i in _row_ids(b, rows)]
  shards = []
  for p in range(2):
    batches = _take(iter(train_dataset(rows, 8, seed=5, process_index=p, process_count=2)), 3)
    assert all(b["inputs"].shape == (4, SEQ) for b in batches)
    shards.append([i for b in batches for i in _row_ids(b, rows)])
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == sorted(single) == list(range(24))
  with pytest.raises(ValueError, match=r"data.batch_size=8 must be divisible by the 3 processes"):
    train_dataset(rows, 8, seed=0, process_index=0, process_count=3)


# ----------------------------------------------------------------------------- eval_batches

@pytest.mark.parametrize("n,batch", [(10, 4), (8, 4), (3, 5), (1, 1)])
def test_eval_batches_cover_every_row_once(n, batch):
  rows = _rows(n)
  batches = list(eval_batches(rows, batch))
  assert len(batches) == -(-n // batch)
  for b in batches:
    assert sorted(b) == ["inputs", "targets", "weights"]
    assert b["inputs"].shape == b["targets"].shape == b["weights"].shape == (batch, SEQ)
    assert b["weights"].dtype == np.float32
    w = b["weights"]
    assert ((w == 0) | (w == 1)).all() and (w == w[:, :1]).all()  # whole rows are in or out
  weights = np.concatenate([b["weights"] for b in batches])
  inputs = np.concatenate([b["inputs"] for b in batches])
  targets = np.concatenate([b["targets"] for b in batches])
  real = weights[:, 0] == 1
  assert weights.sum() == n * SEQ and real.sum() == n
  assert real[:n].all() and not real[n:].any()  # padding only at the end
  np.testing.assert_array_equal(inputs[real], rows[:, :-1])  # in order
  np.testing.assert_array_equal(targets[real], rows[:, 1:])


def test_eval_batches_max_batches():
  rows = _rows(10)
  capped = list(eval_batches(rows, 4, max_batches=2))
  assert len(capped) == 2
  assert all(b["weights"].sum() == 4 * SEQ for b in capped)
  np.testing.assert_array_equal(np.concatenate([b["inputs"] for b in capped]), rows[:8, :-1])
  assert len(list(eval_batches(rows, 4, max_batches=1))) == 1
  loose = list(eval_batches(rows, 4, max_batches=10))  # more than needed: same as all
  assert len(loose) == 3 and sum(b["weights"].sum() for b in loose) == 10 * SEQ
