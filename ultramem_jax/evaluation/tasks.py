"""eval.py tasks: exact-match accuracy on held-out instances of the task suite.

For each task (``--tasks``, default the tasks of the run's ``data.tasks``,
or all five for a run trained on text) and each length (``--lengths``,
default ``data.seq_len`` and twice it), ``--n`` held-out instances (split
"eval" of ``--seed``: a stream the training rows never draw from) of at most
``length + 1`` tokens are generated with the run's tokenizer and task
parameters (``data.task_params``, changed per task with ``--params
task.key=value``). The model reads each instance with teacher forcing, one
row of ``length`` tokens, and its greedy (argmax) prediction at every answer
token is compared with the answer: an answer counts as correct when all its
tokens are predicted (exact match). Only answer tokens are scored.

The size parameters a run trained with stay as trained at every length;
those left at their default (None: as many as fit) fill each length, so a
longer length also means more pairs, demonstrations or filler. Use
``--params mqar.num_pairs=null`` (say) to make a fixed-size task fill the
longer lengths.

Accuracy is aggregated per task by length and by the task's own buckets
(needle depth, number of demonstrations, round, overwritten, fact form, ...),
each with its chance level: the probability that a guess drawn uniformly
from the answer alphabet matches (``|values| ** -answer_len``). The needle
task's filler is the validation text of the run's ``data.source``.

Written to ``OUT/tasks_step<N>.json`` and ``.md`` with PNG plots of accuracy
by length per task (``tasks_step<N>_<task>_length.png``), and by depth for
the needle, pairs for MQAR, demonstrations for the token mapping and round
for the overwrites (``..._<task>_<bucket>.png``, one line per length);
OUT is ``--out``, else ``RUN/eval``.

The scoring is :mod:`ultramem_jax.evaluation.task_scores`, the report
:mod:`ultramem_jax.evaluation.task_report`; this module is the command.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any, Mapping, Sequence

import jax
import yaml

from ultramem_jax.config import ConfigError
from ultramem_jax.data.pipeline import prepare_data
from ultramem_jax.data.task_data import filler_tokens
from ultramem_jax.evaluation.restore import (check_out_dir, load_run_config,
                                             restore_run)
from ultramem_jax.evaluation.task_report import markdown, write_report
from ultramem_jax.evaluation.task_scores import (
    LENGTH, evaluate_tasks, model_predictor)
from ultramem_jax.tasks import TASKS, TokenSpace, parse_mixture


def add_parser(sub) -> None:
  p = sub.add_parser(
      "tasks", help="exact-match accuracy on held-out task instances",
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--run_dir", type=pathlib.Path, required=True,
                 help="a training run's directory")
  p.add_argument("--step", type=int, default=None,
                 help="checkpoint step (default: the latest)")
  p.add_argument("--tasks", default=None,
                 help="comma-separated task names (default: the run's "
                      "data.tasks, or all tasks for a run trained on text)")
  p.add_argument("--lengths", default=None,
                 help="comma-separated sequence lengths (default: data.seq_len "
                      "and twice it)")
  p.add_argument("--n", type=int, default=200,
                 help="instances per task and length (default 200)")
  p.add_argument("--seed", type=int, default=0,
                 help="seed of the held-out instances (default 0)")
  p.add_argument("--params", action="append", default=[],
                 metavar="TASK.KEY=VALUE",
                 help="a task parameter for this evaluation (YAML value; "
                      "repeatable), e.g. mqar.num_pairs=8 or niah.depth=null")
  p.add_argument("--out", type=pathlib.Path, default=None,
                 help="output directory (default: RUN/eval)")
  p.add_argument("--no_progress", action="store_true", help="no progress bar")
  p.add_argument("overrides", nargs="*",
                 help="dotted.key=value for the run's config (e.g. mesh.data=1)")


# ----------------------------------------------------------------------------- arguments

def parse_tasks(text: str) -> list[str]:
  """Comma-separated registered task names."""
  names = [n.strip() for n in text.split(",") if n.strip()]
  if not names:
    raise ConfigError(f"--tasks: got {text!r}; expected comma-separated task "
                      f"names ({', '.join(TASKS)})")
  for name in names:
    if name not in TASKS:
      raise ConfigError(f"--tasks: unknown task {name!r}; known: "
                        f"{', '.join(TASKS)}")
  if len(set(names)) != len(names):
    raise ConfigError(f"--tasks: got {text!r}; a task is named twice")
  return names


def parse_lengths(text: str) -> list[int]:
  """Comma-separated positive sequence lengths, ascending."""
  try:
    lengths = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    lengths = []
  if not lengths or min(lengths) < 1:
    raise ConfigError(f"--lengths: got {text!r}; expected comma-separated "
                      "positive sequence lengths, e.g. 128,256")
  return sorted(set(lengths))


def parse_params(items: Sequence[str], base: Mapping[str, Mapping[str, Any]]
                 ) -> dict[str, dict[str, Any]]:
  """``task.key=value`` items (YAML values) over the run's task parameters."""
  out = {name: dict(p) for name, p in base.items()}
  for item in items:
    key, eq, raw = item.partition("=")
    name, dot, param = key.strip().partition(".")
    if not (eq and dot and name and param):
      raise ConfigError(f"--params: got {item!r}; expected TASK.KEY=VALUE, "
                        "e.g. mqar.num_pairs=8")
    if name not in TASKS:
      raise ConfigError(f"--params {item!r}: unknown task {name!r}; known: "
                        f"{', '.join(TASKS)}")
    try:
      value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
      value = raw
    out.setdefault(name, {})[param] = value
  return out


# ----------------------------------------------------------------------------- command

def run(args: argparse.Namespace) -> int:
  if args.n < 1:
    raise ConfigError(f"--n: got {args.n}; expected at least 1 instance")
  cfg = load_run_config(args.run_dir, args.overrides)  # a bad directory fails fast
  check_out_dir(args.out, args.run_dir)  # before anything is evaluated
  trained = ([n for n in parse_mixture(cfg.data.tasks, extra=("text",))
              if n != "text"] if cfg.data.tasks else [])
  tasks = parse_tasks(args.tasks) if args.tasks else (trained or list(TASKS))
  lengths = (parse_lengths(args.lengths) if args.lengths
             else [cfg.data.seq_len, 2 * cfg.data.seq_len])
  params = parse_params(args.params, cfg.data.task_params)

  run_ = restore_run(args.run_dir, args.step, args.overrides)
  space = TokenSpace.for_tokenizer(run_.tokenizer)
  filler = None
  if "niah" in tasks:
    filler = filler_tokens(prepare_data(run_.cfg.data, run_.tokenizer).val_rows)
  predict, rows_for = model_predictor(run_)
  scored = evaluate_tasks(predict, tasks, lengths, args.n, args.seed, space,
                          params, filler, rows_for, not args.no_progress)
  result = {"run_dir": str(args.run_dir),
            "checkpoint": str(args.run_dir / "checkpoints" / str(run_.step)),
            "step": run_.step, "trained_tasks": cfg.data.tasks,
            "trained_seq_len": cfg.data.seq_len, "n": args.n,
            "seed": args.seed, "lengths": lengths,
            "token_space": space.describe(), **scored}
  if jax.process_index() == 0:
    _publish(args.out or args.run_dir / "eval", result)
  return 0


def _publish(out: pathlib.Path, result: dict[str, Any]) -> None:
  """Writes the report under `out`, prints the accuracy and chance per task
  and length as JSON (stdout) and the markdown (stderr)."""
  written = write_report(out, result)
  summary = {name: {str(r[LENGTH]): {"accuracy": r["accuracy"],
                                     "chance": r["chance"]}
                    for r in t["by"][LENGTH]}
             for name, t in result["tasks"].items()}
  print(json.dumps(summary, indent=2))
  print(markdown(result), file=sys.stderr)
  print("written: " + ", ".join(map(str, written)), file=sys.stderr)
