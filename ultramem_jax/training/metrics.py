"""TensorBoard scalars (without TensorFlow) and the progress bar."""

from __future__ import annotations

import pathlib
import time

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tqdm import tqdm


class ScalarWriter:
  """Writes scalar summaries to a TensorBoard event file."""

  def __init__(self, logdir: str | pathlib.Path, enabled: bool = True):
    self.logdir = pathlib.Path(logdir)
    self._writer = EventFileWriter(str(self.logdir)) if enabled else None

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if self._writer is None:
      return
    values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
              for k, v in scalars.items()]
    self._writer.add_event(event_pb2.Event(
        step=step, wall_time=time.time(), summary=summary_pb2.Summary(value=values)))

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


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
