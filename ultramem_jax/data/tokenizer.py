"""Byte-level BPE (trained with `tokenizers`) and plain-byte tokenizers.

Both reserve one special token, ``<|endoftext|>``, that separates documents
when they are packed. A tokenizer is saved as ``tokenizer.json`` in the run
directory so a resumed run or an evaluation decodes with the same one.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Protocol, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

SEPARATOR = "<|endoftext|>"
FILENAME = "tokenizer.json"


class Tokenizer(Protocol):
  vocab_size: int
  sep_id: int

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...
  def decode(self, ids: Sequence[int]) -> str: ...
  def save(self, path: str | os.PathLike) -> None: ...


class ByteTokenizer:
  """UTF-8 bytes 0..255 plus the separator (id 256)."""

  vocab_size = 257
  sep_id = 256

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int32)
            for t in texts]

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", "replace")

  def save(self, path: str | os.PathLike) -> None:
    _write_atomic(path, json.dumps({"ultramem_tokenizer": "bytes"}))


class BPETokenizer:
  """A trained byte-level BPE; every byte sequence is encodable."""

  def __init__(self, tok: tokenizers.Tokenizer):
    self._tok = tok
    self.vocab_size = tok.get_vocab_size()
    sep = tok.token_to_id(SEPARATOR)
    if sep is None:
      raise ValueError(f"tokenizer has no {SEPARATOR} token")
    self.sep_id = sep

  @classmethod
  def train(cls, texts: Sequence[str], vocab_size: int) -> "BPETokenizer":
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[SEPARATOR], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return cls(tok)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.asarray(e.ids, dtype=np.int32)
            for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def save(self, path: str | os.PathLike) -> None:
    _write_atomic(path, self._tok.to_str())


def _write_atomic(path: str | os.PathLike, text: str) -> None:
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def train_tokenizer(kind: str, texts: Sequence[str], vocab_size: int) -> Tokenizer:
  if kind == "bytes":
    return ByteTokenizer()
  if kind == "bpe":
    return BPETokenizer.train(texts, vocab_size)
  raise ValueError(f"data.tokenizer: got {kind!r}; expected 'bpe' or 'bytes'")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  text = pathlib.Path(path).read_text()
  if json.loads(text).get("ultramem_tokenizer") == "bytes":
    return ByteTokenizer()
  return BPETokenizer(tokenizers.Tokenizer.from_str(text))
