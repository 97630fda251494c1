"""python -m ultramem_jax.sweep plan|run|report FILE [key=value ...]

    plan FILE     the points, their inspect counts (activated and total
                  parameters, FLOPs per token, training tokens and FLOPs)
                  and their state; refuses the sweep if any point's config
                  is invalid, naming the point and the key
    run FILE      runs every point not done yet: --backend local (one after
                  another, or --parallel N), ray (a Ray task per point;
                  --address of a cluster, else a local one of --num_cpus),
                  or print (one shell command per point, --template to wrap
                  it); the same command again resumes
    report FILE   <sweep_dir>/report/: results.csv, results.md, PNG plots

Overrides (dotted.key=value) apply to every point, like the file's
`overrides` (they change the points' names). --sweep_dir replaces the
file's sweep_dir.

Exit status: 0 when every point is done (run) or the command succeeded, 1
when a point failed (the others ran), 2 for a bad sweep file, a point whose
config is invalid or bad arguments (nothing was run), 128 + the signal's
number when SIGTERM/SIGINT stopped the run (the trainings saved a
checkpoint; the same command resumes).
"""

from __future__ import annotations

import argparse
import sys

from ultramem_jax.config import ConfigError
from ultramem_jax.sweep import plan as plan_mod
from ultramem_jax.sweep import print_backend
from ultramem_jax.sweep.execute import job_of, job_state
from ultramem_jax.sweep.local import SweepStopped, run_local
from ultramem_jax.sweep.points import resolve, with_overrides
from ultramem_jax.sweep.ray_backend import run_ray
from ultramem_jax.sweep.report import REPORT_DIR, write_report
from ultramem_jax.sweep.spec import read_sweep


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m ultramem_jax.sweep", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  for name in ("plan", "run", "report"):
    p = sub.add_parser(name)
    p.add_argument("file", help="the sweep file (configs/sweeps/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value for every point")
    p.add_argument("--sweep_dir", default=None,
                   help="where the points' run directories go (default: the "
                        "file's sweep_dir, else runs/sweeps/<name>)")
    if name in ("plan", "report"):
      p.add_argument("--devices", type=int, default=None,
                     help="devices for inspect's mesh (default: those JAX sees)")
  p = sub.choices["run"]
  p.add_argument("--backend", choices=("local", "ray", "print"), default="local")
  p.add_argument("--parallel", type=int, default=1, metavar="N",
                 help="local: points at a time (default 1)")
  p.add_argument("--address", default=None,
                 help="ray: a running cluster (default: start a local one)")
  p.add_argument("--num_cpus", type=int, default=None,
                 help="ray: CPUs of the local cluster (default: all)")
  p.add_argument("--template", default=None,
                 help="print: a line around each command, with {name}, "
                      "{run_dir}, {index}, {command}, {quoted}")
  p.add_argument("--python", default="python",
                 help="print: the python of the commands (default: python)")
  p.add_argument("--repo", default=None,
                 help="print: the checkout's path where the commands run "
                      "(default: this one)")
  p.add_argument("--only", default=None,
                 help="comma-separated point names to run (default: all)")
  p.add_argument("--no_progress", action="store_true", help="no progress bars")
  return parser


def _points(args):
  sweep = with_overrides(read_sweep(args.file, args.sweep_dir), args.overrides)
  return sweep, resolve(sweep)


def _plan(args) -> int:
  sweep, points = _points(args)
  counted = plan_mod.counts(points, args.devices)
  jobs = [job_of(p, sweep) for p in points]
  print(f"sweep {sweep.name}: {len(points)} points in {sweep.sweep_dir}")
  print(plan_mod.table(points, counted, {j.name: job_state(j) for j in jobs}))
  return 0


def _run(args, parser) -> int:
  sweep, points = _points(args)
  if args.only:
    names = {n.strip() for n in args.only.split(",") if n.strip()}
    unknown = sorted(names - {p.name for p in points})
    if unknown:
      parser.error(f"--only: no point named {', '.join(unknown)}")
    points = [p for p in points if p.name in names]
  if args.parallel < 1:
    parser.error(f"--parallel: got {args.parallel}; expected at least 1")
  jobs = [job_of(p, sweep) for p in points]
  if args.backend == "print":
    if args.template:
      try:
        print_backend.check_template(args.template)
      except ValueError as e:
        parser.error(str(e))
    todo = [j for j in jobs if job_state(j) != "done"]
    if len(todo) < len(jobs):
      print(f"# {len(jobs) - len(todo)} point(s) done, not printed", file=sys.stderr)
    for line in print_backend.print_lines(todo, args.template, args.python,
                                         args.repo):
      print(line)
    return 0
  print(f"sweep {sweep.name}: {len(jobs)} points in {sweep.sweep_dir} "
        f"({args.backend})", flush=True)
  try:
    if args.backend == "ray":
      outcome = run_ray(jobs, sweep.resources, sweep.retries, args.address,
                        args.num_cpus, progress=not args.no_progress)
    else:
      outcome = run_local(jobs, args.parallel, progress=not args.no_progress)
  except SweepStopped as e:
    print(f"sweep stopped by {e}; run the same command to resume",
          file=sys.stderr)
    return 128 + e.signum
  failed = {n: m for n, m in outcome.items() if m not in ("done", "skipped")}
  done = sum(m == "done" for m in outcome.values())
  skipped = sum(m == "skipped" for m in outcome.values())
  print(f"sweep {sweep.name}: {done} run, {skipped} done before, "
        f"{len(failed)} failed")
  for message in failed.values():
    print(f"failed: {message}", file=sys.stderr)
  return 1 if failed else 0


def _report(args) -> int:
  sweep, points = _points(args)
  counted = plan_mod.counts(points, args.devices)
  jobs = [job_of(p, sweep) for p in points]
  written = write_report(sweep.sweep_dir / REPORT_DIR, sweep.name, points, jobs,
                         counted)
  print((sweep.sweep_dir / REPORT_DIR / "results.md").read_text())
  print("written: " + ", ".join(map(str, written)), file=sys.stderr)
  return 0


def main(argv: list[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  try:
    if args.command == "plan":
      return _plan(args)
    if args.command == "run":
      return _run(args, parser)
    return _report(args)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
