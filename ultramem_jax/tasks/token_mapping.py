"""In-context token mapping: a random function shown by demonstrations.

Each instance draws a fresh random function ``f`` from a domain of
`domain` key tuples to value tuples, shows `n_demos` demonstrations
``x ARROW f(x)`` with ``x`` drawn uniformly from the domain (so some inputs
repeat and some are never shown), then asks queries about shown inputs::

    BOS  x ARROW y  x ARROW y ...  QUERY  x ARROW a  x ARROW a ...

Accuracy against ``n_demos`` is the in-context learning curve. Metadata:
``n_demos``, ``domain``, ``num_queries``; per answer, ``shown`` (how many
demonstrations had the queried input).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ultramem_jax.tasks.base import Task
from ultramem_jax.tasks.instance import Builder
from ultramem_jax.tasks.parsing import key_of, runs
from ultramem_jax.tasks.sampling import (
    Size, capacity, distinct_tuples, pick_size, random_tuples)
from ultramem_jax.tasks.space import KEY, MARKER, VALUE, TaskError


@dataclasses.dataclass(frozen=True)
class TokenMapping(Task):
  """In-context mapping.

  Attributes:
    n_demos: demonstrations; None fills the length.
    num_queries: queries (inputs drawn uniformly from the shown ones).
    domain: size of the function's domain (capped by the key alphabet).
    key_len: tokens per input.
    value_len: tokens per output.
  """

  name = "token_mapping"
  n_demos: Size = None
  num_queries: Size = 4
  domain: int = 16
  key_len: int = 1
  value_len: int = 1

  def generate(self, rng, space, length, *, split="train", filler=None):
    w = self.key_len + 1 + self.value_len
    domain = min(self.domain, capacity(len(space.keys), self.key_len))
    if domain < 1:
      raise TaskError(f"{self.name}.domain={self.domain}: must be >= 1")
    if self.num_queries is None:
      n_max = (length - 2) // (2 * w)
    else:
      q_min = (self.num_queries if isinstance(self.num_queries, int)
               else self.num_queries[0])
      n_max = (length - 2 - q_min * w) // w
    n = pick_size(self.n_demos, n_max, rng, f"{self.name}.n_demos")
    if self.num_queries is None:
      q = n
    else:
      q = pick_size(self.num_queries, (length - 2 - n * w) // w, rng,
                    f"{self.name}.num_queries")
    xs = distinct_tuples(rng, space.keys, self.key_len, domain)
    ys = random_tuples(rng, space.values, self.value_len, domain)
    demos = rng.integers(0, domain, size=n)
    counts = np.bincount(demos, minlength=domain)
    shown = np.flatnonzero(counts)
    asked = shown[rng.integers(0, len(shown), size=q)]

    arrow = np.full((domain, 1), space.arrow, np.int32)
    prompts = np.concatenate([xs, arrow], axis=1)
    b = Builder().add(space.bos)
    b.add(np.concatenate([prompts[demos], ys[demos]], axis=1).ravel())
    b.add(space.query)
    b.items(prompts[asked], ys[asked], shown=counts[asked])
    return b.build(task=self.name, length=length, n_demos=n, domain=domain,
                   num_queries=q)

  def solve(self, tokens, space):
    tokens = np.asarray(tokens)
    mapping: dict[tuple[int, ...], tuple[int, ...]] = {}
    out = []
    querying = False
    x = None
    arrow = False
    for run in runs(tokens, space):
      if run.kind == MARKER:
        t = tokens[run.start]
        if t == space.query:
          querying = True
        arrow = t == space.arrow and x is not None
        if arrow and querying:
          out.append((run.stop, np.asarray(mapping[x], np.int32)))
        if not arrow:
          x = None
      elif run.kind == KEY:
        x = key_of(tokens, run)
        arrow = False
      elif run.kind == VALUE and arrow and not querying:
        mapping[x] = key_of(tokens, run)
        x, arrow = None, False
      else:
        x, arrow = None, False
    return out
