"""The PNGs of RESULTS.md (matplotlib's Figure with Agg, no pyplot): loss
curves with a band of one seed std, task accuracy by length, loss against
m, and decode bytes against batch."""

from __future__ import annotations

import pathlib

import numpy as np
from matplotlib.figure import Figure

from ultramem_jax.reproduction.verdict import mean_std
from ultramem_jax.sweep.plots import plot_loss_vs_tokens, save


def loss_curves(path: pathlib.Path, curves: dict, title: str) -> pathlib.Path:
  """{variant: (tokens, mean, std)}: the sweep report's loss plot."""
  return plot_loss_vs_tokens(path, curves, title)


def task_accuracy(path: pathlib.Path, by_length: dict, title: str) -> pathlib.Path:
  """{task: {variant: {length: [acc per seed]}}}: one panel per task,
  accuracy against length, error bars of one std over seeds."""
  tasks = list(by_length) or ["(no results)"]
  fig = Figure(figsize=(3.2 * len(tasks), 3.6), dpi=100)
  axes = np.atleast_1d(fig.subplots(1, len(tasks), squeeze=False)[0])
  for ax, task in zip(axes, tasks):
    for variant, per in by_length.get(task, {}).items():
      lengths = sorted(per)
      stats = [mean_std(per[n]) for n in lengths]
      ax.errorbar(lengths, [s[0] for s in stats], yerr=[s[1] or 0.0 for s in stats],
                  fmt="o-", ms=4, capsize=3, label=variant)
    ax.set_title(task, fontsize=9)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("exact-match accuracy")
  if by_length:
    axes[0].legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  return save(fig, path)


def loss_vs_m(path: pathlib.Path, points: list[tuple[float, list[float], str]],
              title: str) -> pathlib.Path:
  """(m, per-seed losses, label) per point: mean ± 1 std against m."""
  fig = Figure(figsize=(6, 4.2), dpi=100)
  ax = fig.subplots()
  pts = sorted((m, mean_std(v), label) for m, v, label in points if v)
  if pts:
    ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts],
                yerr=[p[1][1] or 0.0 for p in pts], fmt="o-", ms=5, capsize=4)
    for m, (mean, _), label in pts:
      ax.annotate(label, (m, mean), textcoords="offset points", xytext=(6, 6),
                  fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks([p[0] for p in pts])
    ax.set_xticklabels([f"{p[0]:g}" for p in pts])
  ax.set_xlabel("m, values read per token and layer (smaller table as m grows)")
  ax.set_ylabel("eval.py validation loss (nats/token)")
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  return save(fig, path)


def decode_bytes(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
  """Parameter bytes per decode step against batch, MoE and UltraMemV2
  per size, log-log."""
  fig = Figure(figsize=(6.5, 4.2), dpi=100)
  ax = fig.subplots()
  for size in dict.fromkeys(r["size"] for r in rows):
    sub = [r for r in rows if r["size"] == size]
    b = [r["batch"] for r in sub]
    (line,) = ax.plot(b, [r["moe_param_bytes"] / 1e6 for r in sub], "s--",
                      label=f"MoE, {size}")
    ax.plot(b, [r["v2_param_bytes"] / 1e6 for r in sub], "o-",
            color=line.get_color(), label=f"UltraMemV2, {size}")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  batches = sorted({r["batch"] for r in rows})
  ax.set_xticks(batches)
  ax.set_xticklabels([str(b) for b in batches])
  ax.set_xlabel("decode batch (tokens per step)")
  ax.set_ylabel("parameter MB read per step (formula)")
  ax.set_title("Memory access of one decode step (inspect's formula)", fontsize=10)
  ax.grid(alpha=0.3, which="both")
  if rows:
    ax.legend(fontsize=7)
  return save(fig, path)
