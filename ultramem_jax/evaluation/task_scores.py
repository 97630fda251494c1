"""Scoring a predictor on held-out instances of the task suite: exact match
of every answer, aggregated per task by length and by the task's buckets.

The model is called through a :data:`Predict` function (inputs -> argmax
predictions), so :func:`evaluate_tasks` scores any predictor the same way
(the tests pass the brute-force solvers and a uniform guesser);
:func:`model_predictor` makes one of a restored run.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from ultramem_jax.config import ConfigError
from ultramem_jax.parallel.distributed import batch_shard
from ultramem_jax.parallel.mesh import batch_sharding, use_mesh
from ultramem_jax.parallel.rules import batch_shards
from ultramem_jax.tasks import (
    Task, TaskError, TokenSpace, aggregate, collate, get_task, make_instances,
    score)
from ultramem_jax.training.evaluate import shard_batch

# inputs int32 [B, T] -> next-token predictions int32 [B, T].
Predict = Callable[[np.ndarray], np.ndarray]

# Buckets reported per task besides length.
BUCKETS: dict[str, tuple[str, ...]] = {
    "niah": ("depth",),
    "mqar": ("num_pairs",),
    "mqar_overwrite": ("round", "overwritten"),
    "token_mapping": ("n_demos", "shown"),
    "fact_retrieval": ("form",),
}
LENGTH = "seq_len"


def batch_rows(batch_size: int, trained_len: int, length: int,
               shards: int = 1) -> int:
  """Rows per forward pass at `length`: about the tokens of a training batch,
  a multiple of the mesh's batch shards."""
  rows = batch_size * trained_len // length // shards * shards
  return max(shards, rows)


def model_predictor(run) -> tuple[Predict, Callable[[int], int]]:
  """(predict, rows per call for a length) of a RestoredRun: one jitted
  forward pass per batch, greedy (argmax) next-token predictions at every
  position. `predict` pads a short batch to the full size with rows of 0;
  every process passes all rows and places its part on the mesh."""
  cfg = run.cfg
  shards = batch_shards(run.mesh.shape)
  sharding = batch_sharding(run.mesh)
  replicated = jax.sharding.NamedSharding(run.mesh,
                                          jax.sharding.PartitionSpec())

  @jax.jit
  def forward(state, inputs):
    model, _ = nnx.merge(run.graphdef, state)
    preds = jnp.argmax(model(inputs), axis=-1).astype(jnp.int32)
    return jax.lax.with_sharding_constraint(preds, replicated)

  def rows_for(length: int) -> int:
    return batch_rows(cfg.data.batch_size, cfg.data.seq_len, length, shards)

  def predict(inputs: np.ndarray) -> np.ndarray:
    inputs = np.asarray(inputs, np.int32)
    n, length = inputs.shape
    size = rows_for(length)
    part, parts = batch_shard(sharding, size)
    mine = slice(part * size // parts, (part + 1) * size // parts)
    out = []
    with use_mesh(run.mesh):
      for start in range(0, n, size):
        chunk = inputs[start:start + size]
        pad = size - len(chunk)
        if pad:
          chunk = np.concatenate([chunk, np.zeros((pad, length), np.int32)])
        placed = shard_batch({"inputs": chunk[mine]}, sharding, size)
        preds = forward(run.state, placed["inputs"])
        out.append(np.asarray(preds.addressable_data(0))[:size - pad])
    return np.concatenate(out)

  return predict, rows_for


def _records(table: Mapping[tuple, Mapping[str, float]],
             names: Sequence[str]) -> list[dict[str, Any]]:
  return [{**dict(zip(names, key)), **stats} for key, stats in table.items()]


def evaluate_tasks(predict: Predict, tasks: Sequence[str],
                   lengths: Sequence[int], n: int, seed: int, space,
                   params: Mapping[str, Mapping[str, Any]] | None = None,
                   filler: np.ndarray | None = None,
                   rows_for: Callable[[int], int] | int = 64,
                   progress: bool = True) -> dict[str, Any]:
  """Scores `predict` on `n` held-out instances per task and length.

  Args:
    predict: inputs int32 [B, T] -> argmax predictions int32 [B, T] (a
      model's, or any stand-in).
    tasks: task names.
    lengths: sequence lengths T; instances take at most T + 1 tokens.
    n: instances per task and length.
    seed: the held-out stream's seed (split "eval").
    space: the TokenSpace of the model's tokenizer.
    params: per-task generator parameters.
    filler: tokenized text for the needle's haystack.
    rows_for: rows per `predict` call, or a function of the length.
    progress: show a progress bar (instances/s).

  Returns:
    ``{"tasks": {name: {"overall", "by": {bucket names: [records]},
    "answers_per_instance", "params"}}, "instances_per_sec"}``; a record
    holds the bucket values and ``n`` (answers), ``correct``,
    ``accuracy`` and ``chance``.
  """
  objs = _tasks(tasks, params or {})
  per_call = rows_for if callable(rows_for) else (lambda _: rows_for)
  total = len(tasks) * len(lengths) * n
  bar = tqdm(total=total, unit="inst", dynamic_ncols=True, mininterval=1.0,
             disable=not progress, leave=False, file=sys.stderr)
  result: dict[str, Any] = {"tasks": {}}
  t0 = time.perf_counter()
  try:
    for name, task in objs.items():
      instances, correct = [], []
      for length in lengths:
        bar.set_description(f"{name} @ {length}")
        insts, ok = _score_length(predict, name, task, length, n, seed, space,
                                  filler, per_call(length), bar)
        instances += insts
        correct += ok
      result["tasks"][name] = _task_result(name, task, instances, correct,
                                           space)
  finally:
    bar.close()
  result["instances_per_sec"] = total / max(time.perf_counter() - t0, 1e-9)
  return result


def _tasks(names: Sequence[str], params: Mapping[str, Mapping[str, Any]]
           ) -> dict[str, Task]:
  """The generator of each task name with its parameters."""
  objs = {}
  for name in names:
    try:
      objs[name] = get_task(name, **params.get(name, {}))
    except TaskError as e:
      raise ConfigError(f"--params: {e}") from None
  return objs


def _score_length(predict: Predict, name: str, task: Task, length: int,
                  n: int, seed: int, space: TokenSpace,
                  filler: np.ndarray | None, size: int, bar
                  ) -> tuple[list, list[np.ndarray]]:
  """(instances, exact match of each) of `n` held-out instances of at most
  ``length + 1`` tokens, predicted `size` rows at a time."""
  try:
    insts = make_instances(task, n, length + 1, seed, space,
                           split="eval", filler=filler)
  except TaskError as e:
    raise ConfigError(f"--lengths: task {name!r} at length {length}: "
                      f"{e} (see --params)") from None
  for inst in insts:
    inst.meta[LENGTH] = length
  correct = []
  for start in range(0, n, size):
    chunk = insts[start:start + size]
    rows = collate(chunk, length, space)
    preds = np.asarray(predict(rows.inputs))
    correct += score(chunk, preds)
    bar.update(len(chunk))
  return insts, correct


def _task_result(name: str, task: Task, instances: list,
                 correct: list[np.ndarray], space: TokenSpace
                 ) -> dict[str, Any]:
  """One task's entry of the result: overall accuracy and the records by
  length and by each of its BUCKETS and length."""
  by = {LENGTH: _records(aggregate(instances, correct, (LENGTH,), space),
                         (LENGTH,))}
  for bucket in BUCKETS.get(name, ()):
    names = (bucket, LENGTH)
    by[",".join(names)] = _records(
        aggregate(instances, correct, names, space), names)
  overall = aggregate(instances, correct, (), space)[()]
  return {"overall": overall, "by": by,
          "answers_per_instance": overall["n"] / len(instances),
          "params": {k: v for k, v in vars(task).items()}}
