"""From a data source to batches: documents -> tokens -> packed rows -> grain.

``prepare_data`` does the one-off work (load, split by document, train the
tokenizer unless one is given, tokenize, pack). ``train_dataset`` is the grain pipeline
over the packed training rows: shuffled with a seed, reshuffled each epoch,
sharded by process, batched. Its iterator's position is checkpointed with
the model (``grain.checkpoint``), so a resumed run sees the same batches.
A run with ``data.tasks`` trains on rows of the task suite instead, alone or
mixed with these text rows (``data/task_data.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import grain
import numpy as np

from ultramem_jax.data import corpora
from ultramem_jax.data.config import DataConfig
from ultramem_jax.data.packing import pack_documents, split_documents, unigram_entropy
from ultramem_jax.data.tokenizer import Tokenizer, train_tokenizer


@dataclasses.dataclass
class TextData:
  tokenizer: Tokenizer
  train_rows: np.ndarray  # int32 [num_rows, seq_len + 1]
  val_rows: np.ndarray
  stats: dict

  @property
  def val_unigram_entropy(self) -> float:
    """Unigram entropy (nats/token) of the validation targets."""
    return unigram_entropy(self.val_rows[:, 1:])


def prepare_data(cfg: DataConfig, tokenizer: Tokenizer | None = None,
                 log: Callable[[str], None] = lambda s: None) -> TextData:
  """Loads `cfg.source`, splits it by document, tokenizes and packs both
  splits. Without a `tokenizer` (a resumed run passes its saved one), one is
  trained on the training split."""
  skipped: list[str] | None = [] if cfg.on_decode_error == "skip" else None
  docs = corpora.load_documents(cfg.source, cfg.data_dir or None,
                                text_field=cfg.text_field, skipped=skipped)
  if skipped:
    log(f"data: skipped {len(skipped)} file(s) that are not valid UTF-8 "
        f"(data.on_decode_error=skip); first: {skipped[0]}")
  if cfg.max_documents and len(docs) > cfg.max_documents:
    keep = np.random.default_rng(cfg.split_seed).permutation(len(docs))
    docs = [docs[i] for i in sorted(keep[:cfg.max_documents].tolist())]
  train_docs, val_docs = split_documents(docs, cfg.val_fraction, cfg.split_seed)
  log(f"data: {cfg.source}: {len(train_docs)} train / {len(val_docs)} "
      f"validation documents")
  if tokenizer is None:
    tokenizer = train_tokenizer(cfg.tokenizer, train_docs, cfg.bpe_vocab_size)
    log(f"data: trained a {cfg.tokenizer} tokenizer with "
        f"{tokenizer.vocab_size} entries")

  train_tok = tokenizer.encode_batch(train_docs)
  val_tok = tokenizer.encode_batch(val_docs)
  train_rows = pack_documents(train_tok, tokenizer.sep_id, cfg.seq_len,
                              seed=cfg.split_seed)
  val_rows = pack_documents(val_tok, tokenizer.sep_id, cfg.seq_len, seed=None)
  if len(train_rows) < cfg.batch_size:
    raise corpora.DataError(
        f"data.source: {cfg.source!r} packs into {len(train_rows)} training "
        f"sequences of data.seq_len={cfg.seq_len}, fewer than one batch "
        f"(data.batch_size={cfg.batch_size}); use more text or smaller values")
  if len(val_rows) == 0:
    raise corpora.DataError(
        f"data.source: the validation split of {cfg.source!r} is shorter than "
        f"one sequence of data.seq_len={cfg.seq_len}; raise data.val_fraction")
  stats = {
      "train_documents": len(train_docs), "val_documents": len(val_docs),
      "train_tokens": int(sum(len(t) + 1 for t in train_tok)),
      "val_tokens": int(sum(len(t) + 1 for t in val_tok)),
      "train_sequences": int(len(train_rows)),
      "val_sequences": int(len(val_rows)),
      "vocab_size": tokenizer.vocab_size,
  }
  return TextData(tokenizer, train_rows, val_rows, stats)


def _to_example(rows: np.ndarray) -> dict[str, np.ndarray]:
  return {"inputs": rows[:, :-1], "targets": rows[:, 1:]}


def train_dataset(rows: np.ndarray, global_batch: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """Infinite, shuffled (a new order each epoch), per-process batches: with
  `process_count` > 1, process i takes every process_count-th row from i, so
  the processes' batches at one step together hold the rows that one process
  would have batched alone."""
  if global_batch % process_count:
    raise ValueError(f"data.batch_size={global_batch} must be divisible by the "
                     f"{process_count} processes")
  ds = grain.MapDataset.source(rows).shuffle(seed=seed).repeat()
  if process_count > 1:
    ds = ds[process_index::process_count]
  return ds.batch(global_batch // process_count, drop_remainder=True).map(_to_example)


def eval_batches(rows: np.ndarray, batch_size: int, max_batches: int = 0,
                 part: int = 0, parts: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Every validation row once, in order; the last batch is padded and the
  padding carries weight 0, so the mean loss covers exactly the rows.

  Of each global batch, yields only rows of `part` (of `parts` equal parts):
  in a multi-process run each process places its own part on the mesh."""
  if batch_size % parts:
    raise ValueError(f"batch_size={batch_size} does not split into {parts} parts")
  size = batch_size // parts
  n = len(rows) if not max_batches else min(len(rows), max_batches * batch_size)
  for start in range(0, n, batch_size):
    chunk = rows[start:min(start + batch_size, n)]
    weights = np.ones(chunk[:, 1:].shape, np.float32)
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad, chunk.shape[1]), chunk.dtype)])
      weights = np.concatenate([weights, np.zeros((pad, weights.shape[1]), np.float32)])
    mine = slice(part * size, (part + 1) * size)
    yield {**_to_example(chunk[mine]), "weights": weights[mine]}
