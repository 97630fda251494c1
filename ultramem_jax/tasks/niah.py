"""Needle in a haystack, after RULER's ``niah.py``.

A key-value needle is placed at a relative depth inside natural filler text
(a window of tokenized corpus), and its key is asked at the end::

    BOS  filler ...  NEEDLE k v  ... filler  QUERY k a

Distractor needles (``num_needles > 1``) carry other keys at random depths.
The instance is exactly `length` tokens long. Reserved task ids are removed
from the filler so the needle can be found unambiguously; without filler the
haystack is uniform noise over the free ids (a stand-in for tests).

Metadata: ``depth`` (the requested relative depth of the asked needle),
``length`` (the context length), ``num_needles``, ``needle_pos`` (its token
position).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ultramem_jax.tasks.base import Task
from ultramem_jax.tasks.instance import Builder
from ultramem_jax.tasks.parsing import key_of, runs
from ultramem_jax.tasks.sampling import capacity, distinct_tuples, random_tuples
from ultramem_jax.tasks.space import (
    FREE, KEY, MARKER, VALUE, TaskError, TokenSpace)

# Depths drawn when none is given: 0%, 10%, ..., 100%.
DEPTHS = tuple(i / 10 for i in range(11))


@dataclasses.dataclass(frozen=True)
class NIAH(Task):
  """Needle in a haystack.

  Attributes:
    depth: relative depth in [0, 1] of the asked needle within the filler;
      None draws one of DEPTHS.
    num_needles: needles in the haystack (one is asked).
    key_len: tokens per key.
    value_len: tokens per value (the answer).
  """

  name = "niah"
  depth: float | None = None
  num_needles: int = 1
  key_len: int = 1
  value_len: int = 2

  def generate(self, rng, space, length, *, split="train", filler=None):
    if self.depth is not None and not 0.0 <= self.depth <= 1.0:
      raise TaskError(f"{self.name}.depth={self.depth}: must be in [0, 1]")
    if self.num_needles < 1:
      raise TaskError(f"{self.name}.num_needles={self.num_needles}: "
                      "must be at least 1")
    cap = capacity(len(space.keys), self.key_len)
    if self.num_needles > cap:
      raise TaskError(f"{self.name}.num_needles={self.num_needles}: only "
                      f"{cap} distinct keys")
    w = self.key_len + self.value_len
    n_fill = length - 1 - self.num_needles * (1 + w) - (1 + w)
    if n_fill < 0:
      raise TaskError(f"{self.name}: length {length} is too short for "
                      f"{self.num_needles} needle(s) and the query "
                      f"(at least {length - n_fill})")
    depth = (float(self.depth) if self.depth is not None
             else float(rng.choice(DEPTHS)))
    keys = distinct_tuples(rng, space.keys, self.key_len, self.num_needles)
    values = random_tuples(rng, space.values, self.value_len,
                           self.num_needles)
    hay = haystack(rng, space, n_fill, filler)
    cuts = np.concatenate([[int(round(depth * n_fill))],
                           rng.integers(0, n_fill + 1, self.num_needles - 1)])
    order = np.argsort(cuts, kind="stable")

    b = Builder().add(space.bos)
    prev = 0
    needle_pos = -1
    for i in order:
      b.add(hay[prev:cuts[i]])
      prev = cuts[i]
      if i == 0:
        needle_pos = len(b)
      b.add(space.needle, keys[i], values[i])
    b.add(hay[prev:], space.query, keys[0]).answer(values[0])
    return b.build(task=self.name, length=length, depth=depth,
                   num_needles=self.num_needles, needle_pos=needle_pos)

  def solve(self, tokens, space):
    tokens = np.asarray(tokens)
    needles: dict[tuple[int, ...], tuple[int, ...]] = {}
    out = []
    state = None  # "needle" or "query" after its marker
    key = None
    for run in runs(tokens, space):
      if run.kind == MARKER:
        t = tokens[run.start]
        state = ("needle" if t == space.needle
                 else "query" if t == space.query else None)
        key = None
      elif run.kind == KEY and state is not None:
        key = key_of(tokens, run)
        if state == "query":
          out.append((run.stop, np.asarray(needles[key], np.int32)))
          state = None
      elif run.kind == VALUE and state == "needle" and key is not None:
        needles[key] = key_of(tokens, run)
        state = None
      else:
        state = None
    return out


def haystack(rng: np.random.Generator, space: TokenSpace, n: int,
             filler: np.ndarray | None) -> np.ndarray:
  """`n` filler tokens: a window of `filler` at a random offset (wrapping
  around), reserved and excluded ids removed; uniform free ids without it."""
  if filler is None:
    return rng.choice(space.free, size=n).astype(np.int32)
  filler = np.asarray(filler)
  if filler.ndim != 1 or len(filler) == 0:
    raise TaskError("niah filler: expected a non-empty 1-D array of ids")
  if n == 0:
    return np.zeros((0,), np.int32)
  start = int(rng.integers(len(filler)))
  want = n + n // 8 + 16
  while True:
    window = filler[(start + np.arange(want)) % len(filler)]
    ok = (window >= 0) & (window < space.vocab_size)
    window = window[ok]
    window = window[space.kind[window] == FREE]
    if space.exclude:
      window = window[~np.isin(window, space.exclude)]
    if len(window) >= n:
      return window[:n].astype(np.int32)
    if want > 64 * (n + len(filler)):
      raise TaskError("niah filler: it has (almost) no tokens outside the "
                      "reserved task ids")
    want *= 2
