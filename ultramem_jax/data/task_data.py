"""Training and validation rows from the task suite (``data.tasks``).

``data.tasks`` is a mixture spec (``"mqar:1,niah:0.5"``); the entry
``text`` stands for the packed rows of ``data.source``. :func:`build`
turns it, with the text already prepared by ``pipeline.prepare_data``, into
a :class:`TaskData`: the mixture, the token space of the run's tokenizer,
the needle task's filler text and the held-out validation rows.

:func:`train_dataset` is the grain pipeline of a run with tasks. Each row is
``{"inputs", "targets", "weights"}`` where ``weights`` is the loss mask
(``data.task_loss``: answer tokens only, or every instance token; padding
never; every token of a text row):

* task rows come from a :class:`~ultramem_jax.tasks.TaskSource`, whose row
  ``i`` is a pure function of ``(train.seed, i)``;
* text rows are the packed training rows, shuffled with ``train.seed`` and
  reshuffled each epoch, as in the text-only pipeline;
* with both, ``grain.MapDataset.mix`` interleaves them deterministically
  at the share of text (the weight of ``text`` over the sum of all
  weights; grain rounds the two shares to integers with the smaller at
  100), so every batch holds about that share of text rows; each task row
  draws its task by the task weights.

Everything is a ``grain.MapDataset``, so the iterator position that the
checkpoint saves resumes the same stream. Validation rows are instances
``0 .. data.task_val_rows - 1`` of the held-out split ("eval") of the same
seed, with the validation text as the needle's filler.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import grain
import numpy as np

from ultramem_jax.config import ConfigError
from ultramem_jax.data.config import DataConfig
from ultramem_jax.tasks import (
    TaskError, TaskMixture, TaskRows, TaskSource, TokenSpace, collate,
    make_instances, parse_mixture)

TEXT = "text"


def mixture_weights(spec: str) -> tuple[float, dict[str, float]]:
  """``data.tasks`` -> (share of text rows in [0, 1), {task: weight})."""
  weights = parse_mixture(spec, "data.tasks", extra=(TEXT,))
  total = sum(weights.values())
  tasks = {n: w for n, w in weights.items() if n != TEXT}
  return weights.get(TEXT, 0.0) / total, tasks


def filler_tokens(rows: np.ndarray) -> np.ndarray:
  """The token stream of packed rows (they overlap by one token), for the
  needle task's haystack."""
  rows = np.asarray(rows)
  if len(rows) == 0:
    return np.zeros((0,), np.int32)
  return np.concatenate([rows[0, :1], rows[:, 1:].ravel()]).astype(np.int32)


@dataclasses.dataclass
class TaskData:
  """What a run with ``data.tasks`` trains and validates on.

  Attributes:
    text_share: the share of text rows (0 for tasks alone).
    mixture: the tasks and their sampling weights (among task rows).
    space: the task ids of the run's tokenizer.
    train_filler: training text, the needle's haystack in training rows.
    val_rows: the held-out validation rows.
  """

  text_share: float
  mixture: TaskMixture
  space: TokenSpace
  train_filler: np.ndarray
  val_rows: TaskRows

  @property
  def trains_text(self) -> bool:
    return self.text_share > 0


def build(cfg: DataConfig, text, seed: int) -> TaskData:
  """The TaskData of `cfg` (``data.tasks`` set) over `text` (a
  ``pipeline.TextData``); `seed` is the run's ``train.seed``.

  Raises ConfigError naming ``data.tasks`` / ``data.task_params`` when a
  task cannot make rows with this tokenizer and ``data.seq_len``."""
  if not cfg.tasks:
    raise ConfigError("data.tasks: empty; a text-only run needs no task data")
  text_share, weights = mixture_weights(cfg.tasks)
  try:
    space = TokenSpace.for_tokenizer(text.tokenizer)
    mixture = TaskMixture(weights, {n: p for n, p in cfg.task_params.items()
                                    if n in weights})
    train_filler = filler_tokens(text.train_rows)
    val_filler = filler_tokens(text.val_rows)
    insts = make_instances(mixture, cfg.task_val_rows, cfg.seq_len + 1, seed,
                           space, split="eval", filler=val_filler)
    val_rows = collate(insts, cfg.seq_len, space, cfg.task_loss)
    # One training row of each task, so that a problem shows before compiling.
    for task in mixture.tasks.values():
      task.sample(seed, space, cfg.seq_len + 1, filler=train_filler)
  except TaskError as e:
    raise ConfigError(f"data.tasks: {e} (vocabulary of "
                      f"{text.tokenizer.vocab_size}, data.seq_len="
                      f"{cfg.seq_len}; see data.task_params)") from None
  return TaskData(text_share, mixture, space, train_filler, val_rows)


def _text_example(row: np.ndarray) -> dict[str, np.ndarray]:
  return {"inputs": row[:-1], "targets": row[1:],
          "weights": np.ones(row.shape[0] - 1, np.float32)}


def row_dataset(cfg: DataConfig, tasks: TaskData, text_rows: np.ndarray,
                seed: int) -> grain.MapDataset:
  """The infinite stream of single rows (text and tasks mixed), before the
  per-process slicing and batching of :func:`train_dataset`."""
  source = TaskSource(tasks.mixture, cfg.seq_len, seed, tasks.space,
                      split="train", filler=tasks.train_filler,
                      loss_on=cfg.task_loss)
  task_ds = grain.MapDataset.source(source)
  if not tasks.trains_text:
    return task_ds
  text_ds = (grain.MapDataset.source(text_rows).shuffle(seed=seed).repeat()
             .map(_text_example))
  return grain.MapDataset.mix(
      [text_ds, task_ds], [tasks.text_share, 1.0 - tasks.text_share])


def train_dataset(cfg: DataConfig, tasks: TaskData, text_rows: np.ndarray,
                  seed: int, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
  """Per-process batches of the mixed stream, as ``pipeline.train_dataset``
  makes them of text: with `process_count` > 1, process i takes every
  process_count-th row from i, so the processes' batches at one step
  together hold the rows that one process would have batched alone."""
  if cfg.batch_size % process_count:
    raise ValueError(f"data.batch_size={cfg.batch_size} must be divisible by "
                     f"the {process_count} processes")
  ds = row_dataset(cfg, tasks, text_rows, seed)
  if process_count > 1:
    ds = ds[process_index::process_count]
  return ds.batch(cfg.batch_size // process_count, drop_remainder=True)


def eval_batches(rows: TaskRows, batch_size: int, part: int = 0,
                 parts: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Every row of `rows` once; the last batch is padded with rows of
  weight 0. Of each global batch, yields only the rows of `part` (of
  `parts`), as ``pipeline.eval_batches`` does."""
  if batch_size % parts:
    raise ValueError(f"batch_size={batch_size} does not split into {parts} "
                     "parts")
  size = batch_size // parts
  batch = rows.as_batch()
  n = len(rows.inputs)
  for start in range(0, n, batch_size):
    chunk = {k: v[start:start + batch_size] for k, v in batch.items()}
    pad = batch_size - len(chunk["inputs"])
    if pad:
      chunk = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
               for k, v in chunk.items()}
    yield {k: v[part * size:(part + 1) * size] for k, v in chunk.items()}
