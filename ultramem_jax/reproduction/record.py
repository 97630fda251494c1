"""A study's record under ``results/``: what the repository keeps of its
runs once their run directories (checkpoints and all, never committed)
are gone.

- ``<sweep>.csv``: a row per point, ``sweep.report.write_csv``'s columns;
- ``<sweep>_curves.csv``: each finished point's validation loss per step
  (``name, step, val_loss``), the loss-curve figure's data;
- ``<sweep>_by_length.csv``: each finished point's eval.py tasks accuracy
  per task and length (``name, task, seq_len, accuracy``).

Rows are keyed by point name, which hashes the point's resolved config:
a point whose config changed is a new point. ``report`` reads a point
from its run directory once its training has finished there and from the
record otherwise, and writes back every point the record held, so a
finished row is never dropped or replaced by an unfinished one (a report
over other overrides adds its points beside the rest)."""

from __future__ import annotations

import csv
import pathlib
from typing import Any, Iterable

from ultramem_jax.sweep.report import WITH_NUMBERS, write_csv

CURVE_COLUMNS = ("name", "step", "val_loss")
LENGTH_COLUMNS = ("name", "task", "seq_len", "accuracy")


def paths(assets: pathlib.Path, sweep_name: str) -> dict[str, pathlib.Path]:
  return {"rows": assets / f"{sweep_name}.csv",
          "curves": assets / f"{sweep_name}_curves.csv",
          "by_length": assets / f"{sweep_name}_by_length.csv"}


def parse(cell: str) -> Any:
  """A CSV cell as write_csv wrote it: empty is None, then int, float, text."""
  if cell == "":
    return None
  for kind in (int, float):
    try:
      return kind(cell)
    except ValueError:
      pass
  return cell


def read_table(path: pathlib.Path) -> list[dict[str, Any]]:
  """A record file's rows, cells parsed; [] when the file does not exist."""
  if not path.exists():
    return []
  with open(path, newline="") as f:
    return [{k: parse(v) for k, v in r.items() if v is not None}
            for r in csv.DictReader(f)]


def finished(row: dict[str, Any] | None) -> bool:
  return bool(row) and row.get("state") in WITH_NUMBERS


def choose(fresh: dict[str, Any], recorded: dict[str, Any] | None) -> tuple[dict, bool]:
  """The row a report uses for a point: the run directory's once its
  training has finished there, else the record's finished row, else the
  run directory's (pending, running, failed). True when from the record."""
  if finished(fresh) or not finished(recorded):
    return fresh, False
  return dict(recorded), True


def merged_rows(current: Iterable[dict], recorded: Iterable[dict]) -> list[dict]:
  """The rows to write: the current points', then every recorded row of a
  point not among them."""
  current = list(current)
  names = {r["name"] for r in current}
  return current + [r for r in recorded if r["name"] not in names]


def write_rows(path: pathlib.Path, current: list[dict], recorded: list[dict]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  write_csv(path, merged_rows(current, recorded))


def group_series(rows: list[dict]) -> dict[str, list[dict]]:
  """A series file's rows grouped by point name, in file order."""
  out: dict[str, list[dict]] = {}
  for r in rows:
    out.setdefault(str(r["name"]), []).append(r)
  return out


def write_series(path: pathlib.Path, columns: tuple[str, ...],
                 current: dict[str, list[dict]], recorded: dict[str, list[dict]]) -> None:
  """A series file: the current points' series, then the recorded series
  of every other point."""
  keep = dict(current)
  for name, series in recorded.items():
    keep.setdefault(name, series)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for name, series in keep.items():
      for r in series:
        writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in columns}
                        | {"name": name})
