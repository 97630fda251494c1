"""Scoring: exact match of each answer, its chance level, and accuracy
per bucket of answer metadata."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ultramem_jax.tasks.instance import Instance
from ultramem_jax.tasks.space import TaskError, TokenSpace


def exact_match(pred: np.ndarray, instance: Instance) -> np.ndarray:
  """bool [A]: whether each answer of `instance` is predicted exactly.

  Args:
    pred: int [>= T - 1] next-token predictions aligned with the targets,
      ``pred[t]`` being the prediction of ``tokens[t + 1]`` (the argmax of a
      model's logits on ``inputs = tokens[:-1]``); a longer, padded row is
      fine.
    instance: the instance whose answers are scored.
  """
  pred = np.asarray(pred)
  if len(pred) < len(instance.tokens) - 1:
    raise TaskError(f"exact_match: {len(pred)} predictions for an instance of "
                    f"{len(instance.tokens)} tokens (need at least "
                    f"{len(instance.tokens) - 1})")
  return np.asarray([
      np.array_equal(pred[s - 1:e - 1], instance.tokens[s:e])
      for s, e in instance.spans], bool)


def chance(instance: Instance, space: TokenSpace) -> np.ndarray:
  """float [A]: the exact-match probability of each answer for a guesser that
  draws every answer token uniformly from the value alphabet."""
  lengths = instance.spans[:, 1] - instance.spans[:, 0]
  return np.power(float(len(space.values)), -lengths.astype(np.float64))


def aggregate(instances: Sequence[Instance], correct: Sequence[np.ndarray],
              by: Sequence[str] = (), space: TokenSpace | None = None,
              ) -> dict[tuple, dict[str, float]]:
  """Accuracy per bucket of answer metadata.

  Args:
    instances: the scored instances.
    correct: for each instance, the bool [A] of :func:`exact_match`.
    by: metadata names forming the bucket key (e.g. ``("depth", "length")``);
      empty gives a single bucket ``()``.
    space: when given, each bucket also reports its mean chance level.

  Returns:
    ``{bucket values: {"n", "correct", "accuracy"[, "chance"]}}``, buckets
    sorted.
  """
  sums: dict[tuple, list[float]] = {}
  for inst, ok in zip(instances, correct, strict=True):
    p = chance(inst, space) if space is not None else None
    for i, hit in enumerate(np.asarray(ok, bool)):
      key = tuple(inst.bucket(i, name) for name in by)
      s = sums.setdefault(key, [0, 0, 0.0])
      s[0] += 1
      s[1] += int(hit)
      if p is not None:
        s[2] += p[i]
  out = {}
  for key in sorted(sums, key=lambda k: tuple((v is None, str(type(v)), v)
                                              for v in k)):
    n, c, p = sums[key]
    out[key] = {"n": n, "correct": c, "accuracy": c / n}
    if space is not None:
      out[key]["chance"] = p / n
  return out
