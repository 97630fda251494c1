"""Held-out loss: every validation row once, padding weighted out."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from ultramem_jax.data.pipeline import eval_batches


def shard_batch(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """Places this process's part of a global batch on the mesh."""
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in batch.items()}


def evaluate(eval_step: Callable, state, rows: np.ndarray, batch_size: int,
             sharding, max_batches: int = 0) -> tuple[float, int]:
  """(mean loss in nats/token, number of target tokens) over `rows`."""
  total, count = 0.0, 0.0
  for batch in eval_batches(rows, batch_size, max_batches):
    s, c = eval_step(state, shard_batch(batch, sharding))
    total += float(s)
    count += float(c)
  return total / count, int(count)
