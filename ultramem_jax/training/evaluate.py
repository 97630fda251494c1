"""Held-out loss: every validation row once, padding weighted out."""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import numpy as np

from ultramem_jax.data import task_data
from ultramem_jax.data.pipeline import eval_batches
from ultramem_jax.parallel.distributed import batch_shard


def shard_batch(batch: dict[str, np.ndarray], sharding,
                global_batch: int) -> dict[str, jax.Array]:
  """Places this process's rows of a global batch of `global_batch` rows on
  the mesh (one process: all of them)."""
  return {k: jax.make_array_from_process_local_data(
              sharding, v, (global_batch, *v.shape[1:]))
          for k, v in batch.items()}


def weighted_sums(eval_step: Callable, state, batches: Iterable[dict],
                  batch_size: int, sharding) -> tuple[float, float]:
  """(sum of weighted token losses, sum of weights) over `batches`, this
  process's parts of global batches of `batch_size` rows."""
  total, count = 0.0, 0.0
  for batch in batches:
    s, c = eval_step(state, shard_batch(batch, sharding, batch_size))
    total += float(s)
    count += float(c)
  return total, count


def evaluate(eval_step: Callable, state, rows: np.ndarray, batch_size: int,
             sharding, max_batches: int = 0) -> tuple[float, int]:
  """(mean loss in nats/token, number of target tokens) over `rows`; every
  process holds all of `rows` and places only its part of each batch."""
  part, parts = batch_shard(sharding, batch_size)
  total, count = weighted_sums(
      eval_step, state, eval_batches(rows, batch_size, max_batches, part, parts),
      batch_size, sharding)
  return total / count, int(count)


def task_loss(eval_step: Callable, state, rows: task_data.TaskRows,
              batch_size: int, sharding) -> float:
  """Weighted mean loss over held-out task rows (every process holds all
  of them and places its part of each batch); 0 weight in all gives 0."""
  part, parts = batch_shard(sharding, batch_size)
  total, count = weighted_sums(
      eval_step, state, task_data.eval_batches(rows, batch_size, part, parts),
      batch_size, sharding)
  return total / max(count, 1.0)
