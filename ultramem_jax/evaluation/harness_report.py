"""The report of ``eval.py harness``: one markdown row per task with the
metric the paper reports and its standard error, and the files it goes to.

The metric of a task is ``acc_norm`` when the task defines it (the
harness's length-normalised accuracy: ARC, HellaSwag, OpenBookQA, PIQA,
SciQ), else ``acc`` (CommonsenseQA, MMLU, Winogrande, most custom
multiple-choice tasks), else the first metric the task reports; where it is
``acc_norm`` the row gives ``acc`` too. The JSON holds everything the
harness returned.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re

from lm_eval.utils import handle_non_serializable

PREFERRED = ("acc_norm", "acc", "exact_match")


def metrics_of(row: dict) -> dict[str, tuple[float, float | None]]:
  """{metric: (value, standard error or None)} of one task's results
  (keys ``name,filter``; the filter is dropped when it is the only one)."""
  out = {}
  for key, value in row.items():
    if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
      continue
    name, filt = key.split(",", 1)
    label = name if filt == "none" else f"{name} ({filt})"
    stderr = row.get(f"{name}_stderr,{filt}")
    out[label] = (float(value),
                  float(stderr) if isinstance(stderr, (int, float)) else None)
  return out


def main_metric(metrics: dict) -> str | None:
  for name in PREFERRED:
    if name in metrics:
      return name
  return next(iter(metrics), None)


def samples_of(results: dict, name: str) -> int | None:
  """Documents scored for a task, or summed over a group's tasks."""
  counts = results.get("n-samples", {})
  if name in counts:
    return counts[name].get("effective")
  subs = results.get("group_subtasks", {}).get(name) or []
  parts = [samples_of(results, s) for s in subs]
  return sum(parts) if parts and None not in parts else None


def table_rows(results: dict, names: list[str]) -> list[dict]:
  """Per requested task or group, in the order asked (a tag's tasks each get
  a row): task, samples, metric, value, stderr and, beside acc_norm, acc."""
  scores = results.get("results", {})
  shown = [n for n in names if n in scores]
  shown += [n for n in scores if n not in shown and n not in
            {s for subs in results.get("group_subtasks", {}).values() for s in subs}
            and n not in names]
  rows = []
  for name in shown:
    metrics = metrics_of(scores[name])
    metric = main_metric(metrics)
    if metric is None:
      continue
    value, stderr = metrics[metric]
    row = {"task": name, "metric": metric, "value": value, "stderr": stderr,
           "samples": samples_of(results, name)}
    if metric == "acc_norm" and "acc" in metrics:
      row["acc"], row["acc_stderr"] = metrics["acc"]
    rows.append(row)
  return rows


def _num(x: float | None) -> str:
  return "" if x is None else f"{x:.4f}"


def markdown(rows: list[dict], header: str) -> str:
  lines = [header, "", "| task | samples | metric | value | stderr | acc | acc stderr |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    samples = "" if r["samples"] is None else str(r["samples"])
    lines.append(f"| {r['task']} | {samples} | {r['metric']} | {_num(r['value'])} | "
                 f"{_num(r['stderr'])} | {_num(r.get('acc'))} | "
                 f"{_num(r.get('acc_stderr'))} |")
  return "\n".join(lines) + "\n"


def stem_name(step: int, names: list[str], paper: bool,
              num_fewshot: int | None, limit: float | None) -> str:
  """``harness_step<N>_<tasks>[_<k>shot][_limit<L>]``: the name of a run's
  first result for these options (the sweep tool looks for it)."""
  tag = "paper" if paper else re.sub(r"[^A-Za-z0-9_.-]+", "-", "+".join(names))
  if len(tag) > 60:
    tag = tag[:48] + "-" + hashlib.sha1(tag.encode()).hexdigest()[:8]
  stem = f"harness_step{step}_{tag}"
  if num_fewshot is not None:
    stem += f"_{num_fewshot}shot"
  if limit is not None:
    stem += f"_limit{limit:g}"
  return stem


def report_stem(out: pathlib.Path, step: int, names: list[str], paper: bool,
                num_fewshot: int | None, limit: float | None) -> pathlib.Path:
  """``OUT/`` + :func:`stem_name`, with ``-2``, ``-3``, ... appended when
  that name is taken: earlier results are never overwritten."""
  stem = stem_name(step, names, paper, num_fewshot, limit)
  candidate, n = stem, 1
  while ((out / f"{candidate}.json").exists()
         or (out / f"{candidate}.md").exists()):
    n += 1
    candidate = f"{stem}-{n}"
  return out / candidate


def write_report(stem: pathlib.Path, results: dict, text: str
                 ) -> list[pathlib.Path]:
  """Writes ``stem``.json (the harness's results) and .md (`text`)."""
  stem.parent.mkdir(parents=True, exist_ok=True)
  paths = [stem.parent / f"{stem.name}.json", stem.parent / f"{stem.name}.md"]
  paths[0].write_text(json.dumps(results, indent=2,
                                 default=handle_non_serializable) + "\n")
  paths[1].write_text(text)
  return paths
