"""``report``: every point's summary.json and eval results collected into
``<sweep_dir>/report/results.csv`` (one row per point) and ``results.md``
(one row per group of points that differ only in their seed: mean,
standard deviation and number of seeds), with the plots of ``plots.py``.

A point's numbers are shown only once its training has finished (state
``done``, or ``trained`` with an evaluation still to run); a failed,
running, interrupted or pending point shows its state and no number. The
standard deviation is the sample one (n - 1 in the denominator), shown for
2 or more seeds. The final loss is summary.json's validation loss (the
loss eval.py reports on the same split is its own column).
"""

from __future__ import annotations

import csv
import math
import pathlib
from typing import Any

import numpy as np

from ultramem_jax.sweep import plots, state
from ultramem_jax.sweep.execute import Job, job_state
from ultramem_jax.sweep.points import Point

REPORT_DIR = "report"
WITH_NUMBERS = ("done", "trained")
BASE_COLUMNS = ("name", "group", "variant", "seed", "state", "step", "val_loss",
                "eval_loss", "tokens", "activated_params", "total_params",
                "flops_per_token", "train_flops", "tokens_per_sec",
                "wall_time_sec")


def point_row(point: Point, job: Job, counted: dict) -> dict[str, Any]:
  """One point's row: its settings, state, counts and, once trained, its
  results (final validation loss, eval.py loss, task accuracies)."""
  run_dir = point.run_dir
  st = job_state(job)
  row: dict[str, Any] = {"name": point.name, "group": point.group,
                         "variant": point.variant, "seed": point.seed,
                         "state": st, **dict(point.settings), **counted}
  if st not in WITH_NUMBERS:
    return row
  s = state.summary(run_dir) or {}
  row.update(step=s.get("step"), val_loss=s.get("val_loss"),
             tokens_per_sec=s.get("tokens_per_sec"),
             wall_time_sec=s.get("wall_time_sec"))
  for output, args in job.evals:
    result = state.read_json(run_dir / "eval" / output)
    if result is None:
      continue
    if args[0] == "loss":
      row["eval_loss"] = result.get("val_loss")
    elif args[0] == "tasks":
      for task, t in result.get("tasks", {}).items():
        row[f"acc_{task}"] = t.get("overall", {}).get("accuracy")
  return row


def mean_std(values: list[float]) -> tuple[float, float | None, int]:
  """(mean, sample standard deviation or None for fewer than 2, count)."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None), int(v.size)


def power_law(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
  """(a, b) of y = a * x^b, least squares in log-log, for 3 or more
  distinct x (else None)."""
  if len(set(xs)) < 3:
    return None
  b, log_a = np.polyfit(np.log(xs), np.log(ys), 1)
  return float(np.exp(log_a)), float(b)


def numeric(rows: list[dict], key: str) -> list[float]:
  """The finite numbers of `key` among rows that have numbers."""
  out = []
  for r in rows:
    v = r.get(key)
    if r["state"] in WITH_NUMBERS and isinstance(v, (int, float)) and math.isfinite(v):
      out.append(float(v))
  return out


def groups(rows: list[dict]) -> dict[str, list[dict]]:
  out: dict[str, list[dict]] = {}
  for r in rows:
    out.setdefault(r["group"], []).append(r)
  return out


def group_stats(rows: list[dict], metrics: list[str]) -> list[dict[str, Any]]:
  """Per group: the variant, the counts, the points not finished (name:
  state), and mean / std / n of each metric over its finished seeds."""
  out = []
  for name, members in groups(rows).items():
    g: dict[str, Any] = {"group": name, "variant": members[0]["variant"],
                         "points": len(members),
                         "unfinished": [f"{r['name']} ({r['state']})" for r in members
                                        if r["state"] not in WITH_NUMBERS]}
    for key in ("activated_params", "total_params", "train_flops"):
      g[key] = members[0].get(key)
    for m in metrics:
      values = numeric(members, m)
      g[m] = mean_std(values) if values else None
    out.append(g)
  return out


def _cell(stat: tuple[float, float | None, int] | None, digits: int) -> str:
  if stat is None:
    return "-"
  mean, std, n = stat
  return f"{mean:.{digits}f} ± {std:.{digits}f} (n={n})" if std is not None \
      else f"{mean:.{digits}f} (n=1)"


def markdown(sweep_name: str, rows: list[dict], metrics: list[str],
             fits: dict[str, dict[str, tuple[float, float]]]) -> str:
  """The group table, the power-law fits and every point's state."""
  stats = group_stats(rows, metrics)
  head = ["group", "activated params", "total params", "training FLOPs",
          *metrics, "not finished"]
  lines = [f"# Sweep {sweep_name}", "",
           "Mean ± sample standard deviation over seeds (n = finished seeds).", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for g in stats:
    digits = {m: (3 if m.startswith("acc_") else 4) for m in metrics}
    lines.append("| " + " | ".join(
        [g["group"], f"{g['activated_params']:,}" if g["activated_params"] else "-",
         f"{g['total_params']:,}" if g["total_params"] else "-",
         f"{g['train_flops']:.3g}" if g["train_flops"] else "-"]
        + [_cell(g[m], digits[m]) for m in metrics]
        + [", ".join(g["unfinished"]) or "-"]) + " |")
  for what, per_variant in fits.items():
    for variant, (a, b) in per_variant.items():
      lines += ["", f"Power law, final loss against {what}, {variant}: "
                f"loss = {a:.4g} * x^{b:.4f}"]
  lines += ["", "| point | state | validation loss |", "|---|---|---|"]
  for r in rows:
    loss = r.get("val_loss") if r["state"] in WITH_NUMBERS else None
    lines.append(f"| {r['name']} | {r['state']} | "
                 f"{f'{loss:.4f}' if isinstance(loss, float) else r['state']} |")
  return "\n".join(lines) + "\n"


def write_csv(path: pathlib.Path, rows: list[dict]) -> None:
  """results.csv: BASE_COLUMNS, then the settings and task columns; a
  cell without a number is empty (the state column says why)."""
  extra = []
  for r in rows:
    extra += [k for k in r if k not in BASE_COLUMNS and k not in extra]
  columns = list(BASE_COLUMNS) + extra
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for r in rows:
      numbers_ok = r["state"] in WITH_NUMBERS
      writer.writerow({k: ("" if r.get(k) is None else r[k])
                       if numbers_ok or k not in _RESULTS else "" for k in columns})


_RESULTS = {"step", "val_loss", "eval_loss", "tokens_per_sec", "wall_time_sec"}


def fits_of(rows: list[dict], xkeys: dict[str, str]) -> dict[str, dict[str, tuple[float, float]]]:
  """{x label: {variant: (a, b)}} of the final loss's mean per group against
  each x column, for variants with 3 or more distinct x."""
  out: dict[str, dict[str, tuple[float, float]]] = {}
  stats = group_stats(rows, ["val_loss"])
  for label, key in xkeys.items():
    by_variant: dict[str, tuple[list, list]] = {}
    for g in stats:
      if g["val_loss"] is None or not g.get(key):
        continue
      xs, ys = by_variant.setdefault(g["variant"], ([], []))
      xs.append(float(g[key]))
      ys.append(g["val_loss"][0])
    for variant, (xs, ys) in by_variant.items():
      fit = power_law(xs, ys)
      if fit is not None:
        out.setdefault(label, {})[variant] = fit
  return out


def task_metrics(rows: list[dict]) -> list[str]:
  keys: list[str] = []
  for r in rows:
    keys += [k for k in r if k.startswith("acc_") and k not in keys]
  return keys


SCALING = {"activated parameters": "activated_params",
           "training FLOPs": "train_flops"}


def write_report(out: pathlib.Path, sweep_name: str, points: list[Point],
                 jobs: list[Job], counted: dict[str, dict]) -> list[pathlib.Path]:
  """results.csv, results.md and the PNG plots under `out`."""
  rows = [point_row(p, j, counted[p.name]) for p, j in zip(points, jobs)]
  metrics = ["val_loss", "eval_loss"] if any(j.evals and any(
      a[0] == "loss" for _, a in j.evals) for j in jobs) else ["val_loss"]
  accs = task_metrics(rows)
  fits = fits_of(rows, SCALING)
  out.mkdir(parents=True, exist_ok=True)
  written = [out / "results.csv", out / "results.md"]
  write_csv(written[0], rows)
  written[1].write_text(markdown(sweep_name, rows, metrics + accs, fits))
  stats = group_stats(rows, ["val_loss"] + accs)
  curves = plots.loss_curves(rows, {p.name: p.run_dir for p in points}, WITH_NUMBERS)
  written.append(plots.plot_loss_vs_tokens(out / "loss_vs_tokens.png", curves))
  for label, key in SCALING.items():
    written.append(plots.plot_scaling(
        out / f"loss_vs_{key}.png", stats, key, label, fits.get(label, {})))
  if accs:
    written.append(plots.plot_task_accuracy(out / "task_accuracy.png", stats, accs))
  return written
