"""Parsing prompts into runs of same-kind tokens, for the brute-force
solvers, and the associative-recall solver of the MQAR tasks."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ultramem_jax.tasks.space import KEY, MARKER, VALUE, TokenSpace


class Run(NamedTuple):
  """A maximal stretch of same-kind tokens (markers are single-token runs)."""

  kind: int
  start: int
  stop: int


def runs(tokens: np.ndarray, space: TokenSpace) -> list[Run]:
  """Splits `tokens` into runs of FREE, KEY and VALUE ids and single markers."""
  tokens = np.asarray(tokens)
  if len(tokens) == 0:
    return []
  kind = space.kind[tokens]
  cut = np.flatnonzero((kind[1:] != kind[:-1]) | (kind[1:] == MARKER)) + 1
  starts = np.concatenate([[0], cut])
  stops = np.concatenate([cut, [len(tokens)]])
  return [Run(int(kind[s]), int(s), int(e)) for s, e in zip(starts, stops)]


def key_of(tokens: np.ndarray, run: Run) -> tuple[int, ...]:
  return tuple(int(t) for t in tokens[run.start:run.stop])


def recall(tokens: np.ndarray, space: TokenSpace) -> list[tuple[int, np.ndarray]]:
  """Associative recall by brute force, for the MQAR prompts: key-value
  pairs are stored (a later pair overwrites a key), each key after QUERY
  is answered with its latest value; ROUND ends a round's queries."""
  memory: dict[tuple[int, ...], tuple[int, ...]] = {}
  out = []
  querying = False
  pending = None
  for run in runs(tokens, space):
    if run.kind == MARKER:
      t = tokens[run.start]
      if t == space.query:
        querying = True
      elif t == space.round:
        querying = False
      pending = None
    elif run.kind == KEY:
      if querying:
        out.append((run.stop, np.asarray(memory[key_of(tokens, run)],
                                         np.int32)))
      pending = run
    elif run.kind == VALUE and pending is not None:
      if not querying:
        memory[key_of(tokens, pending)] = key_of(tokens, run)
      pending = None
  return out
