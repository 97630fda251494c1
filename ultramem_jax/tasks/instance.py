"""Task instances and the fixed rows they pack into.

An :class:`Instance` is a token sequence with answer spans: the model reads
the tokens with teacher forcing and an answer counts as correct when the
predictions of all its tokens match
(:func:`ultramem_jax.tasks.scoring.exact_match`). Instances pack into fixed
rows of ``seq_len + 1`` tokens (:func:`collate`): inputs are
``tokens[:-1]``, targets ``tokens[1:]``, padding is masked out.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple, Sequence

import numpy as np

from ultramem_jax.tasks.space import TaskError, TokenSpace


@dataclasses.dataclass
class Instance:
  """One generated example.

  Attributes:
    tokens: int32 [T], the whole sequence with its answers (teacher forcing).
    spans: int32 [A, 2], ``[start, stop)`` of each answer in `tokens`.
    meta: instance metadata (task, length, depth, n_demos, ...).
    answer_meta: answer-level metadata as columns, each an array of A values
      (e.g. ``round``, or the ``form`` of a fact query); bucket names are
      looked up here first, then in `meta`.
  """

  tokens: np.ndarray
  spans: np.ndarray
  meta: dict[str, Any]
  answer_meta: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  @property
  def answer_mask(self) -> np.ndarray:
    """bool [T]: True on answer tokens."""
    delta = np.zeros(len(self.tokens) + 1, np.int32)
    np.add.at(delta, self.spans[:, 0], 1)
    np.add.at(delta, self.spans[:, 1], -1)
    return np.cumsum(delta[:-1]) > 0

  @property
  def answers(self) -> list[np.ndarray]:
    return [self.tokens[s:e] for s, e in self.spans]

  def bucket(self, i: int, name: str) -> Any:
    """Metadata `name` of answer `i` (answer-level first, then instance)."""
    if name in self.answer_meta:
      return self.answer_meta[name][i].item()
    return self.meta.get(name)

  def answer_info(self, i: int) -> dict[str, Any]:
    """All answer-level metadata of answer `i`, as Python values."""
    return {k: v[i].item() for k, v in self.answer_meta.items()}


class Builder:
  """Accumulates the tokens and answer spans of one instance."""

  def __init__(self):
    self._chunks: list[np.ndarray] = []
    self._len = 0
    self._spans: list[np.ndarray] = []
    self._meta: list[dict[str, np.ndarray]] = []

  def __len__(self) -> int:
    return self._len

  def add(self, *ids: int | Sequence[int] | np.ndarray) -> "Builder":
    for x in ids:
      chunk = np.atleast_1d(np.asarray(x, np.int32))
      self._chunks.append(chunk)
      self._len += len(chunk)
    return self

  def answer(self, ids: Sequence[int] | np.ndarray, **meta: Any) -> "Builder":
    """Adds one answer span."""
    return self.items(np.zeros((1, 0), np.int32), np.asarray(ids)[None],
                      **{k: [v] for k, v in meta.items()})

  def items(self, prompts: np.ndarray, answers: np.ndarray,
            **meta: Sequence[Any]) -> "Builder":
    """Adds rows ``prompts[i] answers[i]`` at once, each answer a span.

    Args:
      prompts: int [m, a], the tokens before each answer.
      answers: int [m, b], the answers.
      **meta: per-answer metadata, one sequence of m values per name.
    """
    prompts, answers = np.asarray(prompts), np.asarray(answers)
    m, a = prompts.shape
    width = a + answers.shape[1]
    starts = self._len + a + width * np.arange(m)
    self.add(np.concatenate([prompts, answers], axis=1).ravel())
    self._spans.append(np.stack([starts, starts + answers.shape[1]], axis=1))
    self._meta.append({k: np.asarray(v) for k, v in meta.items()})
    return self

  def build(self, **meta: Any) -> Instance:
    tokens = (np.concatenate(self._chunks) if self._chunks
              else np.zeros((0,), np.int32))
    spans = (np.concatenate(self._spans).astype(np.int32) if self._spans
             else np.zeros((0, 2), np.int32))
    names = set(self._meta[0]) if self._meta else set()
    if any(set(m) != names for m in self._meta):
      raise TaskError("every answer of an instance needs the same metadata")
    columns = {k: np.concatenate([m[k] for m in self._meta]) for k in names}
    return Instance(tokens, spans, {**meta, "tokens": int(len(tokens))},
                    columns)


class TaskRows(NamedTuple):
  """Fixed-length training/eval rows.

  Attributes:
    inputs: int32 [n, seq_len], ``tokens[:-1]`` padded with the PAD marker.
    targets: int32 [n, seq_len], ``tokens[1:]`` padded.
    loss_mask: float32 [n, seq_len], 1 on the targets that carry loss (the
      answer tokens, or every real token), 0 on padding.
  """

  inputs: np.ndarray
  targets: np.ndarray
  loss_mask: np.ndarray

  def as_batch(self) -> dict[str, np.ndarray]:
    """The dict the training loop takes (``weights`` is the loss mask)."""
    return {"inputs": self.inputs, "targets": self.targets,
            "weights": self.loss_mask}


LossOn = Literal["answers", "all"]


def collate(instances: Sequence[Instance], seq_len: int, space: TokenSpace,
            loss_on: LossOn = "answers") -> TaskRows:
  """Pads instances (at most ``seq_len + 1`` tokens each) into rows.

  `loss_on` "answers" puts loss on answer tokens only; "all" on every real
  target token (prompt and filler too), never on padding.
  """
  if loss_on not in ("answers", "all"):
    raise TaskError(f"loss_on={loss_on!r}: expected 'answers' or 'all'")
  n = len(instances)
  rows = np.full((n, seq_len + 1), space.pad, np.int32)
  mask = np.zeros((n, seq_len + 1), np.float32)
  for r, inst in enumerate(instances):
    t = len(inst.tokens)
    if t > seq_len + 1:
      raise TaskError(f"an instance of {t} tokens does not fit a row of "
                      f"seq_len={seq_len} (+1)")
    rows[r, :t] = inst.tokens
    if loss_on == "answers":
      mask[r, :t] = inst.answer_mask
    else:
      mask[r, 1:t] = 1.0
  return TaskRows(rows[:, :-1], rows[:, 1:], mask[:, 1:])
