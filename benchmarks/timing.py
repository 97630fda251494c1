"""Interleaved timing: contenders run in turn (A B A B ...) in one process,
so a machine that slows down or speeds up during the run affects all of
them alike; each is reported as the median of its timed calls and the
spread (max - min) / median."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import jax
from tqdm import tqdm


@dataclasses.dataclass(frozen=True)
class Timing:
  """Seconds of the timed calls of one contender, and its first call's
  (which compiles)."""
  times: tuple[float, ...]
  first_s: float

  @property
  def median(self) -> float:
    return statistics.median(self.times)

  @property
  def spread(self) -> float:
    """(max - min) / median of the timed calls."""
    return (max(self.times) - min(self.times)) / self.median

  @property
  def n(self) -> int:
    return len(self.times)


def timed(fn: Callable[[], Any]) -> float:
  """Seconds of one call of `fn`, waiting for every array it returns."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def interleave(fns: dict[str, Callable[[], Any]], *, rounds: int,
               min_rounds: int = 1, budget_s: float | None = None,
               warmup: int = 1, desc: str | None = None,
               progress: bool = True) -> dict[str, Timing]:
  """Times each of `fns` (no arguments; state is theirs to keep) in turn:
  `warmup` untimed rounds (the first call of each compiles and is kept as
  ``first_s``), then up to `rounds` timed rounds, stopping after
  `min_rounds` once `budget_s` seconds of timed calls have passed."""
  first = {name: timed(fn) for name, fn in fns.items()}
  for _ in range(warmup - 1):
    for fn in fns.values():
      timed(fn)
  times: dict[str, list[float]] = {name: [] for name in fns}
  spent = 0.0
  bar = tqdm(range(rounds), desc=desc, leave=False, disable=not progress)
  for i in bar:
    for name, fn in fns.items():
      t = timed(fn)
      times[name].append(t)
      spent += t
    if budget_s is not None and i + 1 >= min_rounds and spent >= budget_s:
      break
  bar.close()
  return {name: Timing(tuple(times[name]), first[name]) for name in fns}


def ms(seconds: float) -> str:
  """Milliseconds with 3-4 significant figures."""
  value = seconds * 1e3
  return f"{value:,.0f}" if value >= 1000 else f"{value:.4g}"


def pct(fraction: float) -> str:
  return f"{100 * fraction:.0f}%"
