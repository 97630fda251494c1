"""What a study's sweep has produced, read the way ``python -m
ultramem_jax.sweep report`` reads it: the points of the sweep file (with
the command line's overrides, which change the points' names as they do
for ``sweep run``), each point's row (``sweep.report.point_row``: state,
summary.json, eval.py outputs, inspect's counts) and, per variant, the
finished seeds' numbers, loss curves and task accuracy by length."""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any

import numpy as np

from ultramem_jax.evaluation.task_scores import LENGTH
from ultramem_jax.reproduction.claims import Study
from ultramem_jax.sweep import plan, plots, state
from ultramem_jax.sweep.execute import job_of
from ultramem_jax.sweep.points import Point, resolve, with_overrides
from ultramem_jax.sweep.report import WITH_NUMBERS, point_row
from ultramem_jax.sweep.spec import Sweep, read_sweep


@dataclasses.dataclass(frozen=True)
class Collected:
  """A study's sweep and its points' rows, in the sweep's order."""

  study: Study
  sweep: Sweep
  points: tuple[Point, ...]
  rows: tuple[dict[str, Any], ...]

  def variants(self) -> list[str]:
    out: list[str] = []
    for p in self.points:
      if p.variant not in out:
        out.append(p.variant)
    return out

  def finished(self, variant: str) -> list[dict[str, Any]]:
    return [r for r in self.rows
            if r["variant"] == variant and r["state"] in WITH_NUMBERS]

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


def collect(study: Study, repo: pathlib.Path, overrides: list[str] = (),
            sweeps_root: pathlib.Path | None = None) -> Collected:
  sweep = sweep_of(study, repo, list(overrides), sweeps_root)
  points = resolve(sweep)
  counted = plan.counts(points)
  rows = tuple(point_row(p, job_of(p, sweep), counted[p.name]) for p in points)
  return Collected(study, sweep, tuple(points), rows)


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
  finished seed logged (``sweep.plots.loss_curves``, grouped by variant)."""
  rows = [dict(r, group=r["variant"]) for r in c.rows]
  return plots.loss_curves(rows, {p.name: p.run_dir for p in c.points},
                           WITH_NUMBERS)


def task_result(point: Point) -> dict | None:
  """The point's ``eval/tasks_step<N>.json`` at its final step."""
  return state.read_json(point.run_dir / "eval" / f"tasks_step{point.steps}.json")


def accuracy_by_length(c: Collected) -> dict[str, dict[str, dict[int, list[float]]]]:
  """{task: {variant: {length: [accuracy per finished seed]}}} from each
  finished point's eval.py tasks result."""
  out: dict[str, dict[str, dict[int, list[float]]]] = {}
  finished = {r["name"] for r in c.rows if r["state"] in WITH_NUMBERS}
  for p in c.points:
    result = task_result(p) if p.name in finished else None
    if not result:
      continue
    for task, t in result.get("tasks", {}).items():
      per = out.setdefault(task, {}).setdefault(p.variant, {})
      for rec in t.get("by", {}).get(LENGTH, []):
        per.setdefault(int(rec[LENGTH]), []).append(float(rec["accuracy"]))
  return out


def harness_accuracy(c: Collected) -> dict[str, dict[str, list[float]]] | None:
  """{task: {variant: [acc per finished point]}} from the sweep's
  eval.py harness results; None when the sweep runs no harness eval."""
  specs = [e for e in c.sweep.evals if e.kind == "harness"]
  if not specs:
    return None
  out: dict[str, dict[str, list[float]]] = {}
  finished = {r["name"] for r in c.rows if r["state"] in WITH_NUMBERS}
  for p in c.points:
    for spec in specs:
      result = state.read_json(p.run_dir / "eval" / spec.output(p.steps))
      if p.name not in finished or not result:
        continue
      for task, metrics in result.get("results", {}).items():
        acc = metrics.get("acc,none")
        if isinstance(acc, (int, float)):
          out.setdefault(task, {}).setdefault(p.variant, []).append(float(acc))
  return out


def setting(c: Collected, variant: str, key: str) -> Any:
  """The value of an axis (e.g. model.memory.top_m) at a variant."""
  p = next(p for p in c.points if p.variant == variant)
  return dict(p.settings).get(key)
