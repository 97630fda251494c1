"""One study's part of RESULTS.md: its command, its table (mean ± sample
std over the finished seeds, n, tokens, inspect's activated and total
non-embedding parameters), its comparisons with the verdict rule's
numbers, its PNG and its CSV (every point, ``sweep report``'s columns).
A study with no finished point says "not run" and gives the command;
nothing is filled in."""

from __future__ import annotations

import dataclasses
import pathlib

from ultramem_jax.reproduction import collect as C
from ultramem_jax.reproduction import figures
from ultramem_jax.reproduction import record as R
from ultramem_jax.reproduction.claims import Part, Study
from ultramem_jax.reproduction.verdict import (REPRODUCED, Verdict, mean_std,
                                               needs_third_seed, verdict)
from ultramem_jax.sweep.execute import portable
from ultramem_jax.sweep.report import WITH_NUMBERS

NOT_RUN = "not run"


@dataclasses.dataclass(frozen=True)
class PartResult:
  part: Part
  verdict: Verdict | None   # None: a contender has no finished seed
  third_seed: bool

  @property
  def word(self) -> str:
    return self.verdict.verdict if self.verdict else NOT_RUN


@dataclasses.dataclass(frozen=True)
class StudyResult:
  study: Study
  ran: bool
  parts: tuple[PartResult, ...]
  lines: tuple[str, ...]
  files: tuple[pathlib.Path, ...]


def commands(study: Study, overrides: list[str], sweeps_root: str | None,
             out: str) -> list[str]:
  """The commands that produce this study's rows of `out`."""
  extra = "".join(f" {o}" for o in overrides)
  root = f" --sweep_dir {sweeps_root}/{pathlib.Path(study.sweep).stem}" if sweeps_root else ""
  report_root = f" --sweeps_root {sweeps_root}" if sweeps_root else ""
  return [f"python -m ultramem_jax.sweep run {study.sweep}{extra}{root}",
          f"python -m ultramem_jax.reproduction report --out {out}{extra}{report_root}"]


def _cell(vals: list[float], digits: int) -> str:
  if not vals:
    return "-"
  mean, std = mean_std(vals)
  return (f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None
          else f"{mean:.{digits}f}")


def _metrics(c: C.Collected) -> list[tuple[str, str, int]]:
  """(column title, row key, digits) of the study's table."""
  if c.study.metric == "tasks":
    tasks: list[str] = []
    for r in c.rows:
      tasks += [k[4:] for k in r if k.startswith("acc_") and k[4:] not in tasks]
    return [(f"{t} accuracy", f"acc_{t}", 3) for t in tasks]
  return [("eval.py loss (nats/token)", "eval_loss", 4)]


def table(c: C.Collected) -> list[str]:
  metrics = _metrics(c)
  head = ["variant", "n seeds", "tokens per run", "activated (non-emb.)",
          "total (non-emb.)", *[m[0] for m in metrics], "tokens/s", "not finished"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for v in c.variants():
    first, done = c.first_row(v), c.finished(v)
    unfinished = [f"s{r['seed']} {r['state']}" for r in c.rows
                  if r["variant"] == v and r["state"] not in WITH_NUMBERS]
    rate = C.values(c, v, "tokens_per_sec")
    lines.append("| " + " | ".join(
        [v, str(len(done)), f"{first['tokens']:,}",
         f"{first['activated_non_embedding_params']:,}",
         f"{first['non_embedding_params']:,}",
         *[_cell(C.values(c, v, key), d) for _, key, d in metrics],
         f"{mean_std(rate)[0]:,.0f}" if rate else "-",
         ", ".join(unfinished) or "-"]) + " |")
  return lines


def harness_line(c: C.Collected) -> list[str]:
  """For a sweep that runs eval.py harness: how many finished points wrote
  its result and their accuracy per variant (a smoke test, not a claim)."""
  found = C.harness_accuracy(c)
  if found is None:
    return []
  done = sum(len(v) for per in found.values() for v in per.values())
  cells = [f"{task} {variant} {_cell(v, 3)} (n={len(v)})"
           for task, per in found.items() for variant, v in per.items()]
  return [f"eval.py harness, a smoke test of the pipeline and not a claim: "
          f"{done} result(s) from {sum(len(c.finished(v)) for v in c.variants())} "
          f"finished point(s)" + (f"; accuracy {'; '.join(cells)}" if cells else "")
          + ".", ""]


def judge(c: C.Collected, part: Part) -> PartResult:
  key = C.metric_key(c.study, part.task)
  a, b = C.values(c, part.a, key), C.values(c, part.b, key)
  if not a or not b:
    return PartResult(part, None, True)
  return PartResult(part, verdict(a, b, part.kind,
                                  higher_is_better=c.study.metric == "tasks"),
                    needs_third_seed(a, b))


def comparisons(results: list[PartResult]) -> list[str]:
  lines = ["| comparison | mean A | mean B | A - B | 2 x pooled std | counts | "
           "verdict | third seed due |", "|---|---|---|---|---|---|---|---|"]
  for r in results:
    note = "" if r.part.verdict else " (reported, not in the verdict)"
    if r.verdict is None:
      lines.append(f"| {r.part.text}{note} | - | - | - | - | - | {NOT_RUN} | - |")
      continue
    c = r.verdict.comparison
    thr = "-" if c.threshold is None else f"{c.threshold:.4f}"
    lines.append(f"| {r.part.text}{note} | {c.mean_a:.4f} (n={c.n_a}) | "
                 f"{c.mean_b:.4f} (n={c.n_b}) | {c.diff:+.4f} | {thr} | "
                 f"{'yes' if c.counts else 'no'} | **{r.verdict.verdict}** | "
                 f"{'yes' if r.third_seed else 'no'} |")
  return lines


def in_words(r: PartResult, metric: str) -> str | None:
  """One plain sentence for a comparison that ran: which contender is
  better by how much, against twice the seed spread, and whether that
  agrees with the paper. None for a comparison that did not run."""
  if r.verdict is None:
    return None
  c, p = r.verdict.comparison, r.part
  tasks = metric == "tasks"
  what = f"{p.task} accuracy" if p.task else "loss"
  unit = "" if tasks else " nats/token"
  nums = f"{p.a} {c.mean_a:.4f}, {p.b} {c.mean_b:.4f}"
  aside = "" if p.verdict else " (reported, not in the verdict)"
  if c.threshold is None:
    return (f"{p.a} against {p.b} ({what}): {nums}, fewer than 2 seeds on a "
            f"side, so there is no spread to judge by{aside}.")
  if not c.counts:
    tail = "; a third seed is due" if r.third_seed else ""
    return (f"{p.a} and {p.b} ({what}) differ by {c.diff:+.4f}{unit} ({nums}), "
            f"within twice the pooled seed std ({c.threshold:.4f}): no counted "
            f"difference{tail}{aside}.")
  better, worse = (p.a, p.b) if r.verdict.a_better else (p.b, p.a)
  paper = (f"{p.a} not worse than {p.b}" if p.kind == "parity"
           else f"{p.a} better than {p.b}")
  agrees = ("as the paper has it" if r.verdict.verdict == REPRODUCED
            else f"against the paper, which has {paper}")
  return (f"{better} is better than {worse} ({what}) by {abs(c.diff):.4f}{unit} "
          f"({nums}; twice the pooled seed std {c.threshold:.4f}), {agrees}{aside}.")


def plainly(results: list[PartResult], metric: str) -> list[str]:
  """The comparisons in words, a bullet each, or nothing if none ran."""
  said = [w for w in (in_words(r, metric) for r in results) if w]
  return (["In words:", "", *[f"- {w}" for w in said], ""] if said else [])


def _figure_path(c: C.Collected, assets: pathlib.Path) -> pathlib.Path:
  suffix = {"tasks": "accuracy_by_length", "density": "loss_vs_m"}.get(
      c.study.plot, "loss_curves")
  return assets / f"{c.sweep.name}_{suffix}.png"


def _draw(c: C.Collected, path: pathlib.Path) -> pathlib.Path:
  title = f"{c.sweep.name} ({c.study.label})"
  if c.study.plot == "tasks":
    return figures.task_accuracy(path, C.accuracy_by_length(c), title)
  if c.study.plot == "density":
    pts = [(float(C.setting(c, v, "model.memory.top_m") or 0),
            C.values(c, v, "eval_loss"), v) for v in c.variants()]
    return figures.loss_vs_m(path, pts, title)
  return figures.loss_curves(path, C.curves(c), title)


def figure(c: C.Collected, assets: pathlib.Path
           ) -> tuple[pathlib.Path, list[str], bool]:
  """The study's PNG, the lines said under it and whether it was drawn
  now. A figure drawn from per-step data (loss curves, accuracy by length)
  is redrawn only when every finished point's data is at hand; otherwise
  an existing PNG is kept as drawn before, and the lines name the points
  without data."""
  path = _figure_path(c, assets)
  if c.study.plot == "density":
    return _draw(c, path), [], True
  tasks = c.study.plot == "tasks"
  missing = C.without_series(c, c.by_length if tasks else c.curve)
  if not missing:
    return _draw(c, path), [], True
  what = "accuracy by length" if tasks else "loss curves"
  kept = R.paths(assets, c.sweep.name)["by_length" if tasks else "curves"].name
  n = len(c.finished_names())
  which = (f"None of the {n} finished points has its {what}" if len(missing) == n
           else f"{len(missing)} of the {n} finished points have no {what} "
                f"({', '.join(missing)})")
  lines = [f"{which} at hand: their run directories are gone and the record "
           f"(`{kept}`) does not hold them."]
  if path.exists():
    lines[0] += (" The figure is kept as it was last drawn and may lack points "
                 "that finished since; the table, the CSV and the verdicts hold "
                 "every finished point.")
    return path, lines + [""], False
  lines[0] += " The figure shows the other points."
  return _draw(c, path), lines + [""], True


def study_report(c: C.Collected, assets: pathlib.Path, out_dir: pathlib.Path,
                 cmds: list[str]) -> StudyResult:
  """The study's markdown lines, part verdicts and written files."""
  s = c.study
  lines = [f"### {s.label}: `{s.sweep}`", "", "```bash", *cmds, "```", ""]
  lines += [s.note, ""] if s.note else []
  if not c.any_finished():
    states = sorted({r["state"] for r in c.rows})
    lines += [f"**{NOT_RUN}**: none of its {len(c.rows)} points has finished "
              f"training in `{portable(c.sweep.sweep_dir)}` (states: {', '.join(states)}) "
              "or in the record under results/. "
              "Run the commands above.", ""]
    parts = tuple(PartResult(p, None, True) for p in s.parts)
    return StudyResult(s, False, parts, tuple(lines), ())
  assets.mkdir(parents=True, exist_ok=True)
  record = C.save_record(c, assets)
  csv_path = record[0]
  png, caption, drawn = figure(c, assets)
  parts = tuple(judge(c, p) for p in s.parts)
  rel = lambda p: p.relative_to(out_dir) if p.is_relative_to(out_dir) else p
  lines += ["Mean ± sample standard deviation over the finished seeds; "
            "parameters from inspect.", "", *table(c), "", *source_line(c, rel(csv_path)),
            *comparisons(list(parts)), "", *plainly(list(parts), s.metric),
            *harness_line(c),
            f"![{c.sweep.name}]({rel(png)})", "", *caption,
            f"Every point: [{rel(csv_path)}]({rel(csv_path)}).", ""]
  written = (*record, png) if drawn else tuple(record)
  return StudyResult(s, True, parts, tuple(lines), written)


def source_line(c: C.Collected, csv_rel: pathlib.Path) -> list[str]:
  """Where the finished points were read from, when the record gave some."""
  n, k = len(c.finished_names()), len(c.from_record)
  if not k:
    return []
  return [f"{k} of the {n} finished points are read from the record "
          f"(`{csv_rel}`), their run directories not holding a finished run.", ""]


def study_verdicts(results: list[StudyResult]) -> list[str]:
  """The words of the parts that enter the verdict and ran."""
  return [p.word for r in results for p in r.parts
          if p.part.verdict and p.verdict is not None]

