"""Training a config: ``train(cfg)`` prepares the run, a :class:`Trainer`
runs its steps, and the report writes and prints the result.

    with prepare(cfg, log) as run:       # checks, data, mesh, state, writers
      trainer = Trainer(run, log)
      trainer.fit(end)                   # steps, validation, checkpoints, stop
      val, val_task = trainer.finish()   # last validation (unless stopped)
      return report(run, trainer, val, val_task, ...)  # summary.json, loss.png

The run directory's lock (training/run_lock.py) is held from the checks to
the report. Checkpoints are written in the background while the loop goes
on; the next save and the end of the run wait for the one in flight.
SIGTERM / SIGINT stop the loop after the current step with a checkpoint,
after the save in flight is complete (training/signals.py); too many non-finite steps in a row raise
``health.Diverged`` with the checkpoints left as they were; a checkpoint
that does not fit on the disk raises ``checkpoint.CheckpointDiskFull`` with
the earlier checkpoints intact.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import sys
import time
from typing import Callable

import jax
import numpy as np

from ultramem_jax.config import to_dict
from ultramem_jax.model.flops import config_flops
from ultramem_jax.parallel.distributed import agreed_signal
from ultramem_jax.training.config import Config, fault_raise, fault_steps
from ultramem_jax.training.evaluate import evaluate, task_loss
from ultramem_jax.training.health import HealthMonitor
from ultramem_jax.training.metrics import Progress, plot_losses, split_step_metrics
from ultramem_jax.training.optimizer import lr_schedule
from ultramem_jax.training.prepare import Prepared, next_batch, prepare
from ultramem_jax.training.utilisation import Utilisation

Log = Callable[[str], None]
logger = logging.getLogger(__name__)


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
                                    # ("SIGTERM on process 1" of several)
  skipped_steps: int = 0            # updates skipped for non-finite values
  val_task_loss: float | None = None  # held-out task rows (data.tasks)
  tflops_per_device: float = 0.0    # model TFLOP/s, median like tokens/s
  mfu: float | None = None          # of the device's peak; None: unknown


class Trainer:
  """The steps of a prepared run: :meth:`fit` runs them, logging every
  ``train.log_every`` steps (:meth:`flush`), validating every
  ``train.eval_every`` (:meth:`validate`), saving every
  ``train.checkpoint_every`` and on a stop request (:meth:`save`)."""

  def __init__(self, run: Prepared, log: Log):
    cfg = self.cfg = run.cfg
    self.run = run
    self.state, self.step, self.saved_at = run.state, run.step, run.step
    self.schedule = lr_schedule(cfg.optimizer, cfg.train.steps)
    self.faults = fault_steps(cfg.train)
    self.health = HealthMonitor(cfg.train.max_skipped_steps, cfg.train.spike_factor)
    self.utilisation = Utilisation.for_run(config_flops(cfg).train,
                                           cfg.train.peak_tflops)
    if run.is_main:
      log(self.utilisation.describe())
    show_bar = cfg.train.progress_bar and run.is_main
    self.progress = Progress(cfg.train.steps, self.step, show_bar)
    self.log = log
    self.say = self.progress.write if show_bar else log
    self.tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    self.losses: dict[int, float] = {}
    self.pending: list[tuple[int, dict]] = []
    self.rates: list[float] = []
    self.t_interval, self.steps_in_interval = time.perf_counter(), 0
    self.batch: dict | None = run.first_batch
    self.agreed_stop: str | None = None
    self.raise_at = fault_raise(cfg.train)

  @property
  def stop_name(self) -> str | None:
    """The signal that stops the run, or None. Alone: as soon as it arrives.
    Over several processes: the one they agreed on at the last log step
    (:meth:`agree_stop`), so that every process saves the same step."""
    if jax.process_count() == 1:
      return self.run.stop.signal_name
    return self.agreed_stop

  @property
  def stopped(self) -> bool:
    return self.stop_name is not None

  def agree_stop(self, end: int) -> None:
    """Over several processes, at each log step and at `end`: every process
    learns whether any got a stop signal (one small all-gather, where the
    metrics are fetched anyway)."""
    if jax.process_count() > 1 and (self.step % self.cfg.train.log_every == 0
                                    or self.step == end):
      self.agreed_stop = agreed_signal(self.run.stop.signal_name)
      if self.agreed_stop:
        self.say(f"{self.agreed_stop}: every process stops after step "
                 f"{self.step} with a checkpoint")

  # --------------------------------------------------------------- the loop

  def fit(self, end: int) -> None:
    """Steps up to `end` (or until a stop request, saving a checkpoint of
    the step reached); closes the checkpointer and the progress bar."""
    train = self.cfg.train
    try:
      while self.step < end and not self.stopped:
        self.train_step()
        self.agree_stop(end)
        self.run.checkpointer.check_for_errors()  # a failed async save: now
        if self.step % train.log_every == 0 or self.step == end or self.stopped:
          self.flush()
        if self.stopped:
          break
        if self.step % train.eval_every == 0 and self.step < train.steps:
          self.say(f"step {self.step}: {self.describe(self.validate(self.step))}")
          self.t_interval = time.perf_counter()
        if self.step % train.checkpoint_every == 0 or self.step == end:
          self.save(self.step)
      if self.stopped and self.saved_at != self.step:
        self.flush()
        self.save(self.step)
      self.run.checkpointer.wait()  # the last save's result, writers still open
    except BaseException:
      self.run.writer.close()
      raise
    finally:
      self.progress.close()
      self.say = self.log
      self.run.checkpointer.close()  # waits; raises a failed last save

  def train_step(self) -> None:
    """One update; its metrics stay on the device until :meth:`flush`."""
    if self.raise_at == (jax.process_index(), self.step + 1):
      raise RuntimeError(f"train.fault_raise: process {self.raise_at[0]} "
                         f"raises at step {self.raise_at[1]} (a test fault)")
    if self.batch is None:
      self.batch = next_batch(self.run.data_iter, self.run.sharding,
                              self.cfg.data.batch_size, self.faults, self.step + 1)
    self.state, metrics = self.run.train_step(self.state, self.batch)
    self.batch = None
    self.step += 1
    self.steps_in_interval += 1
    self.pending.append((self.step, metrics))

  def flush(self) -> None:
    """Writes the pending steps' metrics; judges their health."""
    if not self.pending:
      return
    fetched = jax.device_get(self.pending)
    self.pending = []
    logger.debug("steps %d-%d: metrics fetched (computed)", fetched[0][0],
                 fetched[-1][0])
    elapsed = time.perf_counter() - self.t_interval
    rate = self.tokens_per_step * self.steps_in_interval / max(elapsed, 1e-9)
    self.rates.append(rate)
    writer = self.run.writer
    for s, m in fetched:
      self.losses[s] = float(m["loss"])
      scalars, vectors = split_step_metrics(m)
      writer.write(s, {**scalars, "train/lr": float(self.schedule(s - 1))})
      for tag, values in vectors.items():
        writer.histogram(s, tag, values)
      message, spike = self.health.observe(s, self.losses[s], bool(m["skipped"]))
      if spike:
        writer.write(s, {"train/loss_spike": spike})
      if message:
        self.say(message)
    last = fetched[-1][0]
    use = self.utilisation
    tflops, mfu = use.tflops_per_device(rate), use.mfu(rate)
    writer.write(last, {"train/tokens_per_sec": rate,
                        "train/tflops_per_device": tflops,
                        **({} if mfu is None else {"train/mfu": mfu})})
    self.progress.update(self.steps_in_interval, loss=self.losses[last],
                         tok_s=f"{rate:,.0f}", tflops=f"{tflops:.3g}",
                         mfu="n/a" if mfu is None else f"{100 * mfu:.1f}%")
    self.t_interval, self.steps_in_interval = time.perf_counter(), 0

  # --------------------------------------------------------- validation

  def validate(self, at_step: int) -> dict[str, float]:
    """val/loss (the text's, or with tasks alone the tasks'), and with
    tasks val/task_loss: the held-out task rows' weighted loss."""
    run, batch_size = self.run, self.cfg.data.batch_size
    scalars = {}
    if run.trains_text:
      val, _ = evaluate(run.eval_step, self.state, run.data.val_rows, batch_size,
                        run.sharding, self.cfg.train.eval_batches)
      scalars.update({"val/loss": val, "val/perplexity": math.exp(val)})
    if run.tasks is not None:
      scalars["val/task_loss"] = task_loss(run.eval_step, self.state,
                                           run.tasks.val_rows, batch_size,
                                           run.sharding)
      scalars.setdefault("val/loss", scalars["val/task_loss"])
    run.writer.write(at_step, scalars)
    return scalars

  def describe(self, scalars: dict[str, float]) -> str:
    text = (f"validation loss {scalars['val/loss']:.4f}" if self.run.trains_text
            else "")
    if self.run.tasks is not None:
      text += ("; " if text else "") + (
          f"held-out task loss {scalars['val/task_loss']:.4f} "
          f"({self.run.task_tokens})")
    return text

  # -------------------------------------------------- checkpoints, stop

  def save(self, at_step: int) -> None:
    """Starts the asynchronous save of `at_step` (training/checkpoint.py):
    the loop goes on while it is written; logs how long it was blocked."""
    checkpointer = self.run.checkpointer
    checkpointer.save(at_step, self.state, self.run.data_iter,
                      {"config": to_dict(self.cfg), "step": at_step,
                       "loss": self.losses.get(at_step)})
    self.saved_at = at_step
    self.run.writer.write(at_step, {
        "checkpoint/blocking_sec": checkpointer.last_blocking_sec})

  def finish(self) -> tuple[float, float | None]:
    """(validation loss, held-out task loss or None) at the last step, or
    (nan, None) after a stop request, which it reports; closes the writers."""
    val, val_task = math.nan, None
    if self.stopped:
      self.say(self._stopped_message())
    else:
      scalars = self.validate(self.step)
      val, val_task = scalars["val/loss"], scalars.get("val/task_loss")
    self.run.writer.close()
    return val, val_task


  def _stopped_message(self) -> str:
    """What a stop request left: a checkpoint of the step reached, or, when
    it came before the first step (during the compile), nothing new."""
    name, run_dir = self.stop_name, self.run.run_dir
    if self.step > self.run.step:
      return (f"stopped by {name} after step {self.step}; checkpoint saved in "
              f"{run_dir.checkpoint(self.step)}; run the same command to resume")
    if self.step == 0:
      return (f"stopped by {name} before the first step; nothing was trained "
              "and no checkpoint written; run the same command to start again")
    return (f"stopped by {name} before the first step after the resume; "
            f"checkpoint {run_dir.checkpoint(self.step)} is unchanged; run the "
            "same command to resume")


# ----------------------------------------------------------------------------- report

def _summary(run: Prepared, result: TrainResult) -> dict:
  summary = {"step": result.final_step, "val_loss": result.val_loss,
             "val_perplexity": math.exp(result.val_loss),
             "val_unigram_entropy": result.val_unigram_entropy,
             "tokens_per_sec": result.tokens_per_sec,
             "tflops_per_device": result.tflops_per_device,
             "mfu": result.mfu,
             "skipped_steps": result.skipped_steps,
             "wall_time_sec": result.wall_time_sec, "data": run.data.stats}
  if run.tasks is not None:
    summary.update(tasks=run.cfg.data.tasks, task_loss=run.cfg.data.task_loss,
                   val_task_loss=result.val_task_loss,
                   val_task_rows=len(run.tasks.val_rows.inputs))
  return summary


def _final_messages(run: Prepared, result: TrainResult) -> list[str]:
  step, val, paths = result.final_step, result.val_loss, run.run_dir
  lines = []
  if run.trains_text:
    lines.append(f"step {step}: validation loss {val:.4f} nats/token (perplexity "
                 f"{math.exp(val):.1f}); unigram entropy of the validation text "
                 f"{result.val_unigram_entropy:.4f} nats/token")
  if run.tasks is not None:
    tasks = run.tasks
    uniform = (f" (a uniform guess over the {len(tasks.space.values)} answer "
               f"ids: {math.log(len(tasks.space.values)):.4f})"
               if run.cfg.data.task_loss == "answers" else "")
    lines.append(f"step {step}: held-out task loss {result.val_task_loss:.4f} "
                 f"nats/token over the {run.task_tokens} of "
                 f"{len(tasks.val_rows.inputs)} rows{uniform}; accuracy: "
                 f"python eval.py tasks --run_dir {paths.root}")
  return lines + [f"checkpoints: {paths.checkpoints}",
                  f"tensorboard: tensorboard --logdir {paths.tensorboard}",
                  f"loss curve: {paths.plot}"]


def report(run: Prepared, trainer: Trainer, val: float, val_task: float | None,
           t_start: float, log: Log) -> TrainResult:
  """The run's result; unless it was stopped, summary.json and loss.png
  (process 0) and the final numbers, printed."""
  rates = trainer.rates
  rate = float(np.median(rates[1:] or rates)) if rates else 0.0
  result = TrainResult(
      run_dir=run.run_dir.root, final_step=trainer.step, losses=trainer.losses,
      val_loss=val, val_unigram_entropy=run.data.val_unigram_entropy,
      tokens_per_sec=rate,
      tflops_per_device=trainer.utilisation.tflops_per_device(rate),
      mfu=trainer.utilisation.mfu(rate),
      wall_time_sec=time.perf_counter() - t_start,
      stopped_by=trainer.stop_name, skipped_steps=trainer.health.total_skipped,
      val_task_loss=val_task)
  if trainer.stopped:
    return result
  if run.is_main:
    run.run_dir.write_summary(_summary(run, result))
    plot_losses(run.run_dir.metrics, run.run_dir.plot,
                reference=result.val_unigram_entropy if run.trains_text else None)
  for line in _final_messages(run, result):
    log(line)
  return result


def train(cfg: Config, *, stop_at_step: int | None = None,
          log: Log | None = None) -> TrainResult:
  """Trains `cfg` to `cfg.train.steps` (or stops after `stop_at_step`,
  saving a checkpoint there), resuming from `cfg.train.run_dir` if asked.

  SIGTERM / SIGINT stop it after the current step with a checkpoint (see
  training/signals.py); too many non-finite steps in a row raise
  ``health.Diverged`` with the checkpoints left as they were."""
  t_start = time.perf_counter()
  log = log or (lambda s: print(s, file=sys.stdout, flush=True))
  with prepare(cfg, log) as run:
    steps = run.cfg.train.steps
    end = steps if stop_at_step is None else min(stop_at_step, steps)
    trainer = Trainer(run, log)
    trainer.fit(end)
    val, val_task = trainer.finish()
    # In the run directory's lock: summary.json and loss.png are written too.
    return report(run, trainer, val, val_task, t_start, log)
