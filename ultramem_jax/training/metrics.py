"""Scalars to TensorBoard (without TensorFlow) and to metrics.jsonl, the
loss-curve plot, and the progress bar."""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np
from matplotlib.figure import Figure
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tqdm import tqdm


class ScalarWriter:
  """Writes scalars to a TensorBoard event file and appends them, one JSON
  object per call, to a JSON-lines file (what the plots are drawn from)."""

  def __init__(self, logdir: str | pathlib.Path, jsonl: str | pathlib.Path,
               enabled: bool = True):
    self._writer = EventFileWriter(str(logdir)) if enabled else None
    self._jsonl = open(jsonl, "a") if enabled else None

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


def read_scalars(jsonl: str | pathlib.Path, tag: str) -> tuple[list[int], list[float]]:
  """(steps, values) of one tag; a step logged twice (a run resumed from an
  earlier checkpoint) keeps its last value."""
  by_step: dict[int, float] = {}
  for line in pathlib.Path(jsonl).read_text().splitlines():
    record = json.loads(line)
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
