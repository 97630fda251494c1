"""A trained run's config, tokenizer and checkpointed state, for evaluation."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from ultramem_jax.config import ConfigError, apply_overrides
from ultramem_jax.data.tokenizer import load_tokenizer
from ultramem_jax.parallel.mesh import make_mesh, use_mesh
from ultramem_jax.training.checkpoint import Checkpointer, CheckpointMismatch, abstract_like
from ultramem_jax.training.config import Config, from_dict
from ultramem_jax.training.run_dir import RunDir, model_data_difference
from ultramem_jax.training.state import create_state


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
  model it trained or its data (``run_dir.model_data_difference``; the
  memory kernels may change)."""
  run = RunDir(run_dir)
  if not run.config.exists():
    raise ConfigError(f"--run_dir: {str(run_dir)!r} has no {run.config.name}; "
                      "expected the directory of a training run")
  saved = run.saved_config()
  cfg, trained = from_dict(apply_overrides(saved, overrides)), from_dict(saved)
  diff = model_data_difference(trained, cfg)
  if diff:
    name, a, b = diff
    raise ConfigError(
        f"{name}: the run has {a!r}, the overrides give {b!r}; overrides may "
        f"not change the {name.split('.')[0]} section of a trained run "
        "(model.memory.kernels may change)")
  if not cfg.model.vocab_size:  # 0: the tokenizer's size, as trained
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, vocab_size=trained.model.vocab_size))
  return cfg


def restore_state(cfg: Config, checkpoints: pathlib.Path, step: int):
  """(mesh, graphdef, state, saved meta) of checkpoint `step` in the
  `checkpoints` directory, restored onto the mesh of `cfg`."""
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
  cfg = load_run_config(run_dir, overrides)
  run = RunDir(run_dir)
  steps = run.checkpoint_steps()
  if not steps:
    raise ConfigError(f"--run_dir: {str(run_dir)!r} holds no checkpoint")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ConfigError(f"--step: got {step}; the run has checkpoints at steps {steps}")
  mesh, graphdef, state, _ = _restore_or_explain(cfg, run, step, steps)
  return RestoredRun(cfg, step, mesh, graphdef, state,
                     load_tokenizer(run.tokenizer))


def _reason(e: Exception) -> str:
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  return f"{type(e).__name__}: {text[:200]}"


def _restore_or_explain(cfg: Config, run: RunDir, step: int, steps: list[int]):
  """restore_state of `step`; when it is damaged (it does not restore or
  its fingerprints differ), a ConfigError naming it and the steps that do
  restore, for --step. Nothing is moved: evaluation leaves the run as it is
  (training moves damaged checkpoints aside when it resumes)."""
  try:
    return restore_state(cfg, run.checkpoints, step)
  except CheckpointMismatch:
    raise
  except Exception as e:  # noqa: BLE001 (anything unreadable is damage)
    reason = _reason(e)
  good = []
  for other in sorted((s for s in steps if s != step), reverse=True):
    try:
      restore_state(cfg, run.checkpoints, other)
      good.append(other)
    except Exception:  # noqa: BLE001
      continue
  hint = (f"the checkpoints that restore are at steps {sorted(good)}: pass "
          f"--step {good[0]}" if good else "no other checkpoint restores")
  raise ConfigError(f"--step: checkpoint {step} in {run.checkpoints} is damaged "
                    f"({reason}); {hint}")
