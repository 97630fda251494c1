"""eval.py harness: a run scored by lm-evaluation-harness.

    eval.py harness --run_dir RUN --tasks paper|NAME,... [--limit N]
        [--num_fewshot K] [--batch_size B] [--step S] [--include_path DIR]
        [--max_gen_toks 256] [--out DIR] [--no_progress] [key=value ...]

The run's checkpoint (the latest unless ``--step``) becomes an
``lm_eval`` model (``evaluation/harness_model.py``) and the harness runs
the tasks: ``--tasks paper`` is the nine tasks of the paper's Table 3
(``evaluation/harness_tasks.py``), other names are the harness's tasks,
groups or tags, or tasks defined by YAML files in ``--include_path``
directories. The tasks and their datasets are loaded before the checkpoint
is restored; a dataset that cannot be reached (no network) is an error
naming the task and the dataset. ``--limit`` takes the first N documents
of each task (a fraction when below 1); ``--num_fewshot`` overrides each
task's number of examples in the prompt.

Written to ``OUT/harness_step<N>_<tasks>[_<K>shot][_limit<L>].json`` (the
harness's results) and ``.md`` (one row per task: the metric the paper
reports and its standard error; ``evaluation/harness_report.py``), never
over earlier results; OUT is ``--out``, else ``RUN/eval``. The table is
printed too.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
from lm_eval.evaluator import simple_evaluate

from ultramem_jax.config import ConfigError
from ultramem_jax.evaluation.harness_model import UltraMemLM
from ultramem_jax.evaluation.harness_report import (markdown, report_stem,
                                                    table_rows, write_report)
from ultramem_jax.evaluation.harness_tasks import (PAPER_TASKS, load_tasks,
                                                   parse_tasks, task_manager)
from ultramem_jax.evaluation.restore import check_out_dir, load_run_config
from ultramem_jax.training.run_dir import RunDir


def add_parser(sub) -> None:
  p = sub.add_parser(
      "harness", help="downstream tasks with lm-evaluation-harness",
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--run_dir", required=True, type=pathlib.Path)
  p.add_argument("--step", type=int, default=None,
                 help="checkpoint step (default: the latest)")
  p.add_argument("--tasks", required=True,
                 help="comma-separated harness task names, or 'paper' for "
                      "the nine tasks of Table 3: " + ", ".join(PAPER_TASKS))
  p.add_argument("--include_path", type=pathlib.Path, action="append",
                 default=[], help="a directory of task YAML files (repeatable)")
  p.add_argument("--limit", type=float, default=None,
                 help="documents per task (a fraction of them when < 1)")
  p.add_argument("--num_fewshot", type=int, default=None,
                 help="examples in each prompt (default: each task's own)")
  p.add_argument("--batch_size", type=int, default=8,
                 help="rows per forward pass")
  p.add_argument("--max_gen_toks", type=int, default=256,
                 help="tokens generated when a generation task gives no limit")
  p.add_argument("--out", type=pathlib.Path, default=None,
                 help="output directory (default: RUN/eval)")
  p.add_argument("--no_progress", action="store_true", help="no progress bars")
  p.add_argument("overrides", nargs="*", help="dotted.key=value")


def check_args(args: argparse.Namespace) -> list[str]:
  """The task names; ConfigError for values out of range."""
  names = parse_tasks(args.tasks)
  if args.limit is not None and args.limit <= 0:
    raise ConfigError(f"--limit: got {args.limit:g}; must be > 0")
  if args.num_fewshot is not None and args.num_fewshot < 0:
    raise ConfigError(f"--num_fewshot: got {args.num_fewshot}; must be >= 0")
  if args.batch_size < 1:
    raise ConfigError(f"--batch_size: got {args.batch_size}; must be >= 1")
  if args.max_gen_toks < 1:
    raise ConfigError(f"--max_gen_toks: got {args.max_gen_toks}; must be >= 1")
  return names


def evaluate_harness(lm: UltraMemLM, tasks: list, manager, num_fewshot,
                     limit) -> dict:
  """The harness's results for built `tasks` (``harness_tasks.load_tasks``)."""
  if limit is not None and limit >= 1:
    limit = int(limit)
  return simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot,
                         limit=limit, task_manager=manager, log_samples=False)


def run(args: argparse.Namespace) -> int:
  names = check_args(args)
  load_run_config(args.run_dir, args.overrides)   # a bad directory fails fast
  steps = RunDir(args.run_dir).checkpoint_steps()
  if args.step is not None and args.step not in steps:
    raise ConfigError(f"--step: got {args.step}; the run has checkpoints at "
                      f"steps {steps}")
  check_out_dir(args.out, args.run_dir)
  manager = task_manager(names, args.include_path)
  tasks = load_tasks(manager, names)     # datasets, before the checkpoint
  lm = UltraMemLM.from_run(args.run_dir, args.step, args.overrides,
                           batch_size=args.batch_size,
                           max_gen_toks=args.max_gen_toks,
                           progress=not args.no_progress)
  results = evaluate_harness(lm, tasks, manager, args.num_fewshot, args.limit)
  if jax.process_index() != 0 or results is None:
    return 0
  step = lm.info["step"]
  rows = table_rows(results, names)
  shots = ("" if args.num_fewshot is None else f", {args.num_fewshot}-shot")
  limit = "" if args.limit is None else f", --limit {args.limit:g}"
  text = markdown(rows, f"lm-evaluation-harness on `{args.run_dir}` step "
                        f"{step}{shots}{limit} (window {lm.window} tokens).")
  stem = report_stem(args.out or args.run_dir / "eval", step, names,
                     list(names) == list(PAPER_TASKS), args.num_fewshot,
                     args.limit)
  results["ultramem_jax_table"] = rows
  written = write_report(stem, results, text)
  print(text, end="")
  print("written: " + ", ".join(map(str, written)), file=sys.stderr)
  return 0
