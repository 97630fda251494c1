"""The report's PNG plots (matplotlib's Figure, rendered with Agg, no
pyplot): validation loss against training tokens per group with a band of
one standard deviation over seeds; final loss against activated parameters
and against training FLOPs, log-log, with the fitted power law per variant
that has 3 or more sizes; task accuracy per group. Only points whose
training finished are drawn."""

from __future__ import annotations

import pathlib

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter

from ultramem_jax.training.metrics import read_scalars
from ultramem_jax.training.run_dir import METRICS_FILE


def band(curves: list[dict[int, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
  """(steps, mean, sample std) of {step: value} curves at the steps all of
  them have; None without curves or without a common step."""
  if not curves:
    return None
  common = sorted(set.intersection(*(set(c) for c in curves)))
  if not common:
    return None
  v = np.array([[c[s] for s in common] for c in curves])
  std = v.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(len(common))
  return np.array(common), v.mean(axis=0), std


def grouped_bands(rows: list[dict], curves: dict[str, dict[int, float]],
                  group: str) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """{row[group]: (tokens, mean, std)} of the rows' curves ({name: {step:
  value}}, ``band``), tokens from each group's tokens per step."""
  per_group: dict[str, list[dict[int, float]]] = {}
  tokens_per_step: dict[str, float] = {}
  for r in rows:
    if r["name"] in curves and r.get("step"):
      per_group.setdefault(r[group], []).append(curves[r["name"]])
      tokens_per_step[r[group]] = r["tokens"] / r["step"]
  out = {}
  for g, series in per_group.items():
    b = band(series)
    if b is not None:
      out[g] = (b[0] * tokens_per_step[g], b[1], b[2])
  return out


def loss_curves(rows: list[dict], run_dirs: dict[str, pathlib.Path],
                finished: tuple[str, ...]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """{group: (tokens, mean validation loss, std)} over the finished seeds,
  at the steps every seed logged."""
  done = [r for r in rows if r["state"] in finished and r.get("step")]
  curves = {r["name"]: dict(zip(*read_scalars(run_dirs[r["name"]] / METRICS_FILE,
                                              "val/loss"))) for r in done}
  return grouped_bands(done, curves, "group")


def save(fig: Figure, path: pathlib.Path) -> pathlib.Path:
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path)
  return path


def plot_loss_vs_tokens(path: pathlib.Path, curves: dict,
                        title: str = "Validation loss") -> pathlib.Path:
  """{group: (tokens, mean, std)}: mean validation loss, ±1 std band."""
  fig = Figure(figsize=(7, 4.5), dpi=100)
  ax = fig.subplots()
  for group, (x, mean, std) in curves.items():
    (line,) = ax.plot(x, mean, "o-", ms=3, lw=1.2, label=group)
    ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
  ax.set_xlabel("training tokens")
  ax.set_ylabel("validation loss (nats/token)")
  ax.set_title(title + " (mean, band: ±1 std over seeds)", fontsize=10)
  ax.grid(alpha=0.3)
  if curves:
    ax.legend(fontsize=8)
  return save(fig, path)


def plot_scaling(path: pathlib.Path, stats: list[dict], xkey: str, xlabel: str,
                 fits: dict[str, tuple[float, float]]) -> pathlib.Path:
  """Mean final loss per group against `xkey`, log-log, error bars of one
  std, one colour per variant, its power law drawn where fitted."""
  fig = Figure(figsize=(7, 4.5), dpi=100)
  ax = fig.subplots()
  by_variant: dict[str, list[tuple[float, float, float]]] = {}
  for g in stats:
    if g["val_loss"] is None or not g.get(xkey):
      continue
    mean, std, _ = g["val_loss"]
    by_variant.setdefault(g["variant"], []).append((g[xkey], mean, std or 0.0))
  for variant, pts in by_variant.items():
    pts.sort()
    x, y, e = (np.array(c, np.float64) for c in zip(*pts))
    bars = ax.errorbar(x, y, yerr=e, fmt="o", ms=4, capsize=3, label=variant)
    if variant in fits:
      a, b = fits[variant]
      xs = np.geomspace(x.min(), x.max(), 50)
      ax.plot(xs, a * xs ** b, "-", lw=1, color=bars.lines[0].get_color(),
              label=f"{variant}: {a:.3g} x^{b:.3f}")
  ax.set_xscale("log")
  ax.set_yscale("log")
  # Losses span less than a decade: plain numbers, not powers of ten.
  ax.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
  ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2f"))
  ax.set_xlabel(xlabel)
  ax.set_ylabel("final validation loss (nats/token)")
  ax.grid(alpha=0.3, which="both")
  if by_variant:
    ax.legend(fontsize=8)
  return save(fig, path)


def plot_task_accuracy(path: pathlib.Path, stats: list[dict],
                       metrics: list[str]) -> pathlib.Path:
  """Grouped bars: per task, the mean accuracy of each group (error bars:
  one std over seeds)."""
  fig = Figure(figsize=(max(6, 1.5 * len(metrics) + 3), 4.5), dpi=100)
  ax = fig.subplots()
  width = 0.8 / max(1, len(stats))
  for i, g in enumerate(stats):
    means = [g[m][0] if g[m] else np.nan for m in metrics]
    errs = [(g[m][1] or 0.0) if g[m] else 0.0 for m in metrics]
    ax.bar(np.arange(len(metrics)) + i * width, means, width, yerr=errs,
           capsize=2, label=g["group"])
  ax.set_xticks(np.arange(len(metrics)) + 0.4 - width / 2)
  ax.set_xticklabels([m[len("acc_"):] for m in metrics])
  ax.set_ylabel("exact-match accuracy")
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3, axis="y")
  ax.legend(fontsize=8)
  return save(fig, path)
