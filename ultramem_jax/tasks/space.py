"""The token space of the tasks: which vocabulary ids are markers, keys,
values or free text.

Token-id conventions
--------------------
Tasks live inside the text model's vocabulary. :class:`TokenSpace` reserves
a block of ids at the top of it (by default the top ``min(512, vocab // 2)``
ids, skipping excluded ids such as the tokenizer's separator) and splits the
block, in ascending order, into

* ``NUM_MARKERS`` marker ids with fixed roles (``BOS``, ``PAD``, ``QUERY``,
  ``ROUND``, ``NEEDLE``, ``ARROW``, ``FACT``, ``SEP``),
* the key alphabet (the lower half of the rest),
* the value alphabet (the upper half).

Every other id is "free": the natural filler text of the needle task only
uses free ids (reserved ids are removed from it), so a prompt can always be
parsed unambiguously. Keys, entities and relations are drawn from the key
alphabet; every answer is a run of value-alphabet tokens, so the chance
level of a guesser that draws answer tokens uniformly from the value
alphabet is ``|values| ** -answer_len`` for every task
(:func:`ultramem_jax.tasks.scoring.chance`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable

import numpy as np

MARKERS = ("BOS", "PAD", "QUERY", "ROUND", "NEEDLE", "ARROW", "FACT", "SEP")
NUM_MARKERS = len(MARKERS)

# Kinds of token ids in TokenSpace.kind.
FREE, MARKER, KEY, VALUE = 0, 1, 2, 3


class TaskError(ValueError):
  """A task parameter or length that cannot be used; the message names it."""


@dataclasses.dataclass(frozen=True)
class TokenSpace:
  """Which ids of a vocabulary of `vocab_size` the tasks use, and for what.

  Attributes:
    vocab_size: the model's vocabulary size; every generated id is below it.
    reserved: the reserved ids, ascending: markers, then keys, then values.
    exclude: ids never generated (e.g. the tokenizer's document separator).
  """

  vocab_size: int
  reserved: tuple[int, ...]
  exclude: tuple[int, ...] = ()

  def __post_init__(self):
    if len(set(self.reserved)) != len(self.reserved):
      raise TaskError("TokenSpace.reserved has repeated ids")
    if any(not 0 <= i < self.vocab_size for i in self.reserved):
      raise TaskError(
          f"TokenSpace.reserved has ids outside [0, {self.vocab_size})")
    if set(self.reserved) & set(self.exclude):
      raise TaskError("TokenSpace.reserved overlaps TokenSpace.exclude")
    if len(self.reserved) < NUM_MARKERS + 4:
      raise TaskError(
          f"a token space needs at least {NUM_MARKERS + 4} reserved ids "
          f"({NUM_MARKERS} markers, 2 keys, 2 values); "
          f"got {len(self.reserved)}")

  @classmethod
  def for_vocab(cls, vocab_size: int, exclude: Iterable[int] = (),
                num_reserved: int | None = None) -> "TokenSpace":
    """Reserves the top `num_reserved` ids of the vocabulary not in `exclude`.

    The default, ``min(512, vocab_size // 2)``, gives the byte tokenizer
    (257 ids, separator 256 excluded) ids 128..255: 8 markers, 60 keys and
    60 values; a BPE vocabulary of 4096 gets its 512 rarest merges: 8
    markers, 252 keys, 252 values.
    """
    exclude = tuple(sorted({int(i) for i in exclude}))
    if num_reserved is None:
      num_reserved = min(512, vocab_size // 2)
    candidates = [i for i in range(vocab_size - 1, -1, -1) if i not in exclude]
    if num_reserved > len(candidates):
      raise TaskError(f"cannot reserve {num_reserved} task ids in a vocabulary "
                      f"of {vocab_size} ({len(exclude)} excluded)")
    return cls(vocab_size, tuple(sorted(candidates[:num_reserved])), exclude)

  @classmethod
  def for_tokenizer(cls, tokenizer: Any,
                    num_reserved: int | None = None) -> "TokenSpace":
    """The default space of a text tokenizer (its separator excluded)."""
    return cls.for_vocab(tokenizer.vocab_size, (tokenizer.sep_id,),
                         num_reserved)

  # Marker ids.
  def marker(self, name: str) -> int:
    return self.reserved[MARKERS.index(name)]

  bos = property(lambda self: self.marker("BOS"))
  pad = property(lambda self: self.marker("PAD"))
  query = property(lambda self: self.marker("QUERY"))
  round = property(lambda self: self.marker("ROUND"))
  needle = property(lambda self: self.marker("NEEDLE"))
  arrow = property(lambda self: self.marker("ARROW"))
  fact = property(lambda self: self.marker("FACT"))
  sep = property(lambda self: self.marker("SEP"))

  @functools.cached_property
  def keys(self) -> np.ndarray:
    """The key alphabet, int32 ascending."""
    rest = self.reserved[NUM_MARKERS:]
    return np.asarray(rest[:len(rest) // 2], np.int32)

  @functools.cached_property
  def values(self) -> np.ndarray:
    """The value (answer) alphabet, int32 ascending."""
    rest = self.reserved[NUM_MARKERS:]
    return np.asarray(rest[len(rest) // 2:], np.int32)

  @functools.cached_property
  def free(self) -> np.ndarray:
    """Ids that are neither reserved nor excluded (filler text uses these)."""
    mask = self.kind == FREE
    mask[list(self.exclude)] = False
    return np.flatnonzero(mask).astype(np.int32)

  @functools.cached_property
  def kind(self) -> np.ndarray:
    """int8 [vocab_size]: FREE, MARKER, KEY or VALUE for every id."""
    kind = np.zeros(self.vocab_size, np.int8)
    kind[list(self.reserved[:NUM_MARKERS])] = MARKER
    kind[self.keys] = KEY
    kind[self.values] = VALUE
    return kind

  def describe(self) -> str:
    return (f"vocab {self.vocab_size}: markers {self.reserved[:NUM_MARKERS]}, "
            f"{len(self.keys)} keys {self.keys[0]}..{self.keys[-1]}, "
            f"{len(self.values)} values {self.values[0]}..{self.values[-1]}")


def default_space(vocab_size: int | None = None, tokenizer: Any = None,
                  space: TokenSpace | None = None) -> TokenSpace:
  """The space given, else that of `tokenizer`, else of a bare vocabulary."""
  if space is not None:
    return space
  if tokenizer is not None:
    if vocab_size not in (None, tokenizer.vocab_size):
      raise TaskError(f"vocab_size={vocab_size} differs from the tokenizer's "
                      f"{tokenizer.vocab_size}")
    return TokenSpace.for_tokenizer(tokenizer)
  if vocab_size is None:
    raise TaskError("give a vocab_size, a tokenizer or a TokenSpace")
  return TokenSpace.for_vocab(vocab_size)
