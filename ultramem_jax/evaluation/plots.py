"""PNG plots for the eval.py subcommands (matplotlib's Figure, which
renders with Agg without pyplot, so no global backend is chosen)."""

from __future__ import annotations

import math
import pathlib
from typing import Mapping, Sequence

from matplotlib.figure import Figure


def line_plot(path: str | pathlib.Path,
              series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
              *, xlabel: str, ylabel: str, title: str = "",
              xscale: str = "linear",
              vlines: Mapping[str, float] | None = None,
              hlines: Mapping[str, float] | None = None) -> pathlib.Path:
  """Writes one line with markers per entry of `series` (label -> (xs, ys))
  to the PNG `path`. Points whose y is not finite are left out (a gap).

  Args:
    xscale: "linear", "log", or "symlog" (linear within [-1, 1], so that an
      x of 0 can be shown on an otherwise logarithmic axis).
    vlines, hlines: dashed reference lines, label -> x (or y) position.

  Returns:
    `path` as a Path.
  """
  path = pathlib.Path(path)
  fig = Figure(figsize=(7, 4.5), dpi=100)
  ax = fig.subplots()
  for label, (xs, ys) in series.items():
    ys = [y if y is not None and math.isfinite(y) else math.nan for y in ys]
    ax.plot(list(xs), ys, "o-", ms=3, lw=1.2, label=label)
  for i, (label, x) in enumerate((vlines or {}).items()):
    ax.axvline(x, color="gray", ls="--", lw=1, alpha=0.5 + 0.5 / (i + 1), label=label)
  for i, (label, y) in enumerate((hlines or {}).items()):
    ax.axhline(y, color="gray", ls=":", lw=1, alpha=0.5 + 0.5 / (i + 1), label=label)
  if xscale == "symlog":
    ax.set_xscale("symlog", linthresh=1.0)
  else:
    ax.set_xscale(xscale)
  xs_all = [x for xs, _ in series.values() for x in xs]
  if xs_all and xscale in ("log", "symlog"):
    # Reference lines would otherwise stretch a logarithmic axis.
    lo, hi = min(xs_all), max(xs_all)
    ax.set_xlim(lo * 0.8 if lo > 0 else lo - 0.2, hi * 1.25 if hi > 0 else hi + 0.2)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path)
  return path
