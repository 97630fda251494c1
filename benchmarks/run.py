"""``python -m benchmarks.run [--only NAME[,NAME]] [--quick]``: runs the
benchmarks (all, or those named), prints each one's tables and rewrites its
section of BENCHMARKS.md: the subsection of this kind of machine
(``sections.py``), with the command, the machine, JAX's version and the
date.

``--quick`` runs tiny shapes and a step or two (the tests use it); its
figures mean nothing, so it writes BENCHMARKS.md only when ``--out`` names
a file. ``--no-write`` only prints. A run that measured nothing (every case
skipped, e.g. for memory) leaves an existing subsection as it was.
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import sys
import time

from tqdm import tqdm

from benchmarks import machine, sections
from benchmarks.registry import BENCHMARKS
from benchmarks.report import Result

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "BENCHMARKS.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m benchmarks.run",
                              description=__doc__.splitlines()[0])
  p.add_argument("--only", default="",
                 help=f"comma-separated names of: {', '.join(BENCHMARKS)}")
  p.add_argument("--quick", action="store_true",
                 help="tiny shapes, a step or two (checks, not measurements)")
  p.add_argument("--out", type=pathlib.Path, default=None,
                 help="markdown file to rewrite (default: BENCHMARKS.md; with "
                      "--quick, none)")
  p.add_argument("--no-write", action="store_true", help="only print")
  a = p.parse_args(argv)
  names = [n.strip() for n in a.only.split(",") if n.strip()] or list(BENCHMARKS)
  unknown = [n for n in names if n not in BENCHMARKS]
  if unknown:
    p.error(f"--only: unknown benchmark(s) {', '.join(unknown)}; "
            f"known: {', '.join(BENCHMARKS)}")
  a.names = names
  if a.out is None and not a.quick:
    a.out = DEFAULT_OUT
  if a.no_write:
    a.out = None
  return a


def command(argv: list[str]) -> str:
  return " ".join(["python -m benchmarks.run"] + [shlex.quote(x) for x in argv])


def run_one(name: str, quick: bool) -> tuple[Result, float]:
  t0 = time.perf_counter()
  result = BENCHMARKS[name].run(quick=quick)
  return result, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  a = parse_args(argv)
  kind, info = machine.machine_kind(), machine.describe()
  print(f"{info['machine']}; {info['jax']}; {info['date']}")
  start = time.perf_counter()
  for name in tqdm(a.names, desc="benchmarks", disable=len(a.names) < 2):
    result, wall = run_one(name, a.quick)
    tqdm.write(result.printed() + "\n")
    if a.out is not None and not result.measured and a.out.exists() and \
        sections.has_subsection(a.out.read_text(), name, kind):
      tqdm.write(f"section '{name}' ({kind}) of {a.out} left as it was: this "
                 "run measured nothing to replace it with")
    elif a.out is not None:
      sections.update_file(a.out, name, result.description, kind,
                           result.body(command(argv), info, wall))
      tqdm.write(f"wrote section '{name}' ({kind}) of {a.out}")
  print(f"all done in {time.perf_counter() - start:,.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
