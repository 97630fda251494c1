"""Multi-query associative recall (MQAR), after Zoology's ``multiquery_ar``.

Layout (``w = key_len + value_len``)::

    BOS  k1 v1  k2 v2 ... kn vn  QUERY  q1 a1  q2 a2 ... qm am

The keys are distinct tuples of the key alphabet, values are drawn uniformly
from the value alphabet, the queries are distinct keys in random order and
each answer ``a_i`` is the value stored with ``q_i``. Metadata: ``num_pairs``,
``num_queries``; per answer, ``key_index`` (the position of the pair among
the n pairs).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ultramem_jax.tasks.base import Task
from ultramem_jax.tasks.instance import Builder
from ultramem_jax.tasks.parsing import recall
from ultramem_jax.tasks.sampling import (
    Size, capacity, distinct_tuples, pick_size, random_tuples)


@dataclasses.dataclass(frozen=True)
class MQAR(Task):
  """MQAR.

  Attributes:
    num_pairs: key-value pairs in the context; None fills the length.
    num_queries: queries after the context; None queries every key.
    key_len: tokens per key.
    value_len: tokens per value (and per answer).
  """

  name = "mqar"
  num_pairs: Size = None
  num_queries: Size = None
  key_len: int = 1
  value_len: int = 1

  def generate(self, rng, space, length, *, split="train", filler=None):
    w = self.key_len + self.value_len
    cap = capacity(len(space.keys), self.key_len)
    if self.num_queries is None:
      n_max = (length - 2) // (2 * w)
    else:
      q_min = (self.num_queries if isinstance(self.num_queries, int)
               else self.num_queries[0])
      n_max = (length - 2 - q_min * w) // w
    n = pick_size(self.num_pairs, min(n_max, cap), rng,
                  f"{self.name}.num_pairs")
    if self.num_queries is None:
      q = n
    else:
      q = pick_size(self.num_queries, min(n, (length - 2 - n * w) // w),
                    rng, f"{self.name}.num_queries")
    keys = distinct_tuples(rng, space.keys, self.key_len, n)
    values = random_tuples(rng, space.values, self.value_len, n)
    asked = rng.choice(n, size=q, replace=False)

    b = Builder().add(space.bos)
    b.add(np.concatenate([keys, values], axis=1).ravel(), space.query)
    b.items(keys[asked], values[asked], key_index=asked)
    return b.build(task=self.name, length=length, num_pairs=n, num_queries=q)

  def solve(self, tokens, space):
    return recall(np.asarray(tokens), space)
