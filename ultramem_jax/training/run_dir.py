"""A training run's directory, as train.py writes it and eval.py reads it.

    <run_dir>/config.yaml        the resolved config (vocabulary filled in)
    <run_dir>/tokenizer.json     the tokenizer the data was encoded with
    <run_dir>/checkpoints/<N>/   orbax checkpoint steps (complete ones carry
                                 orbax's _CHECKPOINT_METADATA marker)
    <run_dir>/tensorboard/       event files
    <run_dir>/metrics.jsonl      every logged scalar, one JSON object a line
    <run_dir>/summary.json       the final validation numbers
    <run_dir>/loss.png           the loss curve
    <run_dir>/train.lock         the training that owns it, while it runs
                                 (training/run_lock.py)

Also here: the one rule for whether two configs describe the same model
and data (:func:`model_data_difference`), which decides whether a run may
resume in a directory and which overrides evaluation accepts.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import pathlib
import time

import jax
import yaml

from ultramem_jax.config import ConfigError, to_dict
from ultramem_jax.data.tokenizer import FILENAME as TOKENIZER_FILE
from ultramem_jax.training import run_lock
from ultramem_jax.training.config import Config

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
# Orbax writes this file into a checkpoint step directory once it is complete.
CHECKPOINT_MARKER = "_CHECKPOINT_METADATA"
# The sections of a config that define what was trained: a resumed run and
# an evaluation share them with the saved config.
FIXED_SECTIONS = ("model", "data")
# What to do about a damaged config.yaml (RunDir.saved_config).
_DAMAGED_CONFIG = ("restore the file (train.py writes it when a run starts), "
                   "use another run directory, or, for training, set "
                   "train.overwrite=true to move this one aside")
# Path-valued keys whose leading ~ the config expands when it is built; a
# config saved before that is compared with them expanded.
_PATH_KEYS = {"data": ("source", "data_dir")}


def _yaml_problem(e: Exception) -> str:
  """The parser's complaint and its line, in one line."""
  problem = getattr(e, "problem", None) or str(e).splitlines()[0]
  mark = getattr(e, "problem_mark", None)
  return problem + (f" at line {mark.line + 1}" if mark is not None else "")


@dataclasses.dataclass(frozen=True)
class RunDir:
  """The paths of one run directory and what can be read from it without
  creating anything."""

  root: pathlib.Path

  def __post_init__(self):
    object.__setattr__(self, "root", pathlib.Path(self.root))

  @property
  def checkpoints(self) -> pathlib.Path:
    return self.root / "checkpoints"

  @property
  def tensorboard(self) -> pathlib.Path:
    return self.root / "tensorboard"

  @property
  def config(self) -> pathlib.Path:
    return self.root / CONFIG_FILE

  @property
  def tokenizer(self) -> pathlib.Path:
    return self.root / TOKENIZER_FILE

  @property
  def metrics(self) -> pathlib.Path:
    return self.root / METRICS_FILE

  @property
  def summary(self) -> pathlib.Path:
    return self.root / SUMMARY_FILE

  @property
  def plot(self) -> pathlib.Path:
    return self.root / PLOT_FILE

  @property
  def lock_file(self) -> pathlib.Path:
    return self.root / run_lock.LOCK_FILE

  def checkpoint(self, step: int) -> pathlib.Path:
    return self.checkpoints / str(step)

  def lock(self, log) -> contextlib.AbstractContextManager[run_lock.RunLock]:
    """Holds this directory for one training (``with run.lock(log):``);
    raises ConfigError naming the owner when another training holds it.
    Evaluation reads a directory without it."""
    return run_lock.hold(self.root, log)

  def checkpoint_steps(self) -> list[int]:
    """Complete checkpoint steps, ascending."""
    if not self.checkpoints.is_dir():
      return []
    return sorted(int(p.name) for p in self.checkpoints.iterdir()
                  if p.is_dir() and is_checkpoint_step(p))

  def latest_checkpoint_step(self) -> int | None:
    steps = self.checkpoint_steps()
    return steps[-1] if steps else None

  def saved_config(self) -> dict:
    """config.yaml as a dict; ConfigError naming the file when it cannot be
    read, is not YAML, is empty or is not a mapping of config sections (a
    damaged run directory, not a bug)."""
    where = str(self.config)
    try:
      data = yaml.safe_load(self.config.read_text())
    except (OSError, UnicodeDecodeError) as e:
      raise ConfigError(f"{where!r}: the run's saved config cannot be read "
                        f"({getattr(e, 'strerror', None) or e})") from None
    except yaml.YAMLError as e:
      raise ConfigError(f"{where!r}: the run's saved config is not valid "
                        f"YAML ({_yaml_problem(e)}); "
                        f"{_DAMAGED_CONFIG}") from None
    if not data:
      raise ConfigError(f"{where!r}: the run's saved config is empty; "
                        f"{_DAMAGED_CONFIG}")
    if not isinstance(data, dict):
      raise ConfigError(f"{where!r}: the run's saved config is not a mapping "
                        f"of config sections; {_DAMAGED_CONFIG}")
    for key in FIXED_SECTIONS:
      if key in data and not isinstance(data[key], dict):
        raise ConfigError(f"{where!r}: section {key!r} of the run's saved "
                          f"config is not a mapping; {_DAMAGED_CONFIG}")
    return data

  def move_aside(self) -> pathlib.Path:
    """Renames the directory to <run_dir>.replaced-<time>; returns the new path."""
    dest = self.root.with_name(
        f"{self.root.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    self.root.rename(dest)
    return dest

  def check_process_count(self, step: int) -> None:
    """The data-iterator position of checkpoint `step` is saved per process
    (grain writes ``data/process_<i>-of-<n>.json``), so only the same number
    of processes can resume it; another number is a usage error, not damage."""
    data = self.checkpoint(step) / "data"
    counts = sorted({int(f.stem.rpartition("-of-")[2])
                     for f in data.glob("process_*-of-*.json")})
    if counts and counts != [jax.process_count()]:
      raise ConfigError(
          f"train.run_dir: checkpoint {step} was written by {counts[0]} "
          f"process(es); this run has {jax.process_count()}; resume it with "
          f"{counts[0]}, or start a new train.run_dir")

  def write_summary(self, summary: dict) -> None:
    self.summary.write_text(json.dumps(summary, indent=2) + "\n")


def is_checkpoint_step(path: pathlib.Path) -> bool:
  """Whether `path` is a complete checkpoint step directory (``.../<step>``)."""
  return path.name.isdigit() and (path / CHECKPOINT_MARKER).exists()


def checkpoint_steps(run_dir: pathlib.Path) -> list[int]:
  """Complete checkpoint steps in a run directory, ascending."""
  return RunDir(run_dir).checkpoint_steps()


def latest_checkpoint_step(run_dir: pathlib.Path) -> int | None:
  """Latest complete checkpoint step in a run directory, or None."""
  return RunDir(run_dir).latest_checkpoint_step()


# ----------------------------------------------------------------------------- same run

def first_difference(saved: dict, new: dict, prefix: str = ""
                     ) -> tuple[str, object, object] | None:
  """(dotted key, saved value, new value) of the first key, in sorted order,
  where two nested config dicts differ; None when they agree."""
  for key in sorted(set(saved) | set(new)):
    a, b = saved.get(key), new.get(key)
    name = f"{prefix}.{key}" if prefix else key
    if isinstance(a, dict) and isinstance(b, dict):
      diff = first_difference(a, b, name)
      if diff:
        return diff
    elif a != b:
      return name, a, b
  return None


def _as_trained(section: str, values: dict, other: dict) -> dict:
  """A copy of config section `values` without what does not define the
  trained model: the memory kernels' choice (how the layer is computed),
  where its tables live at inference (``table_memory``, ``host_read``),
  the remat policy (what the backward pass stores), and a vocab_size of 0 (the tokenizer's size) stands for `other`'s; paths
  compare with ``~`` expanded."""
  values = copy.deepcopy(dict(values))
  for key in _PATH_KEYS.get(section, ()):
    if isinstance(values.get(key), str):
      values[key] = os.path.expanduser(values[key])
  if section == "model":
    values.pop("remat", None)
    if isinstance(values.get("memory"), dict):
      for key in ("kernels", "table_memory", "host_read"):
        values["memory"].pop(key, None)
    if not values.get("vocab_size"):
      values["vocab_size"] = other.get("vocab_size", 0)
  return values


def model_data_difference(saved: dict | Config, new: dict | Config
                          ) -> tuple[str, object, object] | None:
  """The rule for "the same model and data": (dotted key, saved value, new
  value) of the first key of the model section, then of the data section,
  where two configs differ, or None when they describe the same model
  trained on the same data.

  Not differences: ``model.memory.kernels`` (the memory layer computed by
  other kernels is the same model), ``model.memory.table_memory`` and
  ``host_read`` (where the tables live at inference), ``model.remat`` (what the backward
  pass stores, not what it computes), and ``model.vocab_size: 0`` on either
  side (0 takes the tokenizer's size, which the other side holds)."""
  saved = to_dict(saved) if isinstance(saved, Config) else saved
  new = to_dict(new) if isinstance(new, Config) else new
  for section in FIXED_SECTIONS:
    a, b = dict(saved.get(section) or {}), dict(new.get(section) or {})
    diff = first_difference(_as_trained(section, a, b),
                            _as_trained(section, b, a), section)
    if diff:
      return diff
  return None


def _layout_hint(name: str, saved) -> str:
  """Why a ``model.scan_layers`` difference cannot be resumed across."""
  if name != "model.scan_layers":
    return ""
  layout = ("stacked on a leading layers axis (scanned)" if saved
            else "one per block (unrolled)")
  return (f" (its checkpoints hold the blocks' parameters {layout}, which "
          f"does not restore into model.scan_layers={not saved}; resume with "
          f"model.scan_layers={saved})")


def check_resume(cfg: Config) -> tuple[int | None, bool]:
  """Decides whether this run resumes in ``train.run_dir``: (step to resume
  from or None, whether the existing directory is to be moved aside first,
  which only ``train.overwrite=true`` allows)."""
  run = RunDir(pathlib.Path(cfg.train.run_dir))
  if run.root.exists() and not run.root.is_dir():
    raise ConfigError(f"train.run_dir: {str(run.root)!r} exists and is not a directory")
  latest = run.latest_checkpoint_step()
  if cfg.train.resume is False and latest is not None:
    if cfg.train.overwrite:
      return None, True
    raise ConfigError(
        f"train.resume: false, but train.run_dir={str(run.root)!r} already "
        f"holds checkpoints (latest step {latest}); choose another "
        "train.run_dir, set train.resume=true, or set train.overwrite=true to "
        "move the old run aside")
  if cfg.train.resume is True and latest is None:
    raise ConfigError(
        f"train.resume: true, but train.run_dir={str(run.root)!r} holds no "
        "checkpoint to resume from")
  if latest is not None and run.config.exists():
    try:
      saved = run.saved_config()
    except ConfigError:
      if cfg.train.overwrite and cfg.train.resume is not True:
        return None, True  # a damaged run is moved aside like a different one
      raise
    diff = model_data_difference(saved, cfg)
    if diff:
      name, a, b = diff
      if cfg.train.overwrite and cfg.train.resume is not True:
        return None, True
      raise ConfigError(
          f"{name}: the run has {a!r}, this config {b!r}; "
          f"train.run_dir={str(run.root)!r} was trained with a "
          f"different config{_layout_hint(name, a)}; use another "
          "train.run_dir, or set train.overwrite=true to move the old run "
          "aside")
  return latest, False
