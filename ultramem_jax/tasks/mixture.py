"""Streams of task instances: mixtures, random-access rows, eval sets.

Instance ``i`` of a stream is a pure function of ``(seed, split, i)``: its
generator is ``np.random.default_rng([seed, split_code, i])``, which first
picks the task by the mixture weights and then draws the instance. So a
stream needs no state to resume (row ``i`` is the same whenever it is
asked for), and the "train" and "eval" splits of one seed never share a
random stream.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ultramem_jax.tasks.base import SPLITS, Split, Task
from ultramem_jax.tasks.instance import Instance, LossOn, TaskRows, collate
from ultramem_jax.tasks.registry import TASKS, get_task, parse_mixture
from ultramem_jax.tasks.scoring import exact_match
from ultramem_jax.tasks.space import TaskError, TokenSpace, default_space

TaskSpec = str | Task | Mapping[str, float]


class TaskMixture:
  """Tasks with sampling weights.

  Args:
    weights: ``{task name: weight}``, or a spec string for
      :func:`parse_mixture` (``"mqar:1,niah:0.5"``) or a single task name.
    params: ``{task name: {parameter: value}}`` overrides for the tasks.
    tasks: ready task objects by name (take precedence over `params`).
  """

  def __init__(self, weights: str | Mapping[str, float],
               params: Mapping[str, Mapping[str, Any]] | None = None,
               tasks: Mapping[str, Task] | None = None):
    weights = parse_mixture(weights)
    params = dict(params or {})
    for name in params:
      if name not in TASKS:
        raise TaskError(f"task parameters for unknown task {name!r}; "
                        f"known: {', '.join(TASKS)}")
    tasks = dict(tasks or {})
    self.names = tuple(weights)
    self.tasks = {n: tasks.get(n) or get_task(n, **params.get(n, {}))
                  for n in self.names}
    w = np.asarray([weights[n] for n in self.names], np.float64)
    self.probs = w / w.sum()
    self._cum = np.cumsum(self.probs)

  @classmethod
  def of(cls, spec: TaskSpec,
         params: Mapping[str, Mapping[str, Any]] | None = None
         ) -> "TaskMixture":
    """A mixture from a Task object, a name, a spec string or weights."""
    if isinstance(spec, TaskMixture):
      return spec
    if isinstance(spec, Task):
      return cls({spec.name: 1.0}, tasks={spec.name: spec})
    return cls(spec, params)

  def instance(self, index: int, seed: int, space: TokenSpace, length: int, *,
               split: Split = "train", filler: np.ndarray | None = None
               ) -> Instance:
    """Instance `index` of the stream `(seed, split)`: at most `length`
    tokens."""
    if split not in SPLITS:
      raise TaskError(f"split={split!r}: expected 'train' or 'eval'")
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    k = min(int(np.searchsorted(self._cum, rng.random(), side="right")),
            len(self.names) - 1)
    return self.tasks[self.names[k]].generate(rng, space, length, split=split,
                                              filler=filler)


class TaskSource:
  """Random-access fixed-length rows of a mixture (a grain data source).

  ``source[i]`` is ``{"inputs", "targets", "weights"}``, each [seq_len],
  for instance ``start + i`` of the stream; ``weights`` is the loss mask.
  """

  def __init__(self, mixture: TaskSpec | TaskMixture, seq_len: int, seed: int,
               space: TokenSpace, *, split: Split = "train",
               filler: np.ndarray | None = None, loss_on: LossOn = "answers",
               size: int = 2**31 - 1, start: int = 0):
    self.mixture = TaskMixture.of(mixture)
    self.seq_len, self.seed, self.space = seq_len, seed, space
    self.split, self.filler, self.loss_on = split, filler, loss_on
    self.size, self.start = size, start

  def __len__(self) -> int:
    return self.size

  def instance(self, i: int) -> Instance:
    return self.mixture.instance(self.start + int(i), self.seed, self.space,
                                 self.seq_len + 1, split=self.split,
                                 filler=self.filler)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    if not -self.size <= i < self.size:
      raise IndexError(i)
    rows = collate([self.instance(i % self.size)], self.seq_len,
                   self.space, self.loss_on)
    return {k: v[0] for k, v in rows.as_batch().items()}


def make_instances(task: TaskSpec, n: int, length: int, seed: int,
                   space: TokenSpace, *, split: Split = "eval",
                   filler: np.ndarray | None = None, start: int = 0,
                   params: Mapping[str, Mapping[str, Any]] | None = None
                   ) -> list[Instance]:
  """Instances ``start .. start + n - 1`` of the stream, each at most
  `length` tokens (held-out sets use split "eval", the default)."""
  mixture = TaskMixture.of(task, params)
  return [mixture.instance(start + i, seed, space, length, split=split,
                           filler=filler) for i in range(n)]


def make_rows(task: TaskSpec, n: int, seq_len: int, seed: int,
              vocab_size: int | None = None, tokenizer: Any = None, *,
              space: TokenSpace | None = None,
              filler: np.ndarray | None = None, split: Split = "train",
              loss_on: LossOn = "answers", start: int = 0,
              params: Mapping[str, Mapping[str, Any]] | None = None
              ) -> TaskRows:
  """`n` rows of ``seq_len`` tokens: ``(inputs, targets, loss_mask)``.

  Args:
    task: a task name, a Task, a mixture spec (``"mqar:1,niah:0.5"``) or
      weights.
    n: rows; row ``r`` holds instance ``start + r`` of the stream.
    seq_len: the model's sequence length (instances take ``seq_len + 1``
      tokens: inputs and shifted targets).
    seed: the stream's seed.
    vocab_size, tokenizer, space: the token space (see
      :func:`~ultramem_jax.tasks.space.default_space`): a given `space` wins, else the
      tokenizer's (its separator excluded), else the top of `vocab_size`.
    filler: tokenized corpus text for the needle task's haystack.
    split: "train" or "eval" (a separate stream; fact retrieval also asks
      held-out forms).
    loss_on: "answers" (loss on answer tokens only) or "all" (every real
      token); padding is always masked.
    start: the index of the first instance.
    params: per-task parameter overrides, ``{name: {param: value}}``.
  """
  space = default_space(vocab_size, tokenizer, space)
  insts = make_instances(task, n, seq_len + 1, seed, space, split=split,
                         filler=filler, start=start, params=params)
  return collate(insts, seq_len, space, loss_on)


def score(instances: Sequence[Instance],
          preds: Sequence[np.ndarray] | np.ndarray) -> list[np.ndarray]:
  """:func:`~ultramem_jax.tasks.scoring.exact_match` of each instance against its prediction row."""
  return [exact_match(p, inst)
          for p, inst in zip(preds, instances, strict=True)]
