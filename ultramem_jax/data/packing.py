"""Document split, packing into fixed-length sequences, unigram entropy."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ultramem_jax.data.corpora import DataError


def split_documents(docs: Sequence[str], val_fraction: float,
                    seed: int) -> tuple[list[str], list[str]]:
  """Splits by whole documents with a fixed seed: (train, validation)."""
  if len(docs) < 2:
    raise DataError(
        f"data.source: found {len(docs)} document(s); at least 2 are needed to "
        "split train and validation by document (a plain text file is one "
        "document: use a directory of files or a JSON-lines file)")
  order = np.random.default_rng(seed).permutation(len(docs))
  n_val = min(len(docs) - 1, max(1, round(len(docs) * val_fraction)))
  val = sorted(order[:n_val].tolist())
  train = sorted(order[n_val:].tolist())
  return [docs[i] for i in train], [docs[i] for i in val]


def pack_documents(token_docs: Sequence[np.ndarray], sep_id: int, seq_len: int,
                   seed: int | None) -> np.ndarray:
  """Concatenates documents, each followed by `sep_id`, and cuts the stream
  into rows of ``seq_len + 1`` tokens (inputs and shifted targets) that
  overlap by one token, so every token of the stream is a target once.

  The document order is a permutation drawn from `seed` (None keeps the
  given order). Returns int32 [num_rows, seq_len + 1]; the tail that does
  not fill a row is dropped.
  """
  order = (np.arange(len(token_docs)) if seed is None
           else np.random.default_rng(seed).permutation(len(token_docs)))
  sep = np.asarray([sep_id], dtype=np.int32)
  pieces = []
  for i in order:
    pieces.append(np.asarray(token_docs[i], dtype=np.int32))
    pieces.append(sep)
  stream = np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)
  rows = (len(stream) - 1) // seq_len
  if rows <= 0:
    return np.zeros((0, seq_len + 1), np.int32)
  starts = np.arange(rows) * seq_len
  return stream[starts[:, None] + np.arange(seq_len + 1)[None, :]]


def unigram_entropy(tokens: np.ndarray) -> float:
  """Entropy in nats of the empirical unigram distribution of `tokens`:
  the loss of the best model that ignores context, on these very tokens."""
  counts = np.bincount(np.asarray(tokens).ravel())
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())
