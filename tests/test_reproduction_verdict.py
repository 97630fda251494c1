"""The verdict rule of ultramem_jax/reproduction/verdict.py, each branch
against numbers computed by hand in the comments."""

from __future__ import annotations

import math

import pytest

from ultramem_jax.reproduction.verdict import (INCONCLUSIVE, NOT_REPRODUCED,
                                               REPRODUCED, combine, compare,
                                               needs_third_seed, pooled_std,
                                               verdict)

# Two seeds each, 0.2 apart: s = 0.2 / sqrt(2) = 0.141421 per contender,
# pooled 0.141421, threshold 2 * 0.141421 = 0.282843.
A_LOW = [1.0, 1.2]      # mean 1.1
B_HIGH = [2.0, 2.2]     # mean 2.1: 1.0 above A, counts
B_NEAR = [1.1, 1.3]     # mean 1.2: 0.1 above A, within the threshold


def test_pooled_std_of_unequal_groups():
  # [1, 2, 3]: s = 1; [5, 7]: s = sqrt(2). Pooled: sqrt((2 * 1 + 1 * 2) / 3).
  assert pooled_std([1.0, 2.0, 3.0], [5.0, 7.0]) == pytest.approx(math.sqrt(4 / 3))
  assert pooled_std(A_LOW, B_HIGH) == pytest.approx(0.2 / math.sqrt(2))
  assert pooled_std([1.0], B_HIGH) is None
  c = compare([1.0, 2.0, 3.0], [5.0, 7.0])
  # means 2 and 6: |-4| > 2 * 1.1547 = 2.3094
  assert (c.mean_a, c.mean_b, c.n_a, c.n_b) == (2.0, 6.0, 3, 2)
  assert c.diff == pytest.approx(-4.0) and c.counts
  assert c.threshold == pytest.approx(2 * math.sqrt(4 / 3))


def test_strict_claim_each_branch():
  v = verdict(A_LOW, B_HIGH)          # A 1.0 below B, 1.0 > 0.2828
  assert v.verdict == REPRODUCED and v.comparison.counts
  assert v.comparison.diff == pytest.approx(-1.0)
  assert "paper's direction" in v.reason and "0.1414" in v.reason
  assert verdict(B_HIGH, A_LOW).verdict == NOT_REPRODUCED
  v = verdict(A_LOW, B_NEAR)          # 0.1 <= 0.2828
  assert v.verdict == INCONCLUSIVE and not v.comparison.counts
  assert verdict(B_NEAR, A_LOW).verdict == INCONCLUSIVE


def test_parity_claim_each_branch():
  # A not worse than B: reproduced when A is better by a counted
  # difference or when the difference does not count; not reproduced when
  # A is worse by a counted one.
  assert verdict(A_LOW, B_HIGH, "parity").verdict == REPRODUCED
  assert verdict(B_NEAR, A_LOW, "parity").verdict == REPRODUCED   # 0.1 worse
  assert verdict(A_LOW, B_NEAR, "parity").verdict == REPRODUCED
  v = verdict(B_HIGH, A_LOW, "parity")                            # 1.0 worse
  assert v.verdict == NOT_REPRODUCED and "against the paper" in v.reason


def test_a_difference_of_exactly_twice_the_spread_does_not_count():
  # [0, 1, 2] and [2, 3, 4]: s = 1 each, pooled 1, means 1 and 3: the
  # difference is 2 = 2 * 1 exactly, which does not count (strictly more).
  assert verdict([0.0, 1.0, 2.0], [2.0, 3.0, 4.0]).verdict == INCONCLUSIVE
  assert verdict([0.0, 1.0, 2.0], [2.01, 3.01, 4.01]).verdict == REPRODUCED   # 2.01 > 2
  # No spread at all: any difference counts.
  assert verdict([1.0, 1.0], [1.5, 1.5]).verdict == REPRODUCED


def test_higher_is_better_flips_the_direction():
  # Accuracies 0.8, 0.9 against 0.5, 0.6: 0.3 > 2 * 0.0707 = 0.1414.
  acc_a, acc_b = [0.8, 0.9], [0.5, 0.6]
  assert verdict(acc_a, acc_b, higher_is_better=True).verdict == REPRODUCED
  assert verdict(acc_b, acc_a, higher_is_better=True).verdict == NOT_REPRODUCED
  assert verdict(acc_a, acc_b).verdict == NOT_REPRODUCED     # as losses
  assert verdict(acc_b, acc_a, "parity", higher_is_better=True).verdict == NOT_REPRODUCED
  # Which mean is the better one follows the direction, counted or not.
  assert verdict(acc_a, acc_b, higher_is_better=True).a_better
  assert not verdict(acc_a, acc_b).a_better
  assert verdict(A_LOW, B_NEAR).a_better and not verdict(B_NEAR, A_LOW).a_better
  assert verdict([0.9], [0.5], higher_is_better=True).a_better   # one seed


def test_fewer_than_two_seeds_is_inconclusive_whatever_the_gap():
  for kind in ("strict", "parity"):
    v = verdict([1.0], [9.0, 9.1], kind)
    assert v.verdict == INCONCLUSIVE and "fewer than 2 seeds" in v.reason
    assert v.comparison.pooled_std is None and not v.comparison.counts
  with pytest.raises(ValueError, match="kind"):
    verdict(A_LOW, B_HIGH, "less")
  with pytest.raises(ValueError, match="no values"):
    verdict([], B_HIGH)


def test_third_seed_when_the_difference_is_within_twice_the_spread():
  assert needs_third_seed(A_LOW, B_NEAR)           # 0.1 <= 0.2828, n = 2
  assert not needs_third_seed(A_LOW, B_HIGH)       # counts
  assert needs_third_seed([1.0], B_HIGH)           # one seed: no spread yet
  # Three seeds each and still within the spread: the rule asks no more.
  assert not needs_third_seed([0.0, 1.0, 2.0], [0.5, 1.5, 2.5])
  assert needs_third_seed([0.0, 1.0, 2.0], [0.5, 1.5])


def test_combine():
  assert combine([REPRODUCED, REPRODUCED]) == REPRODUCED
  assert combine([REPRODUCED, INCONCLUSIVE]) == INCONCLUSIVE
  assert combine([INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED]) == NOT_REPRODUCED
  assert combine([]) == INCONCLUSIVE
