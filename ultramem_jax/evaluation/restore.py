"""A trained run's config, tokenizer and checkpointed state, for evaluation."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import yaml

from ultramem_jax.config import ConfigError, apply_overrides
from ultramem_jax.training.config import Config, from_dict


@dataclasses.dataclass
class RestoredRun:
  cfg: Config
  step: int
  mesh: Any
  graphdef: Any
  state: Any
  tokenizer: Any


def load_run_config(run_dir: pathlib.Path, overrides: list[str]) -> Config:
  """The run's saved config with `overrides`, which may not change the
  sections that define the model and its data."""
  from ultramem_jax.training.loop import FIXED_SECTIONS, RunPaths  # noqa: PLC0415

  paths = RunPaths(run_dir)
  if not paths.config.exists():
    raise ConfigError(f"--run_dir: {str(run_dir)!r} has no {paths.config.name}; "
                      "expected the directory of a training run")
  saved = yaml.safe_load(paths.config.read_text())
  cfg, trained = from_dict(apply_overrides(saved, overrides)), from_dict(saved)
  for section in FIXED_SECTIONS:
    if getattr(cfg, section) != getattr(trained, section):
      raise ConfigError(f"overrides may not change the {section} section of a "
                        "trained run")
  return cfg


def restore_state(cfg: Config, checkpoints: pathlib.Path, step: int):
  """(mesh, graphdef, state, saved meta) of checkpoint `step` in the
  `checkpoints` directory, restored onto the mesh of `cfg`."""
  from ultramem_jax.parallel.mesh import make_mesh, use_mesh  # noqa: PLC0415
  from ultramem_jax.training.checkpoint import Checkpointer, abstract_like  # noqa: PLC0415
  from ultramem_jax.training.state import create_state  # noqa: PLC0415

  mesh = make_mesh(cfg.mesh)
  checkpointer = Checkpointer(checkpoints, cfg.train.max_to_keep)
  try:
    with use_mesh(mesh):
      graphdef, state = create_state(cfg)
      checkpointer.check_shapes(step, abstract_like(state))
      state, meta = checkpointer.restore(step, abstract_like(state))
  finally:
    checkpointer.close()
  return mesh, graphdef, state, meta


def restore_run(run_dir: pathlib.Path, step: int | None,
                overrides: list[str]) -> RestoredRun:
  """Restores checkpoint `step` (the latest when None) of a run onto the
  mesh of its config (as overridden). Call inside nothing; the returned
  mesh is to be entered with ``use_mesh`` for computations on the state."""
  from ultramem_jax.data.tokenizer import load_tokenizer  # noqa: PLC0415
  from ultramem_jax.training.loop import RunPaths, checkpoint_steps  # noqa: PLC0415

  cfg = load_run_config(run_dir, overrides)
  paths = RunPaths(run_dir)
  steps = checkpoint_steps(run_dir)
  if not steps:
    raise ConfigError(f"--run_dir: {str(run_dir)!r} holds no checkpoint")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ConfigError(f"--step: got {step}; the run has checkpoints at steps {steps}")
  mesh, graphdef, state, _ = restore_state(cfg, paths.checkpoints, step)
  return RestoredRun(cfg, step, mesh, graphdef, state,
                     load_tokenizer(paths.tokenizer))
