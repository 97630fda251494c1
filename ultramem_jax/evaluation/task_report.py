"""The report of ``eval.py tasks``: ``tasks_step<N>.json``, a markdown table
per task (accuracy by length, then by each of its buckets and length) and
PNG plots of accuracy by length per task and by the buckets of
:data:`PLOTS` (one line per length)."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

from ultramem_jax.evaluation.plots import line_plot
from ultramem_jax.evaluation.task_scores import LENGTH

# The bucket of each task that gets a plot besides length, and its axis label.
PLOTS: dict[str, tuple[str, str]] = {
    "niah": ("depth", "needle depth (0 = start of the haystack)"),
    "mqar": ("num_pairs", "key-value pairs in the context"),
    "token_mapping": ("n_demos", "demonstrations in the context"),
    "mqar_overwrite": ("round", "round"),
}


def _fmt(x: Any) -> str:
  if isinstance(x, float):
    return f"{x:g}"
  return str(x)


def markdown(result: dict) -> str:
  """The report as markdown: per task, accuracy by length, then by each of
  its buckets (rows) and length (columns)."""
  lines = [f"Checkpoint `{result['checkpoint']}` (trained on "
           f"`{result['trained_tasks'] or 'text'}`, seq_len "
           f"{result['trained_seq_len']}); {result['n']} held-out instances "
           f"per task and length (seed {result['seed']}); exact match of "
           "every answer, greedy predictions with teacher forcing; chance = a "
           "uniform guess over the answer alphabet.", ""]
  for name, t in result["tasks"].items():
    lines += [f"### {name}", "",
              "| length | answers | accuracy | chance |", "|---|---|---|---|"]
    for r in t["by"][LENGTH]:
      beyond = " (beyond training)" if r[LENGTH] > result["trained_seq_len"] else ""
      lines.append(f"| {r[LENGTH]}{beyond} | {r['n']} | {r['accuracy']:.3f} | "
                   f"{r['chance']:.4f} |")
    lengths = [r[LENGTH] for r in t["by"][LENGTH]]
    for key, records in t["by"].items():
      if key == LENGTH:
        continue
      bucket = key.split(",")[0]
      cells: dict[Any, dict[int, dict]] = {}
      for r in records:
        cells.setdefault(r[bucket], {})[r[LENGTH]] = r
      lines += ["", f"Accuracy by {bucket} (answers in parentheses):", "",
                f"| {bucket} | " + " | ".join(str(x) for x in lengths) + " |",
                "|---|" + "---|" * len(lengths)]
      for value, row in cells.items():
        lines.append(f"| {_fmt(value)} | " + " | ".join(
            f"{row[x]['accuracy']:.3f} ({row[x]['n']})" if x in row else "-"
            for x in lengths) + " |")
    lines.append("")
  return "\n".join(lines)


def plot_report(result: dict, out: pathlib.Path) -> list[pathlib.Path]:
  """Accuracy by length per task, and by the buckets of PLOTS (one line per
  length), each with the chance level and the trained length drawn."""
  step, trained = result["step"], result["trained_seq_len"]
  written = []
  for name, t in result["tasks"].items():
    records = t["by"][LENGTH]
    chance = {f"chance ({t['overall']['chance']:.3g})": t["overall"]["chance"]}
    written.append(line_plot(
        out / f"tasks_step{step}_{name}_length.png",
        {name: ([r[LENGTH] for r in records], [r["accuracy"] for r in records])},
        xlabel="sequence length (tokens)", ylabel="exact-match accuracy",
        title=f"{name}: accuracy by length, step {step}",
        vlines={f"trained length ({trained})": trained}, hlines=chance))
    if name in PLOTS:
      bucket, label = PLOTS[name]
      series: dict[str, tuple[list, list]] = {}
      for r in t["by"][f"{bucket},{LENGTH}"]:
        if r[bucket] is None:
          continue
        xs, ys = series.setdefault(f"length {r[LENGTH]}", ([], []))
        xs.append(r[bucket])
        ys.append(r["accuracy"])
      if series:
        written.append(line_plot(
            out / f"tasks_step{step}_{name}_{bucket}.png", series,
            xlabel=label, ylabel="exact-match accuracy",
            title=f"{name}: accuracy by {bucket}, step {step}", hlines=chance))
  return written


def write_report(out: pathlib.Path, result: dict) -> list[pathlib.Path]:
  """Writes tasks_step<N>.json, .md and the PNG plots under `out`."""
  out.mkdir(parents=True, exist_ok=True)
  stem = out / f"tasks_step{result['step']}"
  written = [stem.with_suffix(".json"), stem.with_suffix(".md")]
  written[0].write_text(json.dumps(result, indent=2, default=_json_default)
                        + "\n")
  written[1].write_text(markdown(result))
  return written + plot_report(result, out)


def _json_default(x: Any) -> Any:
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, (tuple, np.ndarray)):
    return list(x)
  raise TypeError(f"{type(x).__name__} is not JSON serializable")
