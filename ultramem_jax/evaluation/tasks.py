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

The model is called through a :data:`Predict` function (inputs -> argmax
predictions), so :func:`evaluate_tasks` scores any predictor the same way
(the tests pass the brute-force solvers and a uniform guesser).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ultramem_jax.config import ConfigError

# inputs int32 [B, T] -> next-token predictions int32 [B, T].
Predict = Callable[[np.ndarray], np.ndarray]

# Buckets reported per task besides length, and which get a plot.
BUCKETS: dict[str, tuple[str, ...]] = {
    "niah": ("depth",),
    "mqar": ("num_pairs",),
    "mqar_overwrite": ("round", "overwritten"),
    "token_mapping": ("n_demos", "shown"),
    "fact_retrieval": ("form",),
}
PLOTS: dict[str, tuple[str, str]] = {
    "niah": ("depth", "needle depth (0 = start of the haystack)"),
    "mqar": ("num_pairs", "key-value pairs in the context"),
    "token_mapping": ("n_demos", "demonstrations in the context"),
    "mqar_overwrite": ("round", "round"),
}
LENGTH = "seq_len"


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
  from ultramem_jax.tasks import TASKS  # noqa: PLC0415

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
  import yaml  # noqa: PLC0415

  from ultramem_jax.tasks import TASKS  # noqa: PLC0415

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


# ----------------------------------------------------------------------------- the model

def batch_rows(batch_size: int, trained_len: int, length: int,
               shards: int = 1) -> int:
  """Rows per forward pass at `length`: about the tokens of a training batch,
  a multiple of the mesh's batch shards."""
  rows = batch_size * trained_len // length // shards * shards
  return max(shards, rows)


def model_predictor(run) -> tuple[Predict, Callable[[int], int]]:
  """(predict, rows per call for a length) of a RestoredRun: one jitted
  forward pass per batch, greedy (argmax) next-token predictions at every
  position. `predict` pads a short batch to the full size with rows of 0;
  every process passes all rows and places its part on the mesh."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from ultramem_jax.parallel.distributed import batch_shard  # noqa: PLC0415
  from ultramem_jax.parallel.mesh import batch_sharding, use_mesh  # noqa: PLC0415
  from ultramem_jax.parallel.rules import batch_shards  # noqa: PLC0415
  from ultramem_jax.training.evaluate import shard_batch  # noqa: PLC0415

  cfg = run.cfg
  shards = batch_shards(run.mesh.shape)
  sharding = batch_sharding(run.mesh)
  replicated = jax.sharding.NamedSharding(run.mesh,
                                          jax.sharding.PartitionSpec())

  @jax.jit
  def forward(state, inputs):
    model, _ = nnx.merge(run.graphdef, state)
    preds = jnp.argmax(model(inputs), axis=-1).astype(jnp.int32)
    return jax.lax.with_sharding_constraint(preds, replicated)

  def rows_for(length: int) -> int:
    return batch_rows(cfg.data.batch_size, cfg.data.seq_len, length, shards)

  def predict(inputs: np.ndarray) -> np.ndarray:
    inputs = np.asarray(inputs, np.int32)
    n, length = inputs.shape
    size = rows_for(length)
    part, parts = batch_shard(sharding, size)
    mine = slice(part * size // parts, (part + 1) * size // parts)
    out = []
    with use_mesh(run.mesh):
      for start in range(0, n, size):
        chunk = inputs[start:start + size]
        pad = size - len(chunk)
        if pad:
          chunk = np.concatenate([chunk, np.zeros((pad, length), np.int32)])
        placed = shard_batch({"inputs": chunk[mine]}, sharding, size)
        preds = forward(run.state, placed["inputs"])
        out.append(np.asarray(preds.addressable_data(0))[:size - pad])
    return np.concatenate(out)

  return predict, rows_for


# ----------------------------------------------------------------------------- scoring

def _records(table: Mapping[tuple, Mapping[str, float]],
             names: Sequence[str]) -> list[dict[str, Any]]:
  return [{**dict(zip(names, key)), **stats} for key, stats in table.items()]


def evaluate_tasks(predict: Predict, tasks: Sequence[str],
                   lengths: Sequence[int], n: int, seed: int, space,
                   params: Mapping[str, Mapping[str, Any]] | None = None,
                   filler: np.ndarray | None = None,
                   rows_for: Callable[[int], int] | int = 64,
                   progress: bool = True) -> dict[str, Any]:
  """Scores `predict` on `n` held-out instances per task and length.

  Args:
    predict: inputs int32 [B, T] -> argmax predictions int32 [B, T] (a
      model's, or any stand-in).
    tasks: task names.
    lengths: sequence lengths T; instances take at most T + 1 tokens.
    n: instances per task and length.
    seed: the held-out stream's seed (split "eval").
    space: the TokenSpace of the model's tokenizer.
    params: per-task generator parameters.
    filler: tokenized text for the needle's haystack.
    rows_for: rows per `predict` call, or a function of the length.
    progress: show a progress bar (instances/s).

  Returns:
    ``{"tasks": {name: {"overall", "by": {bucket names: [records]},
    "answers_per_instance", "params"}}, "instances_per_sec"}``; a record
    holds the bucket values and ``n`` (answers), ``correct``,
    ``accuracy`` and ``chance``.
  """
  from tqdm.auto import tqdm  # noqa: PLC0415

  from ultramem_jax.tasks import (  # noqa: PLC0415
      TaskError, aggregate, collate, get_task, make_instances, score)

  params = params or {}
  objs = {}
  for name in tasks:
    try:
      objs[name] = get_task(name, **params.get(name, {}))
    except TaskError as e:
      raise ConfigError(f"--params: {e}") from None
  per_call = rows_for if callable(rows_for) else (lambda _: rows_for)
  total = len(tasks) * len(lengths) * n
  bar = tqdm(total=total, unit="inst", dynamic_ncols=True, mininterval=1.0,
             disable=not progress, leave=False, file=sys.stderr)
  result: dict[str, Any] = {"tasks": {}}
  t0 = time.perf_counter()
  try:
    for name, task in objs.items():
      instances, correct = [], []
      for length in lengths:
        bar.set_description(f"{name} @ {length}")
        try:
          insts = make_instances(task, n, length + 1, seed, space,
                                 split="eval", filler=filler)
        except TaskError as e:
          raise ConfigError(f"--lengths: task {name!r} at length {length}: "
                            f"{e} (see --params)") from None
        for inst in insts:
          inst.meta[LENGTH] = length
        size = per_call(length)
        for start in range(0, n, size):
          chunk = insts[start:start + size]
          rows = collate(chunk, length, space)
          preds = np.asarray(predict(rows.inputs))
          correct += score(chunk, preds)
          bar.update(len(chunk))
        instances += insts
      by = {LENGTH: _records(aggregate(instances, correct, (LENGTH,), space),
                             (LENGTH,))}
      for bucket in BUCKETS.get(name, ()):
        names = (bucket, LENGTH)
        by[",".join(names)] = _records(
            aggregate(instances, correct, names, space), names)
      overall = aggregate(instances, correct, (), space)[()]
      result["tasks"][name] = {
          "overall": overall, "by": by,
          "answers_per_instance": overall["n"] / len(instances),
          "params": {k: v for k, v in vars(task).items()}}
  finally:
    bar.close()
  result["instances_per_sec"] = total / max(time.perf_counter() - t0, 1e-9)
  return result


# ----------------------------------------------------------------------------- report

def _fmt(x: Any) -> str:
  if isinstance(x, float):
    return f"{x:g}"
  return str(x)


def markdown(result: dict) -> str:
  """The report as markdown: per task, accuracy by length, then by each of
  its buckets (rows) and length (columns)."""
  lines = [f"Checkpoint `{result['checkpoint']}` (trained on "
           f"`{result['trained_tasks'] or 'text'}`, seq_len "
           f"{result['trained_seq_len']}); {result['n']} held-out instances "
           f"per task and length (seed {result['seed']}); exact match of "
           "every answer, greedy predictions with teacher forcing; chance = a "
           "uniform guess over the answer alphabet.", ""]
  for name, t in result["tasks"].items():
    lines += [f"### {name}", "",
              "| length | answers | accuracy | chance |", "|---|---|---|---|"]
    for r in t["by"][LENGTH]:
      beyond = " (beyond training)" if r[LENGTH] > result["trained_seq_len"] else ""
      lines.append(f"| {r[LENGTH]}{beyond} | {r['n']} | {r['accuracy']:.3f} | "
                   f"{r['chance']:.4f} |")
    lengths = [r[LENGTH] for r in t["by"][LENGTH]]
    for key, records in t["by"].items():
      if key == LENGTH:
        continue
      bucket = key.split(",")[0]
      cells: dict[Any, dict[int, dict]] = {}
      for r in records:
        cells.setdefault(r[bucket], {})[r[LENGTH]] = r
      lines += ["", f"Accuracy by {bucket} (answers in parentheses):", "",
                f"| {bucket} | " + " | ".join(str(x) for x in lengths) + " |",
                "|---|" + "---|" * len(lengths)]
      for value, row in cells.items():
        lines.append(f"| {_fmt(value)} | " + " | ".join(
            f"{row[x]['accuracy']:.3f} ({row[x]['n']})" if x in row else "-"
            for x in lengths) + " |")
    lines.append("")
  return "\n".join(lines)


def plot_report(result: dict, out: pathlib.Path) -> list[pathlib.Path]:
  """Accuracy by length per task, and by the buckets of PLOTS (one line per
  length), each with the chance level and the trained length drawn."""
  from ultramem_jax.evaluation.plots import line_plot  # noqa: PLC0415

  step, trained = result["step"], result["trained_seq_len"]
  written = []
  for name, t in result["tasks"].items():
    records = t["by"][LENGTH]
    chance = {f"chance ({t['overall']['chance']:.3g})": t["overall"]["chance"]}
    written.append(line_plot(
        out / f"tasks_step{step}_{name}_length.png",
        {name: ([r[LENGTH] for r in records], [r["accuracy"] for r in records])},
        xlabel="sequence length (tokens)", ylabel="exact-match accuracy",
        title=f"{name}: accuracy by length, step {step}",
        vlines={f"trained length ({trained})": trained}, hlines=chance))
    if name in PLOTS:
      bucket, label = PLOTS[name]
      series: dict[str, tuple[list, list]] = {}
      for r in t["by"][f"{bucket},{LENGTH}"]:
        if r[bucket] is None:
          continue
        xs, ys = series.setdefault(f"length {r[LENGTH]}", ([], []))
        xs.append(r[bucket])
        ys.append(r["accuracy"])
      if series:
        written.append(line_plot(
            out / f"tasks_step{step}_{name}_{bucket}.png", series,
            xlabel=label, ylabel="exact-match accuracy",
            title=f"{name}: accuracy by {bucket}, step {step}", hlines=chance))
  return written


def write_report(out: pathlib.Path, result: dict) -> list[pathlib.Path]:
  """Writes tasks_step<N>.json, .md and the PNG plots under `out`."""
  out.mkdir(parents=True, exist_ok=True)
  stem = out / f"tasks_step{result['step']}"
  written = [stem.with_suffix(".json"), stem.with_suffix(".md")]
  written[0].write_text(json.dumps(result, indent=2, default=_json_default)
                        + "\n")
  written[1].write_text(markdown(result))
  return written + plot_report(result, out)


def _json_default(x: Any) -> Any:
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, (tuple, np.ndarray)):
    return list(x)
  raise TypeError(f"{type(x).__name__} is not JSON serializable")


# ----------------------------------------------------------------------------- command

def run(args: argparse.Namespace) -> int:
  from ultramem_jax.evaluation.restore import load_run_config, restore_run  # noqa: PLC0415
  from ultramem_jax.tasks import TASKS, TokenSpace, parse_mixture  # noqa: PLC0415

  if args.n < 1:
    raise ConfigError(f"--n: got {args.n}; expected at least 1 instance")
  cfg = load_run_config(args.run_dir, args.overrides)  # a bad directory fails fast
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
    from ultramem_jax.data.pipeline import prepare_data  # noqa: PLC0415
    from ultramem_jax.data.task_data import filler_tokens  # noqa: PLC0415
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
  import jax  # noqa: PLC0415
  if jax.process_index() == 0:
    written = write_report(args.out or args.run_dir / "eval", result)
    summary = {name: {str(r[LENGTH]): {"accuracy": r["accuracy"],
                                       "chance": r["chance"]}
                      for r in t["by"][LENGTH]}
               for name, t in result["tasks"].items()}
    print(json.dumps(summary, indent=2))
    print(markdown(result), file=sys.stderr)
    print("written: " + ", ".join(map(str, written)), file=sys.stderr)
  return 0
