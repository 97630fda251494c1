"""Scalars to TensorBoard (without TensorFlow) and to metrics.jsonl, the
loss-curve plot, and the progress bar.

A run resumed from a checkpoint replays the steps since it, so before it
logs anything both logs are cut back to the steps up to the checkpoint
(:func:`truncate_logs`): every step then appears once, with the values of
the run that went on. A last line cut short by a crash mid-write is skipped
when reading and dropped by that cut.
"""

from __future__ import annotations

import json
import os
import pathlib
import time

import numpy as np
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.summary.writer.record_writer import RecordWriter
from tqdm import tqdm


class ScalarWriter:
  """Writes scalars to a TensorBoard event file and appends them, one JSON
  object per call, to a JSON-lines file (what the plots are drawn from)."""

  def __init__(self, logdir: str | pathlib.Path, jsonl: str | pathlib.Path,
               enabled: bool = True):
    self._writer = EventFileWriter(str(logdir)) if enabled else None
    self._jsonl = open(jsonl, "a") if enabled else None
    if self._jsonl is not None and not _ends_a_line(pathlib.Path(jsonl)):
      self._jsonl.write("\n")  # never glue a record onto a partial line

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if self._writer is None:
      return
    values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
              for k, v in scalars.items()]
    self._writer.add_event(event_pb2.Event(
        step=step, wall_time=time.time(), summary=summary_pb2.Summary(value=values)))
    self._jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}) + "\n")
    self._jsonl.flush()  # readable while the run goes on (tail -f, tests)

  def histogram(self, step: int, tag: str, values) -> None:
    """A TensorBoard histogram of `values` (e.g. the load of every expert)."""
    if self._writer is None:
      return
    v = np.asarray(values, np.float64).ravel()
    counts, edges = np.histogram(v, bins=min(30, max(1, v.size)))
    proto = summary_pb2.HistogramProto(
        min=float(v.min()), max=float(v.max()), num=float(v.size),
        sum=float(v.sum()), sum_squares=float((v * v).sum()),
        bucket_limit=edges[1:].tolist(), bucket=counts.astype(float).tolist())
    self._writer.add_event(event_pb2.Event(
        step=step, wall_time=time.time(),
        summary=summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, histo=proto)])))

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._jsonl.close()


def split_step_metrics(metrics: dict) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Train-step metrics as TensorBoard tags: scalars as they are, vectors
  (per-expert load) as histograms plus their max/mean and min/mean, which
  are 1 when the vector is uniform."""
  scalars, vectors = {}, {}
  for key, value in metrics.items():
    v = np.asarray(value)
    tag = f"train/{key}"
    if v.ndim == 0:
      scalars[tag] = float(v)
    else:
      vectors[tag] = v
      mean = float(v.mean())
      if mean:
        scalars[f"{tag}/max_over_mean"] = float(v.max()) / mean
        scalars[f"{tag}/min_over_mean"] = float(v.min()) / mean
  return scalars, vectors


def _ends_a_line(path: pathlib.Path) -> bool:
  """Whether `path` is empty or absent or its last byte is a newline."""
  try:
    with open(path, "rb") as f:
      if f.seek(0, os.SEEK_END) == 0:
        return True
      f.seek(-1, os.SEEK_END)
      return f.read(1) == b"\n"
  except FileNotFoundError:
    return True


def read_records(jsonl: str | pathlib.Path) -> tuple[list[dict], int]:
  """(the records of metrics.jsonl in order, the number of lines that are
  not a JSON object: a last line cut short by a crash, or damage)."""
  records, bad = [], 0
  for line in pathlib.Path(jsonl).read_text(errors="replace").splitlines():
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError:
      record = None
    if isinstance(record, dict) and isinstance(record.get("step"), int):
      records.append(record)
    else:
      bad += 1
  return records, bad


def read_scalars(jsonl: str | pathlib.Path, tag: str) -> tuple[list[int], list[float]]:
  """(steps, values) of one tag; a step logged twice (a run resumed from an
  earlier checkpoint) keeps its last value; a partial line is skipped."""
  by_step: dict[int, float] = {}
  for record in read_records(jsonl)[0]:
    if tag in record:
      by_step[record["step"]] = record[tag]
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def plot_losses(jsonl: str | pathlib.Path, png: str | pathlib.Path,
                reference: float | None = None) -> None:
  """Training and validation loss against step, written as a PNG."""
  fig = Figure(figsize=(7, 4.5), dpi=100)
  ax = fig.subplots()
  steps, loss = read_scalars(jsonl, "train/loss")
  ax.plot(steps, loss, lw=1, label="train loss")
  steps, val = read_scalars(jsonl, "val/loss")
  ax.plot(steps, val, "o-", label="validation loss")
  if reference is not None:
    ax.axhline(reference, color="gray", ls="--",
               label=f"unigram entropy of validation text ({reference:.2f})")
  ax.set_xlabel("step")
  ax.set_ylabel("nats / token")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(png)


def truncate_metrics(jsonl: pathlib.Path, step: int) -> tuple[int, int]:
  """Keeps the records of metrics.jsonl with step <= `step` (atomically: a
  new file renamed over it); (records dropped, partial lines dropped)."""
  if not jsonl.exists():
    return 0, 0
  records, bad = read_records(jsonl)
  kept = [r for r in records if r["step"] <= step]
  dropped = len(records) - len(kept)
  if dropped or bad or not _ends_a_line(jsonl):
    tmp = jsonl.with_name(jsonl.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, jsonl)
  return dropped, bad


def truncate_events(logdir: pathlib.Path, step: int) -> int:
  """Keeps the TensorBoard events with step <= `step` in every event file
  of `logdir` (each rewritten to a new file renamed over it; a record cut
  short by a crash ends the file); the number of events dropped. Rewriting
  rather than a ``SessionLog.START`` marker: every reader honours it, not
  only those that purge orphaned data."""
  dropped = 0
  for path in sorted(logdir.glob("events.out.tfevents.*")) if logdir.is_dir() else []:
    raw = list(RawEventFileLoader(str(path)).Load())
    kept = [r for r in raw if event_pb2.Event.FromString(r).step <= step]
    if len(kept) == len(raw) and path.stat().st_size == _records_size(raw):
      continue
    dropped += len(raw) - len(kept)
    tmp = path.with_name(".tmp-" + path.name)
    with open(tmp, "wb") as f:
      writer = RecordWriter(f)
      for r in kept:
        writer.write(r)
    os.replace(tmp, path)
  return dropped


def _records_size(raw: list[bytes]) -> int:
  """Bytes of TFRecord framing plus data for `raw` (12 + n + 4 each)."""
  return sum(16 + len(r) for r in raw)


def truncate_logs(jsonl: pathlib.Path, logdir: pathlib.Path, step: int,
                  log) -> None:
  """Before a run logs from step `step` + 1: metrics.jsonl and the
  TensorBoard events keep only steps up to `step`; says what was dropped."""
  records, partial = truncate_metrics(jsonl, step)
  events = truncate_events(logdir, step)
  if records or partial or events:
    log(f"metrics: dropped the records after step {step} ({records} in "
        f"{jsonl.name}, {events} TensorBoard event(s)), which this run logs "
        "again" + (f", and {partial} partial line(s) of {jsonl.name}"
                   if partial else ""))


class Progress:
  """A tqdm bar over training steps showing loss and tokens/s."""

  def __init__(self, total: int, initial: int, enabled: bool):
    self._bar = tqdm(total=total, initial=initial, disable=not enabled,
                     unit="step", dynamic_ncols=True, mininterval=1.0)

  def update(self, n: int, **postfix) -> None:
    self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                           for k, v in postfix.items()}, refresh=False)
    self._bar.update(n)

  def write(self, text: str) -> None:
    self._bar.write(text)

  def close(self) -> None:
    self._bar.close()
