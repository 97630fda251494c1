"""RESULTS.md: the verdict rule, a summary line per claim, each claim's
studies (``study_report.py``), claim 5 from inspect's decode formula and
the benchmarks' decode times, and "At scale": the same sweep files with
an accelerator's overrides and the exact commands."""

from __future__ import annotations

import pathlib

from ultramem_jax.reproduction import decode as D
from ultramem_jax.reproduction import figures
from ultramem_jax.reproduction.claims import (CLAIMS, DECODE_BATCHES,
                                              DECODE_PAIRS, Claim)
from ultramem_jax.reproduction.collect import collect
from ultramem_jax.reproduction.study_report import (NOT_RUN, StudyResult,
                                                    commands, study_report,
                                                    study_verdicts)
from ultramem_jax.reproduction.verdict import (NOT_REPRODUCED, REPRODUCED,
                                               combine)

RULE = """\
The verdict rule was fixed before any run (`ultramem_jax/reproduction/verdict.py`,
[docs/reproduction.md](docs/reproduction.md)): a difference between two
contenders counts when |mean A - mean B| > 2 x the pooled sample standard
deviation of their seeds, with at least 2 seeds each. "A < B" is
**reproduced** when the difference counts in the paper's direction,
**not reproduced** when it counts in the other, and **inconclusive at this
scale** otherwise; a parity claim "A <= B" is reproduced unless A is worse by
a counted difference. A third seed is due where a difference does not count.
A claim of several comparisons is not reproduced if one is, reproduced if all
are."""


def claim_word(results: list[StudyResult]) -> str:
  words = study_verdicts(results)
  if not words:
    return NOT_RUN
  word = combine(words)
  missing = [r.study.label for r in results if not r.ran]
  return word + (f" (from the studies that ran; not run: {', '.join(missing)})"
                 if missing else "")


def study_overrides(study, overrides: list[str], scaled: bool) -> list[str]:
  """The study's at-scale overrides (when `scaled`), then the command line's."""
  return (list(study.at_scale) if scaled else []) + list(overrides)


def claim_section(claim: Claim, repo, assets, out_dir, overrides, sweeps_root,
                  out_name, scaled: bool = False
                  ) -> tuple[list[str], str, list[pathlib.Path]]:
  run = f"python -m ultramem_jax.reproduction run {claim.number}" + (
      " --at_scale" if scaled else "") + "".join(f" {o}" for o in overrides)
  lines = [f"## Claim {claim.number}: {claim.title}", "", f"Paper: {claim.paper}", "",
           f"All of its sweeps: `{run}`.", ""]
  results, files = [], []
  for study in claim.studies:
    ov = study_overrides(study, overrides, scaled)
    c = collect(study, repo, ov, sweeps_root, assets)
    cmds = commands(study, ov, str(sweeps_root) if sweeps_root else None, out_name)
    r = study_report(c, assets, out_dir, cmds)
    results.append(r)
    lines += list(r.lines)
    files += list(r.files)
  word = claim_word(results)
  lines += [f"**Verdict, claim {claim.number}: {word}.**", ""]
  return lines, word, files


def _mb(x: float) -> str:
  return f"{x / 1e6:,.1f}"


def decode_section(repo: pathlib.Path, assets: pathlib.Path, out_dir: pathlib.Path,
                   pairs=DECODE_PAIRS, batches=DECODE_BATCHES,
                   benchmarks: pathlib.Path | None = None
                   ) -> tuple[list[str], str, list[pathlib.Path]]:
  """Claim 5: the formula's bytes (computed here, deterministic) and the
  decode benchmark's times (read from BENCHMARKS.md, or 'not run')."""
  rows = D.decode_bytes(pairs, repo, batches)
  png = figures.decode_bytes(assets / "claim5_decode_bytes.png", rows)
  lines = ["## Claim 5: Memory access", "",
           "Paper: at equal activated parameters UltraMemV2 reads far less "
           "memory per decode step than the MoE once a batch touches many "
           "experts.", "",
           "Parameter bytes one decode step reads, by inspect's formula "
           "(`python -m ultramem_jax.inspect CONFIG --batch "
           f"{','.join(map(str, batches))}`; `ultramem_jax/decode_cost.py`), float32 "
           "parameters, computed when this file was generated:", "",
           "| size | batch | MoE param MB | UltraMemV2 param MB | MoE / UltraMemV2 | KV cache MB (context) |",
           "|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['size']} | {r['batch']} | {_mb(r['moe_param_bytes'])} | "
                 f"{_mb(r['v2_param_bytes'])} | {r['ratio']:.2f}x | "
                 f"{_mb(r['kv_cache_bytes'])} ({r['context']}) |")
  rel = png.relative_to(out_dir) if png.is_relative_to(out_dir) else png
  lines += ["", f"![decode bytes]({rel})", ""]
  big = [r for r in rows if r["batch"] >= 8]
  word = REPRODUCED if big and all(r["ratio"] > 1 for r in big) else NOT_REPRODUCED
  lines += ["Verdict on the bytes (a formula, no seeds: the rule's spread is "
            "zero): UltraMemV2 reads fewer parameter bytes than the MoE at "
            "every size for every batch of 8 or more: "
            f"**{word}**." if word == REPRODUCED else
            "Verdict on the bytes: at some size and batch of 8 or more "
            f"UltraMemV2 does not read fewer bytes: **{word}**.", ""]
  bench = D.benchmark_times(benchmarks or repo / "BENCHMARKS.md")
  lines += ["Decode times of the 227M pair, from BENCHMARKS.md's decode "
            "section (`python -m benchmarks.run --only decode` writes it; the "
            "numbers are quoted as measured there):", ""]
  if not bench:
    lines += [f"**{NOT_RUN}**: BENCHMARKS.md has no decode measurement. Run "
              "`python -m benchmarks.run --only decode`.", ""]
  for m in bench or []:
    lines += [f"{m['machine']}: `{m['command']}`; {m['about']}", ""]
    keys = ["dtype", "batch", "MoE ms", "UltraMemV2 ms", "UltraMemV2 speed-up over MoE"]
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in m["rows"]:
      lines.append("| " + " | ".join(r.get(k, "-") for k in keys) + " |")
    lines.append("")
  lines += ["Measured times exist for the 227M pair only; at the trained small "
            "sizes the section gives the formula's bytes.", "",
            f"**Verdict, claim 5: {word}** (on the bytes; the times are "
            "reported as measured).", ""]
  return lines, word, [png]


def at_scale(claims, out_name: str) -> list[str]:
  """The sweep files with an accelerator's overrides, and the commands."""
  lines = ["## At scale", "",
           "The same sweep files on an accelerator, with each study's "
           "overrides from `ultramem_jax/reproduction/claims.py`: batch 256 "
           "instead of 32 and 3,000 steps (98.3M tokens per run) for the text "
           "sweeps, 48,000 steps of 256 x 32 task tokens for claim 3. "
           "`--at_scale` applies them and puts the runs under "
           "`runs/sweeps_at_scale/`. `data.source` must name a corpus of at "
           "least that many tokens (the wiki corpus holds 1.35M): give it to "
           "every command, `report` included, since overrides name the points. "
           "`configs/sweeps/claim1_parity_227m.yaml` (the paper's 227M "
           "configs, 1.0B tokens per run) is sized for an accelerator as it "
           "stands.", "", "```bash"]
  for claim in claims:
    lines.append(f"python -m ultramem_jax.reproduction run {claim.number} "
                 "--at_scale data.source=/data/corpus")
  lines += ["python -m ultramem_jax.reproduction report --at_scale "
            "--out RESULTS_at_scale.md data.source=/data/corpus",
            "```", "", "What `--at_scale` runs, sweep by sweep:", "", "```bash"]
  for claim in claims:
    for s in claim.studies:
      extra = " ".join(s.at_scale + ("data.source=/data/corpus",))
      dest = f" --sweep_dir runs/sweeps_at_scale/{pathlib.Path(s.sweep).stem}"
      lines.append(f"python -m ultramem_jax.sweep run {s.sweep} {extra}{dest}")
  lines += ["```", "", "No accelerator run is recorded in this file.", ""]
  return lines


def results_markdown(repo: pathlib.Path, out: pathlib.Path,
                     overrides: list[str] = (), sweeps_root: pathlib.Path | None = None,
                     claims=CLAIMS, decode: bool = True, decode_kwargs=None,
                     command_line: str = "", scaled: bool = False
                     ) -> tuple[str, list[pathlib.Path]]:
  """The whole document and the files written beside it (under
  ``<out's folder>/results/``)."""
  out_dir = out.resolve().parent
  assets = out_dir / ("results/at_scale" if scaled else "results")
  head = ["# Results: the paper's claims at this machine's scale", "",
          f"Generated by `{command_line or 'python -m ultramem_jax.reproduction report --out ' + out.name}` "
          "from the sweeps' run directories and, for points whose run "
          "directories are gone, from the record under results/ (a CSV of "
          "every point, its loss curve and its accuracy by length); do not "
          "edit by hand. A claim whose runs are missing says **not run** and "
          "gives its command.", "",
          RULE, ""]
  body, summary, files = [], [], []
  for claim in claims:
    lines, word, written = claim_section(claim, repo, assets, out_dir,
                                         list(overrides), sweeps_root, out.name,
                                         scaled)
    body += lines
    files += written
    summary.append((f"{claim.number}. {claim.title}", word))
  if decode:
    lines, word, written = decode_section(repo, assets, out_dir, **(decode_kwargs or {}))
    body += lines
    files += written
    summary.append(("5. Memory access", word))
  table = ["| claim | verdict |", "|---|---|"] + [f"| {c} | {w} |" for c, w in summary]
  text = "\n".join(head + table + [""] + body + at_scale(claims, out.name))
  return text + "\n", files
