"""The sweep file: what it may hold, read and checked into a :class:`Sweep`.

A sweep file is YAML (``configs/sweeps/*.yaml``)::

    name: tiny_variants                # default: the file's stem
    sweep_dir: runs/sweeps/tiny_variants   # default: runs/sweeps/<name>
    config: ../tiny_dense.yaml         # the base config of every point
                                       # (relative to this file), unless an
                                       # axis sets `config`
    overrides: {train.steps: 80}       # dotted keys set for every point
    grid:                              # the product of these values
      optimizer.lr: [1.0e-3, 3.0e-3]
    zip:                               # each group: keys that move together
      - variant: [dense, moe]          # `variant`: a label, not a config key
        config: [../tiny_dense.yaml, ../tiny_moe.yaml]
    seeds: [0, 1]                      # train.seed, the innermost axis
    evals: [loss, {tasks: {tasks: mqar, n: 100}}]   # eval.py after training
                                       # (loss, tasks, harness)
    resources: {num_cpus: 1, num_gpus: 0, custom: {TPU: 4}}  # per point (ray)
    retries: 1                         # reruns of a failed point (ray)
    env: {XLA_FLAGS: "..."}            # environment of each point's processes
    train_args: []                     # extra train.py flags (--distributed)

The points are the product of the zip groups and the grid keys, in file
order, with the seeds innermost (``points.py``). Every problem is a
ConfigError naming the file and the key, raised before any point is built.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import pathlib
from typing import Any

import yaml

from ultramem_jax.config import ConfigError, yaml_mapping
from ultramem_jax.evaluation import loss as eval_loss
from ultramem_jax.evaluation import tasks as eval_tasks

# Axis keys that are not config keys: the base config file, and the label
# the report groups points by.
CONFIG_KEY, VARIANT_KEY, SEED_KEY = "config", "variant", "train.seed"
# The eval.py subcommands a sweep can run after training, and the file each
# writes under RUN/eval for the final step (how a finished one is known).
# The harness's module is named, not imported: lm-eval takes seconds to
# import, so only a sweep that runs it pays for it. Its file's name
# depends on its options (``harness_output``).
HARNESS = "ultramem_jax.evaluation.harness"
EVALS = {"loss": (eval_loss, "loss_step{step}.json"),
         "tasks": (eval_tasks, "tasks_step{step}.json"),
         "harness": (HARNESS, None)}
# Options an eval may not set: the sweep chooses what is evaluated and where.
_EVAL_FIXED = ("run_dir", "step", "out", "config", "checkpoint", "tokenizer")
_TOP_KEYS = ("name", "sweep_dir", "config", "overrides", "grid", "zip", "seeds",
             "evals", "resources", "retries", "env", "train_args")


@dataclasses.dataclass(frozen=True)
class Resources:
  """What one point's Ray task asks for: CPUs, GPUs and custom resources
  (e.g. ``TPU: 4`` on a TPU host)."""

  num_cpus: float = 1.0
  num_gpus: float = 0.0
  custom: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  """One ``eval.py KIND --run_dir RUN ARGS`` run after training."""

  kind: str
  args: tuple[str, ...] = ()

  def output(self, step: int) -> str:
    """The file under RUN/eval that says this evaluation is done."""
    pattern = EVALS[self.kind][1]
    return (harness_output(self.args, step) if pattern is None
            else pattern.format(step=step))


def eval_module(kind: str):
  """The evaluation module of eval.py's subcommand `kind`."""
  module = EVALS[kind][0]
  return importlib.import_module(module) if isinstance(module, str) else module


def _eval_parser(kind: str) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="eval.py", add_help=False)
  eval_module(kind).add_parser(parser.add_subparsers(dest="command"))
  return parser


def harness_output(args: tuple[str, ...], step: int) -> str:
  """The result file ``eval.py harness ARGS`` writes first for `step`
  (``harness_report.stem_name``): the tasks, shots and limit name it."""
  # Imported here, as the harness module is (EVALS): both import lm-eval.
  harness_report = importlib.import_module("ultramem_jax.evaluation.harness_report")
  harness_tasks = importlib.import_module("ultramem_jax.evaluation.harness_tasks")
  ns = _eval_parser("harness").parse_args(["harness", "--run_dir", "RUN", *args])
  names = harness_tasks.parse_tasks(ns.tasks)
  paper = list(names) == list(harness_tasks.PAPER_TASKS)
  return harness_report.stem_name(step, names, paper, ns.num_fewshot,
                                  ns.limit) + ".json"


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A checked sweep file. Paths in `config` are resolved against the file."""

  path: pathlib.Path
  name: str
  sweep_dir: pathlib.Path
  config: str | None
  overrides: dict[str, Any]
  grid: dict[str, list]
  zip: tuple[dict[str, list], ...]
  seeds: tuple[int, ...] | None
  evals: tuple[EvalSpec, ...]
  resources: Resources
  retries: int
  env: dict[str, str]
  train_args: tuple[str, ...]


def _fail(path: pathlib.Path, key: str, value: Any, allowed: str) -> None:
  raise ConfigError(f"sweep file {str(path)!r}: {key}: got {value!r}; {allowed}")


def _mapping(path, key, value) -> dict:
  if value is None:
    return {}
  if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
    _fail(path, key, value, "expected a mapping of names to values")
  return dict(value)


def _axis(path, key: str, values: Any) -> list:
  if not isinstance(values, list) or not values:
    _fail(path, key, values, "expected a non-empty list of values")
  if len({yaml.safe_dump(v) for v in values}) != len(values):
    _fail(path, key, values, "a value is listed twice")
  return values


def _eval_spec(path, i: int, item: Any) -> EvalSpec:
  """``loss`` or ``{tasks: {option: value}}`` as eval.py arguments, checked
  with eval.py's own parser."""
  key = f"evals[{i}]"
  if isinstance(item, str):
    kind, options = item, {}
  elif isinstance(item, dict) and len(item) == 1:
    kind, options = next(iter(item.items()))
    options = _mapping(path, f"{key}.{kind}", options)
  else:
    _fail(path, key, item, "expected an eval name or {name: {option: value}}")
  if kind not in EVALS:
    _fail(path, key, kind, f"expected one of {', '.join(EVALS)}")
  args: list[str] = []
  for opt, value in options.items():
    if opt in _EVAL_FIXED:
      _fail(path, f"{key}.{kind}.{opt}", value, "set by the sweep for each point")
    if value is True:
      args.append(f"--{opt}")
    elif isinstance(value, list):
      for v in value:
        args += [f"--{opt}", str(v)]
    elif value is not False and value is not None:
      args += [f"--{opt}", str(value)]
  _check_eval_args(path, key, kind, args)
  return EvalSpec(kind, tuple(args))


def _check_eval_args(path, key: str, kind: str, args: list[str]) -> None:
  """eval.py's parser accepts `args` (its message on stderr otherwise)."""
  parser = _eval_parser(kind)
  err = io.StringIO()
  try:
    with contextlib.redirect_stderr(err):
      parser.parse_args([kind, "--run_dir", "RUN", *args])
  except SystemExit:
    message = err.getvalue().strip().splitlines()[-1:] or ["rejected"]
    _fail(path, key, f"eval.py {kind} {' '.join(args)}".strip(),
          f"eval.py refuses it: {message[0]}")


def _resources(path, value: Any) -> Resources:
  raw = _mapping(path, "resources", value)
  out = {}
  for k, v in raw.items():
    if k not in ("num_cpus", "num_gpus", "custom"):
      _fail(path, f"resources.{k}", v, "allowed keys: num_cpus, num_gpus, custom")
    if k == "custom":
      v = _mapping(path, "resources.custom", v)
      for name, amount in v.items():
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0:
          _fail(path, f"resources.custom.{name}", amount, "expected a positive number")
    elif isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
      _fail(path, f"resources.{k}", v, "expected a number >= 0")
    out[k] = v
  return Resources(**out)


def _zip_groups(path, value: Any) -> tuple[dict[str, list], ...]:
  if value is None:
    return ()
  if isinstance(value, dict):
    value = [value]
  if not isinstance(value, list):
    _fail(path, "zip", value, "expected a list of mappings key -> values")
  groups = []
  for i, group in enumerate(value):
    group = _mapping(path, f"zip[{i}]", group)
    lengths = {k: len(_axis(path, f"zip[{i}].{k}", v)) for k, v in group.items()}
    if len(set(lengths.values())) > 1:
      _fail(path, f"zip[{i}]", lengths, "every key of a zip group needs as many "
            "values as the others")
    if group:
      groups.append(group)
  return tuple(groups)


def _check_axes(path, sweep_keys: dict[str, str]) -> None:
  """No key is set in two places (overrides, grid, zip groups, seeds)."""
  seen: dict[str, str] = {}
  for key, where in sweep_keys.items():
    name = key.split("|", 1)[1]
    if name in seen:
      raise ConfigError(f"sweep file {str(path)!r}: {name}: set in both "
                        f"{seen[name]} and {where}; set it in one place")
    seen[name] = where


def _load(path: pathlib.Path) -> dict:
  """The file's top-level mapping, its keys checked."""
  data = yaml_mapping(path, "sweep file")
  for k, v in data.items():
    if k not in _TOP_KEYS:
      _fail(path, k, v, f"unknown key; allowed keys: {', '.join(_TOP_KEYS)}")
  return data


def _seeds(path, seeds: Any) -> tuple[int, ...] | None:
  if seeds is None:
    return None
  _axis(path, "seeds", seeds)
  if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
    _fail(path, "seeds", seeds, "expected a list of integers")
  return tuple(seeds)


def _axes(path, data: dict) -> dict[str, Any]:
  """overrides, grid, zip and seeds, each key set in one place only, and
  the base config, here or as an axis."""
  overrides = _mapping(path, "overrides", data.get("overrides"))
  grid = {k: _axis(path, f"grid.{k}", v)
          for k, v in _mapping(path, "grid", data.get("grid")).items()}
  groups = _zip_groups(path, data.get("zip"))
  seeds = _seeds(path, data.get("seeds"))
  places = {f"overrides|{k}": "overrides" for k in overrides}
  places.update({f"grid|{k}": "grid" for k in grid})
  for i, g in enumerate(groups):
    places.update({f"zip{i}|{k}": f"zip[{i}]" for k in g})
  if seeds is not None:
    places["seeds|" + SEED_KEY] = "seeds"
  _check_axes(path, places)
  for bad in (CONFIG_KEY, VARIANT_KEY):
    if bad in overrides:
      _fail(path, f"overrides.{bad}", overrides[bad],
            f"`{bad}` is set at the top level or as an axis")
  config = data.get("config")
  if config is not None and not isinstance(config, str):
    _fail(path, "config", config, "expected a config file path")
  has_config_axis = CONFIG_KEY in grid or any(CONFIG_KEY in g for g in groups)
  if config is None and not has_config_axis:
    _fail(path, "config", None, "name a base config file, here or as an axis")
  return dict(config=config, overrides=overrides, grid=grid, zip=groups,
              seeds=seeds)


def _evals(path, evals: Any) -> tuple[EvalSpec, ...]:
  if not isinstance(evals, list):
    _fail(path, "evals", evals, "expected a list")
  specs = tuple(_eval_spec(path, i, e) for i, e in enumerate(evals))
  kinds = [e.kind for e in specs]
  if len(set(kinds)) != len(kinds):
    _fail(path, "evals", kinds, "each eval at most once (they write the same "
          "file under RUN/eval)")
  return specs


def read_sweep(path: str | pathlib.Path, sweep_dir: str | None = None) -> Sweep:
  """Reads and checks a sweep file; `sweep_dir` replaces the file's."""
  path = pathlib.Path(path)
  data = _load(path)
  name = data.get("name", path.stem)
  if not isinstance(name, str) or not name:
    _fail(path, "name", name, "expected a non-empty string")
  retries = data.get("retries", 0)
  if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
    _fail(path, "retries", retries, "expected an integer >= 0")
  env = _mapping(path, "env", data.get("env"))
  train_args = data.get("train_args") or []
  if not isinstance(train_args, list) or not all(isinstance(a, str) for a in train_args):
    _fail(path, "train_args", train_args, "expected a list of strings")
  sweep_dir = sweep_dir or data.get("sweep_dir") or f"runs/sweeps/{name}"
  return Sweep(
      path=path, name=name,
      sweep_dir=pathlib.Path(sweep_dir).expanduser().resolve(),
      **_axes(path, data), evals=_evals(path, data.get("evals") or []),
      resources=_resources(path, data.get("resources")), retries=retries,
      env={k: str(v) for k, v in env.items()}, train_args=tuple(train_args))


def config_path(sweep: Sweep, value: str) -> pathlib.Path:
  """A base config named in the sweep file (relative to the file), as an
  absolute path: each point's processes run from the repository root."""
  p = pathlib.Path(value).expanduser()
  return (p if p.is_absolute() else sweep.path.parent / p).resolve()
