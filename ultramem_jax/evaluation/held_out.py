"""The held-out documents of a corpus that ``eval.py loss`` scores.

A corpus (a name of ``data.corpora`` or a path to the user's text) is read,
split and tokenized as the training pipeline would for
``data.source=<corpus>`` with the run's ``data`` settings and tokenizer,
and only its validation documents are kept: for the run's own source these
are exactly its validation rows, and a corpus the model was trained on is
still scored on documents it has not seen. With ``all_documents``, a corpus
other than the run's source keeps all its documents.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from ultramem_jax.data import corpora
from ultramem_jax.data.corpora import DataError
from ultramem_jax.data.packing import pack_documents, split_documents


def same_source(a: str, b: str) -> bool:
  """Whether two data sources name the same corpus or path."""
  if a == b:
    return True
  pa, pb = pathlib.Path(a).expanduser(), pathlib.Path(b).expanduser()
  return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


@dataclasses.dataclass
class Corpus:
  name: str
  trained_on: bool  # the run's own data.source
  selection: str  # which documents are scored, in words
  token_docs: list[np.ndarray]


def load_corpus(name: str, data_cfg, tokenizer, all_documents: bool = False) -> Corpus:
  """The documents of corpus `name` that are scored, tokenized: the
  validation documents that ``pipeline.prepare_data`` would make with
  ``data.source=name`` and `data_cfg`'s other settings, or, with
  `all_documents` and a corpus other than the run's source, all of them."""
  skipped: list[str] | None = [] if data_cfg.on_decode_error == "skip" else None
  try:
    docs = corpora.load_documents(name, data_cfg.data_dir or None,
                                  text_field=data_cfg.text_field, skipped=skipped)
  except DataError as e:
    raise DataError(f"corpus {name!r}: {e}") from None
  trained_on = same_source(name, data_cfg.source)
  if all_documents and not trained_on:
    return Corpus(name, False, f"all {len(docs)} documents",
                  tokenizer.encode_batch(docs))
  total = len(docs)
  if data_cfg.max_documents and len(docs) > data_cfg.max_documents:
    keep = np.random.default_rng(data_cfg.split_seed).permutation(len(docs))
    docs = [docs[i] for i in sorted(keep[:data_cfg.max_documents].tolist())]
  try:
    _, val_docs = split_documents(docs, data_cfg.val_fraction, data_cfg.split_seed)
  except DataError as e:
    raise DataError(f"corpus {name!r}: {e}") from None
  kept = (f" of the {len(docs)} that data.max_documents keeps"
          if len(docs) < total else "")
  selection = (f"{len(val_docs)} validation documents of {total}{kept} "
               f"(data.val_fraction={data_cfg.val_fraction}, "
               f"data.split_seed={data_cfg.split_seed})")
  return Corpus(name, trained_on, selection, tokenizer.encode_batch(val_docs))


def packed_rows(corpus: Corpus, sep_id: int, seq_len: int) -> np.ndarray:
  """The corpus's documents packed in order as validation rows are."""
  rows = pack_documents(corpus.token_docs, sep_id, seq_len, seed=None)
  if len(rows) == 0:
    n = sum(len(d) + 1 for d in corpus.token_docs)
    raise DataError(f"corpus {corpus.name!r}: its {len(corpus.token_docs)} scored "
                    f"documents hold {n} tokens, fewer than one sequence of "
                    f"data.seq_len={seq_len}")
  return rows
