"""The verdict rule, fixed before any run (docs/reproduction.md).

Two contenders A and B each have one final number per seed (a held-out
loss, or an accuracy). With n_a, n_b seeds, means m_a, m_b and sample
standard deviations s_a, s_b (n - 1 in the denominator):

- The pooled seed standard deviation is
  ``s_p = sqrt(((n_a - 1) s_a^2 + (n_b - 1) s_b^2) / (n_a + n_b - 2))``.
- The difference ``m_a - m_b`` **counts** when ``|m_a - m_b| > 2 s_p``
  (strictly), and only when both have at least 2 seeds; with fewer there is
  no spread to compare against, and nothing counts.
- A claim is directional, "A better than B" (``strict``: lower is better
  for a loss, ``higher_is_better`` for an accuracy), or a parity claim, "A
  not worse than B" (``parity``: the paper's "UltraMemV2 reaches the MoE's
  loss").

Verdicts:

- **reproduced**: the difference counts in the paper's direction; for a
  parity claim also when it does not count (A is not worse by a counted
  difference).
- **not reproduced**: the difference counts in the other direction.
- **inconclusive at this scale**: otherwise (a directional claim whose
  difference does not count, or either contender with fewer than 2 seeds).

A third seed is due (``needs_third_seed``) when the difference is within
twice the pooled spread (it does not count) and a contender has fewer than
3 seeds: the sweeps run seeds 0 and 1, and seed 2 is the rule's fallback.

A claim made of several comparisons (claim 1's order MoE <= V2 < v1 <
Memory+) is ``combine``d: not reproduced if any part is, reproduced if every
part is, inconclusive otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Sequence

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive at this scale"
MIN_SEEDS = 2
THIRD_SEED = 3
Kind = Literal["strict", "parity"]


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
  """(mean, sample standard deviation; None for fewer than 2 values)."""
  n = len(values)
  if n == 0:
    raise ValueError("no values")
  mean = math.fsum(values) / n
  if n < 2:
    return mean, None
  return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def pooled_std(a: Sequence[float], b: Sequence[float]) -> float | None:
  """The pooled sample standard deviation of two groups of seeds; None
  unless both have at least 2."""
  if len(a) < MIN_SEEDS or len(b) < MIN_SEEDS:
    return None
  (_, sa), (_, sb) = mean_std(a), mean_std(b)
  na, nb = len(a), len(b)
  return math.sqrt(((na - 1) * sa ** 2 + (nb - 1) * sb ** 2) / (na + nb - 2))


@dataclasses.dataclass(frozen=True)
class Comparison:
  """A against B: the means, the difference m_a - m_b, the pooled seed std,
  the threshold 2 * s_p, and whether the difference counts."""

  mean_a: float
  mean_b: float
  n_a: int
  n_b: int
  diff: float
  pooled_std: float | None
  counts: bool

  @property
  def threshold(self) -> float | None:
    return None if self.pooled_std is None else 2 * self.pooled_std


def compare(a: Sequence[float], b: Sequence[float]) -> Comparison:
  """The rule's difference test (see the module's docstring)."""
  (ma, _), (mb, _) = mean_std(a), mean_std(b)
  sp = pooled_std(a, b)
  diff = ma - mb
  return Comparison(ma, mb, len(a), len(b), diff, sp,
                    counts=sp is not None and abs(diff) > 2 * sp)


@dataclasses.dataclass(frozen=True)
class Verdict:
  """The verdict of one claim "A better than (or not worse than) B", with
  the comparison it rests on, whether A's mean is the better one (in the
  metric's direction, counted or not) and a sentence that gives the
  numbers."""

  verdict: str
  comparison: Comparison
  reason: str
  a_better: bool


def verdict(a: Sequence[float], b: Sequence[float], kind: Kind = "strict",
            higher_is_better: bool = False) -> Verdict:
  """The verdict on "A better than B" (`strict`) or "A not worse than B"
  (`parity`), from each contender's per-seed numbers; lower is better
  unless `higher_is_better`."""
  if kind not in ("strict", "parity"):
    raise ValueError(f"kind: got {kind!r}; expected 'strict' or 'parity'")
  c = compare(a, b)
  better = c.diff > 0 if higher_is_better else c.diff < 0
  if c.pooled_std is None:
    return Verdict(INCONCLUSIVE, c, f"fewer than {MIN_SEEDS} seeds "
                   f"(n = {c.n_a} and {c.n_b}): no seed spread to compare "
                   "against", better)
  size = f"|{c.diff:+.4f}| {'>' if c.counts else '<='} 2 x {c.pooled_std:.4f}"
  if c.counts and better:
    return Verdict(REPRODUCED, c, f"the difference counts in the paper's "
                   f"direction ({size})", better)
  if c.counts:
    return Verdict(NOT_REPRODUCED, c, f"the difference counts against the "
                   f"paper ({size})", better)
  if kind == "parity":
    return Verdict(REPRODUCED, c, f"A is not worse by a counted difference "
                   f"({size})", better)
  return Verdict(INCONCLUSIVE, c, f"the difference is within twice the seed "
                 f"spread ({size})", better)


def needs_third_seed(a: Sequence[float], b: Sequence[float]) -> bool:
  """Whether the rule asks for a third seed: the difference does not count
  (within twice the pooled spread, or fewer than 2 seeds) and a contender
  has fewer than 3 seeds."""
  return (not compare(a, b).counts) and min(len(a), len(b)) < THIRD_SEED


def combine(verdicts: Sequence[str]) -> str:
  """One verdict for a claim of several parts: not reproduced if any part
  is, reproduced if all are, else inconclusive (also for no parts)."""
  if NOT_REPRODUCED in verdicts:
    return NOT_REPRODUCED
  if verdicts and all(v == REPRODUCED for v in verdicts):
    return REPRODUCED
  return INCONCLUSIVE
