"""Which lm-evaluation-harness tasks ``eval.py harness`` runs, and loading
them with errors that say what could not be reached.

``paper`` names the nine zero-shot tasks of the paper's Table 3 by their
harness names (:data:`PAPER_TASKS`). Custom tasks come from YAML files in
``--include_path`` directories, in the harness's own format. The harness
downloads a task's dataset from the Hugging Face Hub when the task is
built; on a machine without network access that fails, and
:func:`load_tasks` turns the failure into a DataError naming the task and
the dataset it tried.
"""

from __future__ import annotations

import pathlib
from typing import Any

from lm_eval.tasks import TaskManager

from ultramem_jax.config import ConfigError
from ultramem_jax.data.corpora import DataError

# Table 3 of the paper: ARC-Challenge, ARC-Easy, CommonsenseQA, HellaSwag,
# MMLU (a group of 57 subjects), OpenBookQA, PIQA, SciQ, Winogrande.
PAPER_TASKS = ("arc_challenge", "arc_easy", "commonsense_qa", "hellaswag",
               "mmlu", "openbookqa", "piqa", "sciq", "winogrande")


def parse_tasks(text: str) -> list[str]:
  """Comma-separated task names; ``paper`` stands for PAPER_TASKS."""
  names: list[str] = []
  for name in (n.strip() for n in text.split(",")):
    for n in (PAPER_TASKS if name == "paper" else [name] if name else []):
      if n not in names:
        names.append(n)
  if not names:
    raise ConfigError(f"--tasks: got {text!r}; expected comma-separated "
                      "harness task names or 'paper'")
  return names


def task_manager(names: list[str], include_path: list[pathlib.Path]
                 ) -> TaskManager:
  """A TaskManager that knows every name in `names`: the one of the
  `include_path` directories alone when they define them all (indexing the
  harness's thousands of built-in tasks takes seconds), else one with the
  built-in tasks too. ConfigError names an unknown task."""
  for path in include_path:
    if not path.exists():
      raise ConfigError(f"--include_path: {str(path)!r} does not exist")
  paths = [str(p) for p in include_path]
  if paths:
    local = TaskManager(include_path=paths, include_defaults=False)
    if all(n in local.all_tasks for n in names):
      return local
  manager = TaskManager(include_path=paths or None)
  unknown = [n for n in names if n not in manager.all_tasks]
  if unknown:
    close = [t for t in manager.all_tasks if unknown[0][:4] in t][:8]
    hint = f"; similar names: {', '.join(close)}" if close else ""
    raise ConfigError(f"--tasks: {unknown[0]!r} is not a task, group or tag "
                      f"of lm-eval or of --include_path{hint}")
  return manager


def _dataset_of(manager: TaskManager, name: str) -> str:
  """The dataset (path and name) a task or group reads, from its YAML."""
  entry = manager.task_index.get(name)
  cfg = dict(entry.cfg or {}) if entry is not None else {}
  if "dataset_path" not in cfg and isinstance(cfg.get("task"), list):
    first = cfg["task"][0]
    return _dataset_of(manager, first) if isinstance(first, str) else "?"
  path = cfg.get("dataset_path", "?")
  sub = cfg.get("dataset_name")
  return f"{path!r}" + (f" ({sub})" if sub else "")


def load_tasks(manager: TaskManager, names: list[str]) -> list[Any]:
  """The built tasks and groups (their datasets loaded), one name at a
  time so that a failure names its task: a DataError saying which task and
  dataset could not be loaded, and why."""
  built: list[Any] = []
  for name in names:
    try:
      loaded = manager.load([name])
    except Exception as e:  # noqa: BLE001 (datasets, hub, files: all named)
      reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
      offline = isinstance(e, (ConnectionError, OSError))
      raise DataError(
          f"--tasks: task {name!r} could not load its dataset "
          f"{_dataset_of(manager, name)}: {type(e).__name__}: {reason}"
          + ("; the harness downloads datasets from the Hugging Face Hub, so "
             "run on a machine with network access (or with the dataset in "
             "the HF_DATASETS_CACHE)" if offline else "")) from None
    groups = loaded.get("groups", {})
    if name in groups:
      built.append(groups[name])
    elif name in loaded["tasks"]:
      built.append(loaded["tasks"][name])
    else:   # a tag: its tasks
      built.extend(loaded["tasks"].values())
  return built
