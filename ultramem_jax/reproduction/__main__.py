"""python -m ultramem_jax.reproduction run|report|commands

    run N [key=value ...]     runs the sweeps of claim N (1-4) with the
                              sweep tool (`python -m ultramem_jax.sweep run
                              FILE` for each of its files; the same
                              command again resumes); options after `--`
                              go to the sweep tool (e.g. -- --backend ray)
    report --out RESULTS.md   RESULTS.md from the sweeps' run directories
                              and the record in results/ beside it (read
                              for points whose run directories are gone,
                              written back with every point it held): per
                              claim a table, a PNG, the verdict; claims
                              without runs say "not run" with the command
    commands [key=value ...]  prints the sweep commands of every claim

--at_scale applies each sweep's accelerator overrides (claims.py) and
uses runs/sweeps_at_scale/<name> unless --sweeps_root is given, and
keeps its record and PNGs in results/at_scale/;
--sweeps_root DIR puts every sweep at DIR/<name>. key=value overrides
(anywhere on the line) go to every point of every sweep (they change the points' names, as with
the sweep tool, so report needs the same ones as run). Exit status 2 for a
bad sweep file or override (nothing run or written).
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import sys

from ultramem_jax.config import ConfigError
from ultramem_jax.reproduction.claims import CLAIMS
from ultramem_jax.reproduction.collect import collect
from ultramem_jax.reproduction.document import results_markdown, study_overrides
from ultramem_jax.sweep.__main__ import main as sweep_main
from ultramem_jax.sweep.execute import portable
from ultramem_jax.sweep.report import WITH_NUMBERS

REPO = pathlib.Path(__file__).resolve().parents[2]
AT_SCALE_ROOT = "runs/sweeps_at_scale"


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m ultramem_jax.reproduction", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  for name in ("run", "report", "commands"):
    p = sub.add_parser(name)
    p.add_argument("--at_scale", action="store_true",
                   help="the accelerator overrides of each sweep (claims.py)")
    p.add_argument("--sweeps_root", type=pathlib.Path, default=None,
                   help="each sweep's directory becomes DIR/<name>")
  run = sub.choices["run"]
  run.add_argument("claim", type=int, choices=[c.number for c in CLAIMS])
  run.add_argument("--missing", action="store_true",
                   help="only the points the record (--results) does not hold as finished")
  run.add_argument("--results", type=pathlib.Path, default=None,
                   help="the record's folder (default: results/ of the repository, "
                        "results/at_scale/ with --at_scale)")
  report = sub.choices["report"]
  report.add_argument("--out", type=pathlib.Path, required=True,
                      help="the markdown file (PNGs and CSVs go to results/ beside it)")
  report.add_argument("--claims", default=None,
                      help="comma-separated claim numbers (default: all, and claim 5)")
  return parser


def _root(args) -> pathlib.Path | None:
  if args.sweeps_root is not None:
    return args.sweeps_root.resolve()
  return (REPO / AT_SCALE_ROOT) if args.at_scale else None


def _sweep_argv(study, args, overrides: list[str], passthrough: list[str]) -> list[str]:
  argv = ["run", str(REPO / study.sweep),
          *study_overrides(study, overrides, args.at_scale)]
  root = _root(args)
  if root is not None:
    argv += ["--sweep_dir", str(root / pathlib.Path(study.sweep).stem)]
  return argv + passthrough


def _record_dir(args) -> pathlib.Path:
  if args.results is not None:
    return args.results.resolve()
  return REPO / ("results/at_scale" if args.at_scale else "results")


def _missing(study, args) -> list[str]:
  """The study's points finished neither in their run directories nor in
  the record."""
  c = collect(study, REPO, study_overrides(study, args.overrides, args.at_scale),
              _root(args), _record_dir(args))
  return [r["name"] for r in c.rows if r["state"] not in WITH_NUMBERS]


def _run(args, passthrough: list[str]) -> int:
  claim = next(c for c in CLAIMS if c.number == args.claim)
  if args.missing and "--only" in passthrough:
    print("error: --missing chooses the points itself; drop the sweep tool's --only",
          file=sys.stderr)
    return 2
  status = 0
  for study in claim.studies:
    if study.accelerator and not args.at_scale:
      print(f"skipping {study.sweep}: sized for an accelerator (--at_scale runs it)",
            file=sys.stderr)
      continue
    extra = list(passthrough)
    if args.missing:
      names = _missing(study, args)
      if not names:
        print(f"{study.sweep}: every point is finished (run directories or "
              f"{portable(_record_dir(args))}); nothing to run", file=sys.stderr)
        continue
      extra = ["--only", ",".join(names), *extra]
    rc = sweep_main(_sweep_argv(study, args, args.overrides, extra))
    if rc >= 2:
      return rc
    status = max(status, rc)
  return status


def _commands(args) -> int:
  for claim in CLAIMS:
    print(f"# claim {claim.number}: {claim.title}")
    for study in claim.studies:
      argv = [portable(pathlib.Path(a)) if a.startswith("/") else a
              for a in _sweep_argv(study, args, args.overrides, [])]
      print("python -m ultramem_jax.sweep " + " ".join(shlex.quote(a) for a in argv))
  return 0


def _report(args, parser, line: str) -> int:
  claims = CLAIMS
  if args.claims:
    wanted = {int(x) for x in args.claims.split(",") if x.strip()}
    unknown = wanted - {c.number for c in CLAIMS} - {5}
    if unknown:
      parser.error(f"--claims: no claim {sorted(unknown)}; claims are 1-5")
    claims = tuple(c for c in CLAIMS if c.number in wanted)
  decode = not args.claims or 5 in wanted
  text, files = results_markdown(REPO, args.out, args.overrides, _root(args),
                                 claims, decode=decode, command_line=line,
                                 scaled=args.at_scale)
  args.out.write_text(text)
  print(f"written: {args.out}" + "".join(f", {f}" for f in files), file=sys.stderr)
  return 0


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  passthrough: list[str] = []
  if "--" in argv:
    i = argv.index("--")
    argv, passthrough = argv[:i], argv[i + 1:]
  # dotted.key=value anywhere on the line (before or after the options).
  overrides = [a for a in argv if "=" in a and not a.startswith("-")]
  parser = _parser()
  args = parser.parse_args([a for a in argv if a not in overrides])
  args.overrides = overrides
  try:
    if args.command == "run":
      return _run(args, passthrough)
    if args.command == "commands":
      return _commands(args)
    return _report(args, parser, "python -m ultramem_jax.reproduction "
                   + shlex.join(argv + (["--", *passthrough] if passthrough else [])))
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
