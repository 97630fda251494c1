"""Multi-round MQAR with overwrites, after Zoology's ``forgetting_mqar``.

Each round writes key-value pairs and then asks queries; in rounds after
the first a fraction of the writes reassign keys written before (always to
a different value), and the answer to a query is the key's latest value::

    BOS  (k v)*p  QUERY (q a)*m  ROUND  (k v)*p  QUERY (q a)*m  ROUND ...

Metadata: ``rounds``, ``pairs_per_round``, ``queries_per_round``; per
answer, ``round`` (1-based) and ``writes`` (how often the queried key has
been written so far: 1 = never overwritten) and ``overwritten``
(``writes > 1``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ultramem_jax.tasks.base import Task
from ultramem_jax.tasks.instance import Builder
from ultramem_jax.tasks.parsing import recall
from ultramem_jax.tasks.sampling import Size, capacity, decode_codes, pick_size
from ultramem_jax.tasks.space import TaskError


@dataclasses.dataclass(frozen=True)
class MQAROverwrite(Task):
  """Multi-round MQAR.

  Attributes:
    rounds: number of write-then-query rounds.
    pairs_per_round: writes per round; None fills the length.
    queries_per_round: queries per round, keys drawn without replacement
      from those written so far; None asks as many as there are writes.
    overwrite_fraction: share of the writes of rounds 2.. that reassign an
      existing key (the rest introduce new keys, while any are left).
    key_len: tokens per key.
    value_len: tokens per value.
  """

  name = "mqar_overwrite"
  rounds: Size = 3
  pairs_per_round: Size = None
  queries_per_round: Size = None
  overwrite_fraction: float = 0.5
  key_len: int = 1
  value_len: int = 1

  def generate(self, rng, space, length, *, split="train", filler=None):
    if not 0.0 <= self.overwrite_fraction <= 1.0:
      raise TaskError(f"{self.name}.overwrite_fraction="
                      f"{self.overwrite_fraction}: must be in [0, 1]")
    cap = capacity(len(space.keys), self.key_len)
    vcap = capacity(len(space.values), self.value_len)
    r, p, q = self._sizes(rng, length, cap)
    if vcap < 2 and r > 1:
      raise TaskError(f"{self.name}: overwrites need at least 2 values")

    # Every key the instance may use, in order of first appearance.
    n_over = int(round(self.overwrite_fraction * p))
    total_new = min(cap, p + (r - 1) * (p - n_over))
    keys = space.keys[decode_codes(
        rng.choice(cap, size=total_new, replace=False), len(space.keys),
        self.key_len)]
    current = np.zeros(total_new, np.int64)  # value code of each key
    writes = np.zeros(total_new, np.int64)   # how often each was written
    used = 0

    b = Builder().add(space.bos)
    for rnd in range(1, r + 1):
      if rnd > 1:
        b.add(space.round)
      n_new = p if rnd == 1 else min(p - n_over, total_new - used)
      over = rng.choice(used, size=p - n_new, replace=False)
      new = np.arange(used, used + n_new)
      used += n_new
      # Overwrites shift the old code by 1..vcap-1: always a new value.
      current[over] = (current[over] + rng.integers(1, vcap, size=len(over))
                       ) % vcap
      current[new] = rng.integers(0, vcap, size=n_new)
      writes[over] += 1
      writes[new] = 1
      batch = rng.permutation(np.concatenate([over, new]))
      b.add(np.concatenate([keys[batch], self._values(space, current[batch])],
                           axis=1).ravel())
      b.add(space.query)
      asked = rng.choice(used, size=min(q, used), replace=False)
      b.items(keys[asked], self._values(space, current[asked]),
              round=np.full(len(asked), rnd), writes=writes[asked],
              overwritten=writes[asked] > 1)
    return b.build(task=self.name, length=length, rounds=r,
                   pairs_per_round=p, queries_per_round=q)

  def _sizes(self, rng, length: int, cap: int) -> tuple[int, int, int]:
    """(rounds, pairs per round, queries per round) that fit `length`
    tokens with at most `cap` distinct keys."""
    w = self.key_len + self.value_len
    r = pick_size(self.rounds, (length - 1) // (2 * w + 2), rng,
                  f"{self.name}.rounds")
    fixed = 2 * r  # BOS, r QUERY markers, r - 1 ROUND markers
    if self.queries_per_round is None:
      p_max = (length - fixed) // (2 * r * w)
    else:
      q_min = (self.queries_per_round if isinstance(self.queries_per_round, int)
               else self.queries_per_round[0])
      p_max = (length - fixed - r * q_min * w) // (r * w)
    p = pick_size(self.pairs_per_round, min(p_max, cap), rng,
                  f"{self.name}.pairs_per_round")
    if self.queries_per_round is None:
      q = p
    else:
      q = pick_size(self.queries_per_round,
                    min(p, (length - fixed - r * p * w) // (r * w)), rng,
                    f"{self.name}.queries_per_round")
    return r, p, q

  def _values(self, space, codes: np.ndarray) -> np.ndarray:
    return space.values[decode_codes(codes, len(space.values),
                                     self.value_len)]

  def solve(self, tokens, space):
    return recall(np.asarray(tokens), space)
