"""A trained run's config, tokenizer and checkpointed state, for evaluation,
and the check that its reports can be written.

Evaluation may read a run directory while a training writes it: it takes
no lock, writes nothing under checkpoints/, and lists only complete steps
(orbax's marker). The training deletes its oldest steps as it saves new ones
(``train.max_to_keep``); a step deleted while it is read is not damage, and
without --step the newest is read instead.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable

from flax import nnx

from ultramem_jax.config import ConfigError, apply_overrides, require_writable_dir
from ultramem_jax.data.tokenizer import load_tokenizer
from ultramem_jax.parallel.host_tables import host_target
from ultramem_jax.parallel.mesh import make_mesh, use_mesh
from ultramem_jax.training.checkpoint import Checkpointer, CheckpointMismatch, abstract_like
from ultramem_jax.training.config import Config, from_dict
from ultramem_jax.training.run_dir import RunDir, is_checkpoint_step, model_data_difference
from ultramem_jax.training.memory_budget import check_host_tables
from ultramem_jax.training.state import create_state, model_and_optimizer


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
  saved = run.saved_config()  # ConfigError naming the file when damaged
  try:
    trained = from_dict(saved)
  except ConfigError as e:
    raise ConfigError(f"{str(run.config)!r}: the run's saved config does not "
                      f"load: {e}") from None
  cfg = from_dict(apply_overrides(saved, overrides))
  diff = model_data_difference(trained, cfg)
  if diff:
    name, a, b = diff
    raise ConfigError(
        f"{name}: the run has {a!r}, the overrides give {b!r}; overrides may "
        f"not change the {name.split('.')[0]} section of a trained run "
        "(model.memory.kernels, table_memory and host_read may change)")
  if not cfg.model.vocab_size:  # 0: the tokenizer's size, as trained
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, vocab_size=trained.model.vocab_size))
  return cfg


def check_out_dir(out: pathlib.Path | None, run_dir: pathlib.Path | None) -> None:
  """ConfigError unless the report directory (`out`, else RUN/eval) can be
  created and written; called before anything is evaluated."""
  if out is not None:
    require_writable_dir(out, "--out")
  else:
    require_writable_dir(run_dir / "eval", "--out (default RUN/eval, here)")


def restore_state(cfg: Config, checkpoints: pathlib.Path, step: int):
  """(mesh, graphdef, state, saved meta) of checkpoint `step` in the
  `checkpoints` directory, restored onto the mesh of `cfg`."""
  mesh = make_mesh(cfg.mesh)
  host = cfg.model.memory.table_memory == "host"
  with use_mesh(mesh):
    if host:   # shapes only: the tables are restored straight into host memory
      graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_and_optimizer(cfg)))
      target = host_target(abstract, mesh)
      check_host_tables(target, mesh)
    else:
      graphdef, state = create_state(cfg)
      target = abstract_like(state)
  checkpointer = Checkpointer(checkpoints, cfg.train.max_to_keep)
  try:
    with use_mesh(mesh):
      checkpointer.check_shapes(step, target)
      state, meta = checkpointer.restore(step, target)
  finally:
    checkpointer.close()
  return mesh, graphdef, state, meta


def restore_run(run_dir: pathlib.Path, step: int | None, overrides: list[str],
                before_restore: Callable[[Config, Any], None] | None = None
                ) -> RestoredRun:
  """Restores checkpoint `step` (the latest when None) of a run onto the
  mesh of its config (as overridden). `before_restore(cfg, tokenizer)` runs
  once the config and tokenizer are read and before any state is built (a
  check that raises ConfigError stops it there). Call inside nothing; the
  returned mesh is to be entered with ``use_mesh`` for computations on the
  state."""
  cfg = load_run_config(run_dir, overrides)
  run = RunDir(run_dir)
  if not run.tokenizer.is_file():
    raise ConfigError(f"--run_dir: {str(run_dir)!r} has no {run.tokenizer.name}; "
                      "expected the directory of a training run")
  tokenizer = load_tokenizer(run.tokenizer)
  if before_restore is not None:
    before_restore(cfg, tokenizer)
  steps = run.checkpoint_steps()
  if not steps:
    raise ConfigError(f"--run_dir: {str(run_dir)!r} holds no checkpoint")
  pinned = step is not None
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ConfigError(f"--step: got {step}; the run has checkpoints at steps {steps}")
  mesh, graphdef, state, step = restore_listed(cfg, run, step, pinned)
  return RestoredRun(cfg, step, mesh, graphdef, state, tokenizer)


# A training that saves faster than a restore reads could delete every step
# it is given; after this many, evaluation gives up.
_DELETED_TRIES = 5


def restore_listed(cfg: Config, run: RunDir, step: int, pinned: bool):
  """(mesh, graphdef, state, step) of checkpoint `step`; if a training
  deleted it while it was read, the newest step instead, unless `pinned`
  (given as --step). A step that is still there but does not restore is
  damaged: :func:`_explain_damage` says so."""
  for _ in range(_DELETED_TRIES):
    try:
      mesh, graphdef, state, _ = restore_state(cfg, run.checkpoints, step)
      return mesh, graphdef, state, step
    except (CheckpointMismatch, ConfigError):
      raise
    except Exception as e:  # noqa: BLE001 (anything unreadable is damage)
      if is_checkpoint_step(run.checkpoint(step)):
        _explain_damage(cfg, run, step, e)  # still there: not a deletion
      latest = run.latest_checkpoint_step()
      if pinned or latest is None or latest <= step:
        raise ConfigError(
            f"--step: checkpoint {step} of {str(run.root)!r} was deleted while "
            "it was read (the training in that directory keeps its newest "
            f"train.max_to_keep={cfg.train.max_to_keep}); the run has "
            f"checkpoints at steps {run.checkpoint_steps()}") from None
      step = latest
  raise ConfigError(
      f"--run_dir: the training in {str(run.root)!r} deleted {_DELETED_TRIES} "
      "checkpoints in a row while they were read; pass --step of a recent one "
      "or evaluate once it has saved fewer")


def _reason(e: Exception) -> str:
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  return f"{type(e).__name__}: {text[:200]}"


def _explain_damage(cfg: Config, run: RunDir, step: int, error: Exception):
  """Raises a ConfigError naming the damaged checkpoint `step` (it does not
  restore, or its fingerprints differ) and the steps that do restore, for
  --step. Nothing is moved: evaluation leaves the run as it is (training
  moves damaged checkpoints aside when it resumes)."""
  good = []
  for other in sorted((s for s in run.checkpoint_steps() if s != step),
                      reverse=True):
    try:
      restore_state(cfg, run.checkpoints, other)
      good.append(other)
    except Exception:  # noqa: BLE001
      continue
  hint = (f"the checkpoints that restore are at steps {sorted(good)}: pass "
          f"--step {good[0]}" if good else "no other checkpoint restores")
  raise ConfigError(f"--step: checkpoint {step} in {run.checkpoints} is damaged "
                    f"({_reason(error)}); {hint}") from None
