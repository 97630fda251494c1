"""What a study's sweep has produced, read the way ``python -m
ultramem_jax.sweep report`` reads it: the points of the sweep file (with
the command line's overrides, which change the points' names as they do
for ``sweep run``), each point's row (``sweep.report.point_row``: state,
summary.json, eval.py outputs, inspect's counts), its validation-loss
curve and its task accuracy by length. A point whose run directory holds
no finished training is read from the study's record under ``results/``
(``record.py``) when the record has it finished."""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any

import numpy as np

from ultramem_jax.evaluation.task_scores import LENGTH
from ultramem_jax.reproduction import record as R
from ultramem_jax.reproduction.claims import Study
from ultramem_jax.sweep import plan, plots, state
from ultramem_jax.sweep.execute import job_of
from ultramem_jax.sweep.points import Point, resolve, with_overrides
from ultramem_jax.sweep.report import WITH_NUMBERS, point_row
from ultramem_jax.sweep.spec import Sweep, read_sweep
from ultramem_jax.training.metrics import read_scalars
from ultramem_jax.training.run_dir import METRICS_FILE

HARNESS = "harness_"   # row columns harness_<task>: eval.py harness's acc


@dataclasses.dataclass(frozen=True)
class Collected:
  """A study's sweep and its points' rows, in the sweep's order; per
  finished point its curve ({step: val_loss}) and accuracy by length
  (record rows: task, seq_len, accuracy) where they are at hand; the
  names read from the record; what the record held before."""

  study: Study
  sweep: Sweep
  points: tuple[Point, ...]
  rows: tuple[dict[str, Any], ...]
  curve: dict[str, dict[int, float]] = dataclasses.field(default_factory=dict)
  by_length: dict[str, list[dict]] = dataclasses.field(default_factory=dict)
  from_record: frozenset[str] = frozenset()
  recorded: dict[str, Any] = dataclasses.field(default_factory=dict)

  def variants(self) -> list[str]:
    out: list[str] = []
    for p in self.points:
      if p.variant not in out:
        out.append(p.variant)
    return out

  def finished(self, variant: str) -> list[dict[str, Any]]:
    return [r for r in self.rows
            if r["variant"] == variant and r["state"] in WITH_NUMBERS]

  def finished_names(self) -> list[str]:
    return [r["name"] for r in self.rows if r["state"] in WITH_NUMBERS]

  def any_finished(self) -> bool:
    return any(r["state"] in WITH_NUMBERS for r in self.rows)

  def first_row(self, variant: str) -> dict[str, Any]:
    return next(r for r in self.rows if r["variant"] == variant)


def sweep_of(study: Study, repo: pathlib.Path, overrides: list[str],
             sweeps_root: pathlib.Path | None) -> Sweep:
  """The study's sweep file with the overrides; its sweep_dir moved to
  ``<sweeps_root>/<the file's stem>`` when a root is given (as ``run``
  and the printed commands place it)."""
  path = repo / study.sweep
  root = None if sweeps_root is None else str(sweeps_root / path.stem)
  return with_overrides(read_sweep(path, root), overrides)


def task_result(point: Point) -> dict | None:
  """The point's ``eval/tasks_step<N>.json`` at its final step."""
  return state.read_json(point.run_dir / "eval" / f"tasks_step{point.steps}.json")


def _harness(sweep: Sweep, point: Point) -> dict[str, float]:
  """{harness_<task>: acc} from the point's eval.py harness results."""
  out = {}
  for spec in (e for e in sweep.evals if e.kind == "harness"):
    result = state.read_json(point.run_dir / "eval" / spec.output(point.steps)) or {}
    for task, metrics in result.get("results", {}).items():
      acc = metrics.get("acc,none")
      if isinstance(acc, (int, float)):
        out[HARNESS + task] = float(acc)
  return out


def _by_length(point: Point) -> list[dict]:
  result = task_result(point) or {}
  return [{"task": task, LENGTH: int(rec[LENGTH]), "accuracy": float(rec["accuracy"])}
          for task, t in result.get("tasks", {}).items()
          for rec in t.get("by", {}).get(LENGTH, [])]


def _from_run_dir(sweep: Sweep, point: Point, row: dict, c: dict) -> None:
  """A finished point's curve, accuracy by length and harness columns."""
  metrics = point.run_dir / METRICS_FILE
  steps, values = read_scalars(metrics, "val/loss") if metrics.exists() else ([], [])
  if steps:
    c["curve"][point.name] = dict(zip(steps, values))
  lengths = _by_length(point)
  if lengths:
    c["by_length"][point.name] = lengths
  row.update(_harness(sweep, point))


def _from_record(name: str, recorded: dict, c: dict) -> None:
  curve = recorded["curves"].get(name)
  if curve:
    c["curve"][name] = {int(r["step"]): float(r["val_loss"]) for r in curve}
  lengths = recorded["by_length"].get(name)
  if lengths:
    c["by_length"][name] = [{k: r[k] for k in R.LENGTH_COLUMNS[1:]} for r in lengths]


def read_record(assets: pathlib.Path | None, sweep_name: str) -> dict[str, Any]:
  """The study's record (rows, curves, by_length); empty without assets."""
  if assets is None:
    return {"rows": [], "curves": {}, "by_length": {}}
  p = R.paths(assets, sweep_name)
  return {"rows": R.read_table(p["rows"]),
          "curves": R.group_series(R.read_table(p["curves"])),
          "by_length": R.group_series(R.read_table(p["by_length"]))}


def collect(study: Study, repo: pathlib.Path, overrides: list[str] = (),
            sweeps_root: pathlib.Path | None = None,
            assets: pathlib.Path | None = None) -> Collected:
  """The study's points, from their run directories and, given `assets`
  (the results/ folder), from the record for points not finished there."""
  sweep = sweep_of(study, repo, list(overrides), sweeps_root)
  points = resolve(sweep)
  counted = plan.counts(points)
  recorded = read_record(assets, sweep.name)
  by_name = {r["name"]: r for r in recorded["rows"]}
  rows, from_record = [], set()
  found: dict[str, dict] = {"curve": {}, "by_length": {}}
  for p in points:
    fresh = point_row(p, job_of(p, sweep), counted[p.name])
    row, old = R.choose(fresh, by_name.get(p.name))
    if old:
      from_record.add(p.name)
      _from_record(p.name, recorded, found)
    elif R.finished(row):
      _from_run_dir(sweep, p, row, found)
    rows.append(row)
  return Collected(study, sweep, tuple(points), tuple(rows), found["curve"],
                   found["by_length"], frozenset(from_record), recorded)


def save_record(c: Collected, assets: pathlib.Path) -> list[pathlib.Path]:
  """Writes the study's record (``record.py``); returns the files, the
  rows' CSV first."""
  p = R.paths(assets, c.sweep.name)
  R.write_rows(p["rows"], list(c.rows), c.recorded["rows"])
  written = [p["rows"]]
  if c.curve or c.recorded["curves"]:
    R.write_series(p["curves"], R.CURVE_COLUMNS,
                   {n: [{"step": s, "val_loss": v} for s, v in sorted(curve.items())]
                    for n, curve in c.curve.items()}, c.recorded["curves"])
    written.append(p["curves"])
  if c.by_length or c.recorded["by_length"]:
    R.write_series(p["by_length"], R.LENGTH_COLUMNS, c.by_length,
                   c.recorded["by_length"])
    written.append(p["by_length"])
  return written


def without_series(c: Collected, series: dict) -> list[str]:
  """The finished points with no entry in `series` (curve or by_length)."""
  return [n for n in c.finished_names() if n not in series]


def metric_key(study: Study, task: str | None = None) -> str:
  """The row column a study's comparisons read."""
  if study.metric == "tasks":
    return f"acc_{task}"
  return "eval_loss"


def values(c: Collected, variant: str, key: str) -> list[float]:
  """The finite numbers of `key` over the variant's finished seeds."""
  out = []
  for r in c.finished(variant):
    v = r.get(key)
    if isinstance(v, (int, float)) and math.isfinite(v):
      out.append(float(v))
  return out


def curves(c: Collected) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """{variant: (tokens, mean validation loss, std)} at the steps every
  finished seed with a curve logged (``sweep.plots.grouped_bands``)."""
  done = [r for r in c.rows if r["state"] in WITH_NUMBERS]
  return plots.grouped_bands(done, c.curve, "variant")


def accuracy_by_length(c: Collected) -> dict[str, dict[str, dict[int, list[float]]]]:
  """{task: {variant: {length: [accuracy per finished seed]}}}."""
  out: dict[str, dict[str, dict[int, list[float]]]] = {}
  variant = {r["name"]: r["variant"] for r in c.rows}
  for name in c.finished_names():
    for rec in c.by_length.get(name, []):
      per = out.setdefault(str(rec["task"]), {}).setdefault(variant[name], {})
      per.setdefault(int(rec[LENGTH]), []).append(float(rec["accuracy"]))
  return out


def harness_accuracy(c: Collected) -> dict[str, dict[str, list[float]]] | None:
  """{task: {variant: [acc per finished point]}} from the rows' harness
  columns; None when the sweep runs no harness eval."""
  if not any(e.kind == "harness" for e in c.sweep.evals):
    return None
  out: dict[str, dict[str, list[float]]] = {}
  for v in c.variants():
    for r in c.finished(v):
      for k, acc in r.items():
        if k.startswith(HARNESS) and isinstance(acc, (int, float)):
          out.setdefault(k[len(HARNESS):], {}).setdefault(v, []).append(float(acc))
  return out


def setting(c: Collected, variant: str, key: str) -> Any:
  """The value of an axis (e.g. model.memory.top_m) at a variant."""
  p = next(p for p in c.points if p.variant == variant)
  return dict(p.settings).get(key)
