"""The task base class: a seeded generator with its brute-force solver.

The pieces the generators share live beside it: the token space
(:mod:`ultramem_jax.tasks.space`), instances and rows
(:mod:`ultramem_jax.tasks.instance`), sampling helpers
(:mod:`ultramem_jax.tasks.sampling`), prompt parsing and the recall solver
(:mod:`ultramem_jax.tasks.parsing`) and scoring
(:mod:`ultramem_jax.tasks.scoring`).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from ultramem_jax.tasks.instance import Instance
from ultramem_jax.tasks.space import TokenSpace

Split = Literal["train", "eval"]
SPLITS = ("train", "eval")


class Task:
  """A generator with its brute-force solver.

  Subclasses are frozen dataclasses whose fields are the task's parameters
  (override them with ``dataclasses.replace`` or :func:`get_task`).
  """

  name: str = ""

  def generate(self, rng: np.random.Generator, space: TokenSpace, length: int,
               *, split: Split = "train",
               filler: np.ndarray | None = None) -> Instance:
    """One instance of at most `length` tokens (tasks that fill it exactly,
    like the needle, give exactly `length`)."""
    raise NotImplementedError

  def solve(self, tokens: np.ndarray, space: TokenSpace
            ) -> list[tuple[int, np.ndarray]]:
    """Recovers every answer by parsing the prompt: ``[(start, tokens)]``.

    The answer tokens themselves are never read (only the prompt before
    each answer and the marker structure), so corrupting them does not
    change the result.
    """
    raise NotImplementedError

  def sample(self, seed: int, space: TokenSpace, length: int, *,
             split: Split = "train", filler: np.ndarray | None = None
             ) -> Instance:
    """:meth:`generate` with a fresh generator seeded by `seed`."""
    return self.generate(np.random.default_rng(seed), space, length,
                         split=split, filler=filler)
