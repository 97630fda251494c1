"""Preparing a training run: what it needs before its first step.

In order: the checks of the run directory, its lock (one training at a
time, training/run_lock.py), the mesh layout and the memory bound with the
vocabulary the run will have (training/memory_budget.py), the data (with
the saved tokenizer when resuming), the mesh check again if the tokenizer's
vocabulary came out otherwise, the mesh; then the run directory is written
(config and tokenizer; when resuming, only once the checkpoint restored and
the step compiled, so that a failed resume leaves it as it was); then,
under the mesh and with SIGTERM / SIGINT turned into a stop request, the
train state is built or restored, the data iterator placed, the train step
compiled, the logs cut back to the step resumed from and the metric writers
opened. Everything that can be wrong with the inputs (config, mesh, run
directory, data) is checked before the model is built or anything is
compiled, and before anything in the run directory is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Callable, Iterator

import grain
import jax
import jax.numpy as jnp
from flax import nnx

from ultramem_jax.config import ConfigError
from ultramem_jax.data import task_data
from ultramem_jax.data.corpora import DataError
from ultramem_jax.data.pipeline import TextData, prepare_data, train_dataset
from ultramem_jax.data.tokenizer import load_tokenizer
from ultramem_jax.model.abstract import abstract_model, resolved_vocab
from ultramem_jax.parallel.distributed import barrier, batch_shard, processes_differing
from ultramem_jax.parallel.mesh import batch_sharding, check_mesh, make_mesh, use_mesh
from ultramem_jax.training.checkpoint import Checkpointer, abstract_like
from ultramem_jax.training.config import Config, fault_steps, save_config
from ultramem_jax.training.evaluate import shard_batch
from ultramem_jax.training.guards import check_writable
from ultramem_jax.training.memory_budget import check_train_memory, check_vocab
from ultramem_jax.training.metrics import ScalarWriter, truncate_logs
from ultramem_jax.training.resume import restore_latest_agreed
from ultramem_jax.training.run_dir import RunDir, check_resume
from ultramem_jax.training.run_lock import RunLock
from ultramem_jax.training.signals import RaiseBeforeTraining, StopRequest
from ultramem_jax.training.state import create_state, param_count
from ultramem_jax.training.step import make_eval_step, make_train_step

Log = Callable[[str], None]


@dataclasses.dataclass
class Prepared:
  """What a run needs, checked and built.

  Attributes:
    cfg: the config, with the tokenizer's vocabulary size filled in.
    run_dir: the run directory.
    data: the text data (rows, tokenizer, statistics).
    tasks: the task data with ``data.tasks``, else None.
    mesh, sharding: the device mesh and the batch sharding over it.
    graphdef, state: the train state (model and optimizer) at `step`,
      restored from the latest readable checkpoint when resuming.
    data_iter: this process's batches, placed after `step`.
    checkpointer: the run's checkpoints.
    train_step, eval_step: the compiled train step and the eval step.
    first_batch: the batch of step ``step + 1`` (the one compiled with).
    writer: TensorBoard and metrics.jsonl (written by process 0 only).
    stop: set by SIGTERM / SIGINT while the run is prepared.
  """

  cfg: Config
  run_dir: RunDir
  data: TextData
  tasks: task_data.TaskData | None
  mesh: jax.sharding.Mesh
  sharding: jax.sharding.NamedSharding
  graphdef: nnx.GraphDef
  state: nnx.State
  step: int
  data_iter: grain.DatasetIterator
  checkpointer: Checkpointer
  train_step: Callable
  eval_step: Callable
  first_batch: dict
  writer: ScalarWriter
  stop: StopRequest

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0

  @property
  def trains_text(self) -> bool:
    return self.tasks is None or self.tasks.trains_text

  @property
  def task_tokens(self) -> str:
    return ("answer tokens" if self.cfg.data.task_loss == "answers"
            else "instance tokens")


# ----------------------------------------------------------------------------- checks

def _resolve_vocab(cfg: Config, vocab_size: int) -> Config:
  if cfg.model.vocab_size == 0:
    model = dataclasses.replace(cfg.model, vocab_size=vocab_size)
    return dataclasses.replace(cfg, model=model)
  if cfg.model.vocab_size < vocab_size:
    raise ConfigError(
        f"model.vocab_size: got {cfg.model.vocab_size}; the tokenizer has "
        f"{vocab_size} entries (use 0 to take the tokenizer's size)")
  return cfg


def _check_planned(cfg: Config, run: RunDir, resume_step: int | None) -> int:
  """The mesh layout and the memory bound (training/memory_budget.py) with
  the vocabulary the run will have, before any data is read or a tokenizer
  trained: model.vocab_size when set, else the saved tokenizer's size when
  resuming, else the configured one (257 bytes, data.bpe_vocab_size for
  BPE: a trained BPE may come out smaller, and the layout is checked again
  then). Returns that vocabulary size."""
  if not cfg.model.vocab_size and resume_step is not None and run.tokenizer.exists():
    cfg = _resolve_vocab(cfg, load_tokenizer(run.tokenizer).vocab_size)
  check_vocab(cfg)
  model = abstract_model(cfg)
  check_mesh(cfg, model, jax.device_count(), batch=False)
  check_train_memory(cfg, model)
  return resolved_vocab(cfg)


def _check_same_data(data: TextData) -> None:
  """Each process prepared the data itself; one that differs (other files
  under data.source, another tokenizer) would train on other rows."""
  differing = processes_differing(data.train_rows, data.val_rows)
  if differing:
    raise DataError(
        f"data.source: process(es) {differing} prepared other data than process "
        "0 (other files, or another tokenizer); every host needs the same "
        "data.source contents and the same train.run_dir")


# ----------------------------------------------------------------------------- data

def _load_data(cfg: Config, run: RunDir, resume_step: int | None, log: Log
               ) -> tuple[Config, TextData, task_data.TaskData | None, bool]:
  """(cfg with the vocabulary resolved, text data, task data or None,
  whether the tokenizer is new, i.e. not the resumed run's saved one)."""
  tokenizer = None
  if resume_step is not None and run.tokenizer.exists():
    tokenizer = load_tokenizer(run.tokenizer)
  data = prepare_data(cfg.data, tokenizer=tokenizer, log=log)
  cfg = _resolve_vocab(cfg, data.tokenizer.vocab_size)
  tasks = (task_data.build(cfg.data, data, cfg.train.seed) if cfg.data.tasks
           else None)
  if tasks is not None:
    task_tokens = ("answer tokens" if cfg.data.task_loss == "answers"
                   else "instance tokens")
    log(f"data.tasks: {cfg.data.tasks}: {tasks.text_share:.0%} text rows; "
        f"tasks {dict(zip(tasks.mixture.names, tasks.mixture.probs.tolist()))}"
        f"; loss on {task_tokens}; {tasks.space.describe()}")
  return cfg, data, tasks, tokenizer is None


def _dataset(cfg: Config, data: TextData, tasks: task_data.TaskData | None,
             sharding) -> grain.MapDataset:
  """This process's part of every global batch."""
  shard_index, shard_count = batch_shard(sharding, cfg.data.batch_size)
  if tasks is None:
    return train_dataset(data.train_rows, cfg.data.batch_size,
                         seed=cfg.train.seed, process_index=shard_index,
                         process_count=shard_count)
  return task_data.train_dataset(cfg.data, tasks, data.train_rows,
                                 cfg.train.seed, shard_index, shard_count)


def next_batch(data_iter: grain.DatasetIterator, sharding, batch_size: int,
               faults: frozenset[int], at_step: int) -> dict:
  """The batch of step `at_step` on the mesh; with `faults` (the steps of
  ``train.fault_nan_steps``, a test hook) a NaN objective at those steps."""
  batch = shard_batch(next(data_iter), sharding, batch_size)
  if faults:
    batch["nan_fault"] = jnp.float32(math.nan if at_step in faults else 0.0)
  return batch


# ----------------------------------------------------------------------------- writing

def _write_run_dir(cfg: Config, run: RunDir, data: TextData, new_tokenizer: bool,
                   replace: bool, lock: RunLock, resuming: bool, log: Log) -> None:
  """Process 0 moves an old run aside when asked (the lock follows into the
  new directory) and, unless resuming, writes the config and the
  tokenizer; the others wait, so that every process has decided on
  resuming before the directory changes."""
  barrier("run directory checked")
  if jax.process_index() == 0:
    if replace:
      moved = run.move_aside()
      lock.follow(moved)
      log(f"train.overwrite: moved the previous run to {moved}")
    run.root.mkdir(parents=True, exist_ok=True)
    if not resuming:
      _write_config(cfg, run, data, new_tokenizer)
  barrier("run directory written")


def _write_config(cfg: Config, run: RunDir, data: TextData,
                  new_tokenizer: bool) -> None:
  save_config(cfg, run.config)  # atomic: written aside, then renamed
  if new_tokenizer:
    data.tokenizer.save(run.tokenizer)


def _describe_mesh(mesh, shard_index: int, shard_count: int) -> str:
  return (f"mesh: {dict(mesh.shape)} over {jax.device_count()} "
          f"{jax.default_backend()} device(s), {jax.process_count()} process(es)"
          + (f"; this process reads part {shard_index + 1} of {shard_count} of "
             "each batch" if jax.process_count() > 1 else ""))


# ----------------------------------------------------------------------------- building

def _restore(checkpointer: Checkpointer, run: RunDir, state: nnx.State,
             data_iter: grain.DatasetIterator, log: Log) -> tuple[int, nnx.State]:
  """(step, state) of the newest readable checkpoint, moving `data_iter`
  to its position; (0, `state`) when none is left."""
  found = restore_latest_agreed(checkpointer, abstract_like(state), data_iter,
                                log=log)  # one decision over all processes
  if found is None:
    log("no readable checkpoint left; starting from step 0")
    return 0, state
  step, state, _ = found
  log(f"resumed from {run.checkpoint(step)}")
  return step, state


def _build(cfg: Config, run: RunDir, data: TextData,
           tasks: task_data.TaskData | None, mesh, resume_step: int | None,
           new_tokenizer: bool, stop: StopRequest, log: Log) -> Prepared:
  """The state (restored when resuming), the data iterator, the compiled
  step and the writers; called under the mesh. A resume writes the config
  only here, once it is known to work."""
  sharding = batch_sharding(mesh)
  graphdef, state = create_state(cfg)
  log(f"model: {param_count(state):,} parameters; data: {data.stats}")
  data_iter = iter(_dataset(cfg, data, tasks, sharding))
  checkpointer = Checkpointer(run.checkpoints, cfg.train.max_to_keep)
  step = 0
  if resume_step is not None:
    step, state = _restore(checkpointer, run, state, data_iter, log)
  eval_step = make_eval_step(graphdef)
  t0 = time.perf_counter()
  first = next_batch(data_iter, sharding, cfg.data.batch_size,
                     fault_steps(cfg.train), step + 1)
  train_step = make_train_step(graphdef, cfg.train.log_every,
                               cfg.train.grad_accum_steps).lower(state, first).compile()
  log(f"compiled the train step in {time.perf_counter() - t0:.1f}s")
  k = cfg.train.grad_accum_steps
  if k > 1:
    log(f"gradient accumulation: each step runs {k} microbatches of "
        f"{cfg.data.batch_size // k} rows")
  if jax.process_index() == 0:
    if resume_step is not None:
      _write_config(cfg, run, data, new_tokenizer)
    truncate_logs(run.metrics, run.tensorboard, step, log)
  writer = ScalarWriter(run.tensorboard, run.metrics,
                        enabled=jax.process_index() == 0)
  return Prepared(cfg, run, data, tasks, mesh, sharding, graphdef, state, step,
                  data_iter, checkpointer, train_step, eval_step, first, writer,
                  stop)


# What a SIGTERM / SIGINT interrupts before the run directory is written.
_BEFORE = "checking the run and preparing its data"


@contextlib.contextmanager
def prepare(cfg: Config, log: Log) -> Iterator[Prepared]:
  """Checks, loads and builds what the run of `cfg` needs; yields it while
  the mesh is in use and SIGTERM / SIGINT ask the run to stop (see
  training/signals.py). The run directory's lock is held throughout (taken
  after the config checks, before anything is decided or written)."""
  run = RunDir(cfg.train.run_dir)
  if cfg.model.memory.table_memory == "host":
    raise ConfigError(
        "model.memory.table_memory: got 'host'; training keeps the tables on "
        "the device (AdamW updates every row of them each step). Host tables "
        "are for decoding and evaluation: pass model.memory.table_memory=host "
        "to eval.py generate, loss, tasks or harness")
  with RaiseBeforeTraining(_BEFORE):
    check_mesh(cfg, None, jax.device_count())  # sizes and batch: before any data
    check_writable(run.root)
  with run.lock(log) as lock, _prepare_locked(cfg, run, lock, log) as prepared:
    yield prepared


@contextlib.contextmanager
def _prepare_locked(cfg: Config, run: RunDir, lock: RunLock, log: Log
                    ) -> Iterator[Prepared]:
  """:func:`prepare` once the run directory is this training's."""
  with RaiseBeforeTraining(_BEFORE):
    resume_step, replace = check_resume(cfg)
    if resume_step is not None:
      run.check_process_count(resume_step)
    planned_vocab = _check_planned(cfg, run, resume_step)
    cfg, data, tasks, new_tokenizer = _load_data(cfg, run, resume_step, log)
    if cfg.model.vocab_size != planned_vocab:  # the tokenizer came out smaller
      check_mesh(cfg, abstract_model(cfg), jax.device_count(), batch=False)
    mesh = make_mesh(cfg.mesh)
    shard = batch_shard(batch_sharding(mesh), cfg.data.batch_size)
    _check_same_data(data)
  _write_run_dir(cfg, run, data, new_tokenizer, replace, lock,
                 resume_step is not None, log)
  log(_describe_mesh(mesh, *shard))
  with use_mesh(mesh), StopRequest(log, agreed=jax.process_count() > 1) as stop:
    yield _build(cfg, run, data, tasks, mesh, resume_step, new_tokenizer, stop,
                 log)

