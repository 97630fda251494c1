"""Divergence and loss spikes, judged from the per-step metrics.

The train step skips any update whose objective or gradient norm is not
finite (``metrics['skipped']``); :class:`HealthMonitor` counts such steps
in a row and says when ``train.max_skipped_steps`` is reached, and flags
losses above ``train.spike_factor`` times the mean of the last 100.
"""

from __future__ import annotations

import collections
import math


class Diverged(RuntimeError):
  """Too many consecutive non-finite steps; the message names the steps."""


class HealthMonitor:

  def __init__(self, max_skipped: int, spike_factor: float, window: int = 100):
    self.max_skipped = max_skipped
    self.spike_factor = spike_factor
    self.in_a_row = 0
    self.total_skipped = 0
    self.recent: collections.deque[float] = collections.deque(maxlen=window)

  def observe(self, step: int, loss: float, skipped: bool) -> tuple[str | None, float]:
    """Records one step. Returns (message for a skip or a spike, or None;
    the spike's ratio to the recent mean, or 0); raises Diverged when the
    run must stop."""
    if skipped or not math.isfinite(loss):
      self.in_a_row += 1
      self.total_skipped += 1
      if self.in_a_row >= self.max_skipped:
        raise Diverged(
            f"training diverged: {self.in_a_row} consecutive steps up to step "
            f"{step} had a non-finite loss or gradient norm (train."
            f"max_skipped_steps={self.max_skipped}); their updates were "
            "skipped and the checkpoints are from before them")
      return (f"step {step}: non-finite loss or gradient norm, update skipped "
              f"({self.in_a_row} in a row)"), 0.0
    self.in_a_row = 0
    message, ratio = None, 0.0
    if self.spike_factor and len(self.recent) >= 10:
      mean = sum(self.recent) / len(self.recent)
      if mean > 0 and loss > self.spike_factor * mean:
        ratio = loss / mean
        message = (f"step {step}: loss spike {loss:.4f}, {ratio:.1f}x the "
                   f"mean of the last {len(self.recent)} steps")
    self.recent.append(loss)
    return message, ratio
