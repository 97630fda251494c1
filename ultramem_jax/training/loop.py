"""The training loop: checks, data, model, steps, evaluation, checkpoints.

Everything that can be wrong with the inputs (config, mesh, run directory,
data) is checked before the model is built or anything is compiled, and
before anything in the run directory is written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from ultramem_jax.config import ConfigError, to_dict
from ultramem_jax.training.config import Config, fault_steps, save_config
from ultramem_jax.data import task_data
from ultramem_jax.data.corpora import DataError
from ultramem_jax.data.pipeline import prepare_data, train_dataset
from ultramem_jax.data.tokenizer import FILENAME as TOKENIZER_FILE
from ultramem_jax.data.tokenizer import load_tokenizer
from ultramem_jax.model.abstract import abstract_model
from ultramem_jax.parallel.distributed import barrier, batch_shard, processes_differing
from ultramem_jax.parallel.mesh import batch_sharding, check_mesh, make_mesh, use_mesh
from ultramem_jax.training.checkpoint import Checkpointer, abstract_like
from ultramem_jax.training.guards import check_writable
from ultramem_jax.training.health import HealthMonitor
from ultramem_jax.training.signals import StopRequest
from ultramem_jax.training.metrics import (Progress, ScalarWriter, plot_losses,
                                           split_step_metrics)
from ultramem_jax.training.evaluate import evaluate, shard_batch
from ultramem_jax.training.optimizer import lr_schedule
from ultramem_jax.training.state import create_state, param_count
from ultramem_jax.training.step import make_eval_step, make_train_step

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
# Sections of the config that a resumed run must share with the saved one.
FIXED_SECTIONS = ("model", "data")


@dataclasses.dataclass
class RunPaths:
  root: pathlib.Path

  @property
  def checkpoints(self) -> pathlib.Path:
    return self.root / "checkpoints"

  @property
  def tensorboard(self) -> pathlib.Path:
    return self.root / "tensorboard"

  @property
  def config(self) -> pathlib.Path:
    return self.root / CONFIG_FILE

  @property
  def tokenizer(self) -> pathlib.Path:
    return self.root / TOKENIZER_FILE


@dataclasses.dataclass
class TrainResult:
  run_dir: pathlib.Path
  final_step: int
  losses: dict[int, float]          # training loss of every step run here
  val_loss: float                   # nan when stopped by a signal; the
                                    # task loss when training on tasks alone
  val_unigram_entropy: float
  tokens_per_sec: float
  wall_time_sec: float
  stopped_by: str | None = None     # "SIGTERM" / "SIGINT" when preempted
  skipped_steps: int = 0            # updates skipped for non-finite values
  val_task_loss: float | None = None  # held-out task rows (data.tasks)


def first_difference(saved: dict, new: dict, prefix: str = ""
                     ) -> tuple[str, object, object] | None:
  """(dotted key, saved value, new value) of the first key, in sorted order,
  where two nested config dicts differ; None when they agree."""
  for key in sorted(set(saved) | set(new)):
    a, b = saved.get(key), new.get(key)
    name = f"{prefix}.{key}" if prefix else key
    if isinstance(a, dict) and isinstance(b, dict):
      diff = first_difference(a, b, name)
      if diff:
        return diff
    elif a != b:
      return name, a, b
  return None


def checkpoint_steps(run_dir: pathlib.Path) -> list[int]:
  """Complete checkpoint steps in a run directory, ascending, without
  creating anything."""
  ckpt = RunPaths(run_dir).checkpoints
  if not ckpt.is_dir():
    return []
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()
                and p.is_dir() and (p / "_CHECKPOINT_METADATA").exists())


def latest_checkpoint_step(run_dir: pathlib.Path) -> int | None:
  """Latest complete checkpoint step in a run directory, without creating it."""
  steps = checkpoint_steps(run_dir)
  return steps[-1] if steps else None


def check_run_dir(cfg: Config) -> tuple[int | None, bool]:
  """Decides whether this run resumes: (step to resume from or None,
  whether the existing directory is to be moved aside first, which only
  ``train.overwrite=true`` allows)."""
  paths = RunPaths(pathlib.Path(cfg.train.run_dir))
  if paths.root.exists() and not paths.root.is_dir():
    raise ConfigError(f"train.run_dir: {str(paths.root)!r} exists and is not a directory")
  latest = latest_checkpoint_step(paths.root)
  if cfg.train.resume is False and latest is not None:
    if cfg.train.overwrite:
      return None, True
    raise ConfigError(
        f"train.resume: false, but train.run_dir={str(paths.root)!r} already "
        f"holds checkpoints (latest step {latest}); choose another "
        "train.run_dir, set train.resume=true, or set train.overwrite=true to "
        "move the old run aside")
  if cfg.train.resume is True and latest is None:
    raise ConfigError(
        f"train.resume: true, but train.run_dir={str(paths.root)!r} holds no "
        "checkpoint to resume from")
  if latest is not None and paths.config.exists():
    saved = yaml.safe_load(paths.config.read_text()) or {}
    new = to_dict(cfg)
    for section in FIXED_SECTIONS:
      saved_section = dict(saved.get(section, {}))
      new_section = dict(new[section])
      if section == "model":
        if not new_section["vocab_size"]:
          new_section["vocab_size"] = saved_section.get("vocab_size", 0)
        # How the memory layer is computed is not part of the model.
        for memory in (saved_section.get("memory", {}), new_section["memory"]):
          memory.pop("kernels", None)
      diff = first_difference(saved_section, new_section, section)
      if diff:
        name, a, b = diff
        if cfg.train.overwrite and cfg.train.resume is not True:
          return None, True
        raise ConfigError(
            f"{name}: the run has {a!r}, this config {b!r}; "
            f"train.run_dir={str(paths.root)!r} was trained with a "
            "different config; use another train.run_dir, or set "
            "train.overwrite=true to move the old run aside")
  return latest, False


def _move_aside(root: pathlib.Path) -> pathlib.Path:
  dest = root.with_name(f"{root.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
  root.rename(dest)
  return dest


def _resolve_vocab(cfg: Config, vocab_size: int) -> Config:
  if cfg.model.vocab_size == 0:
    model = dataclasses.replace(cfg.model, vocab_size=vocab_size)
    return dataclasses.replace(cfg, model=model)
  if cfg.model.vocab_size < vocab_size:
    raise ConfigError(
        f"model.vocab_size: got {cfg.model.vocab_size}; the tokenizer has "
        f"{vocab_size} entries (use 0 to take the tokenizer's size)")
  return cfg


def _check_process_count(paths: RunPaths, step: int) -> None:
  """The data-iterator position of checkpoint `step` is saved per process
  (grain writes ``data/process_<i>-of-<n>.json``), so only the same number
  of processes can resume it; another number is a usage error, not damage."""
  data = paths.checkpoints / str(step) / "data"
  counts = sorted({int(f.stem.rpartition("-of-")[2]) for f in data.glob("process_*-of-*.json")})
  if counts and counts != [jax.process_count()]:
    raise ConfigError(
        f"train.run_dir: checkpoint {step} was written by {counts[0]} "
        f"process(es); this run has {jax.process_count()}; resume it with "
        f"{counts[0]}, or start a new train.run_dir")


def _task_loss(eval_step: Callable, state, rows, batch_size: int,
               sharding) -> float:
  """Weighted mean loss over held-out task rows (every process holds all
  of them and places its part of each batch)."""
  part, parts = batch_shard(sharding, batch_size)
  total, count = 0.0, 0.0
  for batch in task_data.eval_batches(rows, batch_size, part, parts):
    s, c = eval_step(state, shard_batch(batch, sharding, batch_size))
    total += float(s)
    count += float(c)
  return total / max(count, 1.0)


def train(cfg: Config, *, stop_at_step: int | None = None,
          log: Callable[[str], None] | None = None) -> TrainResult:
  """Trains `cfg` to `cfg.train.steps` (or stops after `stop_at_step`,
  saving a checkpoint there), resuming from `cfg.train.run_dir` if asked.

  SIGTERM / SIGINT stop it after the current step with a checkpoint (see
  training/signals.py); too many non-finite steps in a row raise
  ``health.Diverged`` with the checkpoints left as they were."""
  t_start = time.perf_counter()
  log = log or (lambda s: print(s, file=sys.stdout, flush=True))
  say = log
  paths = RunPaths(pathlib.Path(cfg.train.run_dir))
  is_main = jax.process_index() == 0

  # --- checks that need nothing built ---
  check_writable(paths.root)
  resume_step, replace = check_run_dir(cfg)
  if resume_step is not None:
    _check_process_count(paths, resume_step)
  tokenizer = None
  if resume_step is not None and paths.tokenizer.exists():
    tokenizer = load_tokenizer(paths.tokenizer)
  data = prepare_data(cfg.data, tokenizer=tokenizer, log=say)
  cfg = _resolve_vocab(cfg, data.tokenizer.vocab_size)
  tasks = (task_data.build(cfg.data, data, cfg.train.seed) if cfg.data.tasks
           else None)
  trains_text = tasks is None or tasks.trains_text
  task_tokens = ("answer tokens" if cfg.data.task_loss == "answers"
                 else "instance tokens")
  if tasks is not None:
    say(f"data.tasks: {cfg.data.tasks}: {tasks.text_share:.0%} text rows; "
        f"tasks {dict(zip(tasks.mixture.names, tasks.mixture.probs.tolist()))}"
        f"; loss on {task_tokens}; {tasks.space.describe()}")
  check_mesh(cfg, abstract_model(cfg), jax.device_count())
  mesh = make_mesh(cfg.mesh)
  sharding = batch_sharding(mesh)
  shard_index, shard_count = batch_shard(sharding, cfg.data.batch_size)
  # Each process prepared the data itself; one that differs (other files
  # under data.source, another tokenizer) would train on other rows.
  differing = processes_differing(data.train_rows, data.val_rows)
  if differing:
    raise DataError(
        f"data.source: process(es) {differing} prepared other data than process "
        "0 (other files, or another tokenizer); every host needs the same "
        "data.source contents and the same train.run_dir")

  # --- from here on the run directory is written (by process 0; the others
  # wait, so that every process has decided on resuming before it changes) ---
  barrier("run directory checked")
  if is_main:
    if replace:
      say(f"train.overwrite: moved the previous run to {_move_aside(paths.root)}")
    paths.root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, paths.config)
    if tokenizer is None:
      data.tokenizer.save(paths.tokenizer)
  barrier("run directory written")
  say(f"mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.default_backend()} "
      f"device(s), {jax.process_count()} process(es)"
      + (f"; this process reads part {shard_index + 1} of {shard_count} of "
         "each batch" if jax.process_count() > 1 else ""))

  with use_mesh(mesh), StopRequest(log) as stop:
    graphdef, state = create_state(cfg)
    say(f"model: {param_count(state):,} parameters; data: {data.stats}")

    # This process reads only its part of every global batch.
    if tasks is None:
      dataset = train_dataset(data.train_rows, cfg.data.batch_size,
                              seed=cfg.train.seed, process_index=shard_index,
                              process_count=shard_count)
    else:
      dataset = task_data.train_dataset(cfg.data, tasks, data.train_rows,
                                        cfg.train.seed, shard_index,
                                        shard_count)
    data_iter = iter(dataset)
    checkpointer = Checkpointer(paths.checkpoints, cfg.train.max_to_keep)
    step = 0
    if resume_step is not None:
      found = checkpointer.restore_latest(abstract_like(state), data_iter, log=say)
      if found is None:
        say("no readable checkpoint left; starting from step 0")
      else:
        step, state, _ = found
        say(f"resumed from {paths.checkpoints / str(step)}")

    schedule = lr_schedule(cfg.optimizer, cfg.train.steps)
    eval_step = make_eval_step(graphdef)
    faults = fault_steps(cfg.train)

    def next_batch(at_step: int) -> dict:
      batch = shard_batch(next(data_iter), sharding, cfg.data.batch_size)
      if faults:  # the test hook: a NaN objective at the chosen steps
        batch["nan_fault"] = jnp.float32(math.nan if at_step in faults else 0.0)
      return batch

    def validate(at_step: int) -> dict[str, float]:
      """val/loss (the text's, or with tasks alone the tasks'), and with
      tasks val/task_loss: the held-out task rows' weighted loss."""
      scalars = {}
      if trains_text:
        val, _ = evaluate(eval_step, state, data.val_rows, cfg.data.batch_size,
                          sharding, cfg.train.eval_batches)
        scalars.update({"val/loss": val, "val/perplexity": math.exp(val)})
      if tasks is not None:
        scalars["val/task_loss"] = _task_loss(eval_step, state, tasks.val_rows,
                                              cfg.data.batch_size, sharding)
        scalars.setdefault("val/loss", scalars["val/task_loss"])
      writer.write(at_step, scalars)
      return scalars

    def describe(scalars: dict[str, float]) -> str:
      text = (f"validation loss {scalars['val/loss']:.4f}" if trains_text
              else "")
      if tasks is not None:
        text += ("; " if text else "") + (
            f"held-out task loss {scalars['val/task_loss']:.4f} "
            f"({task_tokens})")
      return text

    t0 = time.perf_counter()
    first = next_batch(step + 1)
    train_step = make_train_step(graphdef, cfg.train.log_every).lower(state, first).compile()
    say(f"compiled the train step in {time.perf_counter() - t0:.1f}s")

    writer = ScalarWriter(paths.tensorboard, paths.root / METRICS_FILE,
                          enabled=is_main)
    health = HealthMonitor(cfg.train.max_skipped_steps, cfg.train.spike_factor)
    show_bar = cfg.train.progress_bar and is_main
    progress = Progress(cfg.train.steps, step, show_bar)
    say = progress.write if show_bar else log
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    losses: dict[int, float] = {}
    pending: list[tuple[int, dict]] = []
    rates: list[float] = []
    t_interval, steps_in_interval = time.perf_counter(), 0
    batch = first
    end = cfg.train.steps if stop_at_step is None else min(stop_at_step, cfg.train.steps)
    saved_at = step

    def flush() -> None:
      """Writes the pending steps' metrics; judges their health."""
      nonlocal pending, t_interval, steps_in_interval
      if not pending:
        return
      fetched = jax.device_get(pending)
      pending = []
      elapsed = time.perf_counter() - t_interval
      rate = tokens_per_step * steps_in_interval / max(elapsed, 1e-9)
      rates.append(rate)
      for s, m in fetched:
        losses[s] = float(m["loss"])
        scalars, vectors = split_step_metrics(m)
        writer.write(s, {**scalars, "train/lr": float(schedule(s - 1))})
        for tag, values in vectors.items():
          writer.histogram(s, tag, values)
        message, spike = health.observe(s, losses[s], bool(m["skipped"]))
        if spike:
          writer.write(s, {"train/loss_spike": spike})
        if message:
          say(message)
      last = fetched[-1][0]
      writer.write(last, {"train/tokens_per_sec": rate})
      progress.update(steps_in_interval, loss=losses[last], tok_s=f"{rate:,.0f}")
      t_interval, steps_in_interval = time.perf_counter(), 0

    def save(at_step: int) -> None:
      nonlocal saved_at
      checkpointer.save(at_step, state, data_iter,
                        {"config": to_dict(cfg), "step": at_step,
                         "loss": losses.get(at_step)})
      saved_at = at_step

    try:
      while step < end and not stop.requested:
        if batch is None:
          batch = next_batch(step + 1)
        state, metrics = train_step(state, batch)
        batch = None
        step += 1
        steps_in_interval += 1
        pending.append((step, metrics))
        if step % cfg.train.log_every == 0 or step == end or stop.requested:
          flush()
        if stop.requested:
          break
        if step % cfg.train.eval_every == 0 and step < cfg.train.steps:
          say(f"step {step}: {describe(validate(step))}")
          t_interval = time.perf_counter()
        if step % cfg.train.checkpoint_every == 0 or step == end:
          save(step)
      if stop.requested and saved_at != step:
        flush()
        save(step)
    except BaseException:
      writer.close()
      raise
    finally:
      progress.close()
      say = log
      checkpointer.wait()
      checkpointer.close()

    val_task = None
    if stop.requested:
      val = math.nan
      say(f"stopped by {stop.signal_name} after step {step}; checkpoint saved in "
          f"{paths.checkpoints / str(step)}; run the same command to resume")
    else:
      scalars = validate(step)
      val, val_task = scalars["val/loss"], scalars.get("val/task_loss")
    writer.close()

  result = TrainResult(
      run_dir=paths.root, final_step=step, losses=losses, val_loss=val,
      val_unigram_entropy=data.val_unigram_entropy,
      tokens_per_sec=float(np.median(rates[1:] or rates)) if rates else 0.0,
      wall_time_sec=time.perf_counter() - t_start,
      stopped_by=stop.signal_name, skipped_steps=health.total_skipped,
      val_task_loss=val_task)
  if stop.requested:
    return result
  if is_main:
    summary = {"step": step, "val_loss": val, "val_perplexity": math.exp(val),
               "val_unigram_entropy": result.val_unigram_entropy,
               "tokens_per_sec": result.tokens_per_sec,
               "skipped_steps": result.skipped_steps,
               "wall_time_sec": result.wall_time_sec, "data": data.stats}
    if tasks is not None:
      summary.update(tasks=cfg.data.tasks, task_loss=cfg.data.task_loss,
                     val_task_loss=val_task,
                     val_task_rows=len(tasks.val_rows.inputs))
    (paths.root / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    plot_losses(paths.root / METRICS_FILE, paths.root / PLOT_FILE,
                reference=result.val_unigram_entropy if trains_text else None)
  if trains_text:
    say(f"step {step}: validation loss {val:.4f} nats/token (perplexity "
        f"{math.exp(val):.1f}); unigram entropy of the validation text "
        f"{result.val_unigram_entropy:.4f} nats/token")
  if tasks is not None:
    uniform = (f" (a uniform guess over the {len(tasks.space.values)} answer "
               f"ids: {math.log(len(tasks.space.values)):.4f})"
               if cfg.data.task_loss == "answers" else "")
    say(f"step {step}: held-out task loss {val_task:.4f} nats/token over the "
        f"{task_tokens} of {len(tasks.val_rows.inputs)} rows"
        f"{uniform}; accuracy: python eval.py tasks --run_dir {paths.root}")
  say(f"checkpoints: {paths.checkpoints}")
  say(f"tensorboard: tensorboard --logdir {paths.tensorboard}")
  say(f"loss curve: {paths.root / PLOT_FILE}")
  return result
