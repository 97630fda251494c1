"""The root run config: its ``optimizer`` and ``train`` sections, the
``Config`` that holds every section, and reading, validating and writing it.

The sections live beside the code they configure (``model/config.py``,
``model/memory/config.py``, ``data/config.py``, ``parallel/mesh.py``); the
root lives here, at the training layer, because it holds ``TrainConfig``.
Loading (YAML, ``base:``, overrides, typed building) is
``ultramem_jax/config.py``."""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Optional

import yaml

from ultramem_jax.config import (ConfigError, PathStr, apply_overrides,
                                 build_dataclass, merge, read_yaml, require,
                                 to_dict)
from ultramem_jax.data.config import DataConfig, validate_data
from ultramem_jax.memory_geometry import memory_geometry
from ultramem_jax.model.config import ModelConfig, validate_model
from ultramem_jax.model.memory.recipe import memory_recipe
from ultramem_jax.parallel.mesh import MeshConfig, validate_mesh


@dataclasses.dataclass(frozen=True)
class ParamGroupConfig:
  """Learning-rate treatment of one parameter label (see training/optimizer)."""

  lr_multiplier: float = 1.0
  # Multiplier decays linearly to 1x over this many steps; 0 keeps it constant.
  multiplier_decay_steps: int = 0
  weight_decay: bool = True


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  lr: float = 3e-3
  warmup_steps: int = 30
  # Cosine decay ends at lr * min_lr_ratio at train.steps.
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip: float = 1.0
  # Per-label settings; labels are assigned by training.optimizer.param_labels.
  param_groups: dict[str, ParamGroupConfig] = dataclasses.field(
      default_factory=lambda: {
          "default": ParamGroupConfig(),
          "no_decay": ParamGroupConfig(weight_decay=False),
          # Memory-layer values and pre-values (UltraMemV2: 1x; UltraMem v1
          # configs set 4x decaying to 1x over the run).
          "values": ParamGroupConfig(),
      })


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 300
  # A leading ~ is expanded (ultramem_jax/config.py PathStr).
  run_dir: PathStr = "runs/default"
  seed: int = 0
  # null: resume when run_dir holds a checkpoint; true: must resume;
  # false: start fresh (refused if run_dir already holds checkpoints).
  resume: Optional[bool] = None
  log_every: int = 10
  eval_every: int = 100
  # Validation batches per evaluation; 0 evaluates the whole validation split.
  eval_batches: int = 0
  checkpoint_every: int = 100
  # Checkpoints kept; at least 2, so a damaged latest one has a predecessor.
  max_to_keep: int = 3
  progress_bar: bool = True
  # A run directory trained with a different model or data config is
  # refused; true moves it aside (to <run_dir>.replaced-<time>) and starts
  # fresh. Nothing is deleted either way.
  overwrite: bool = False
  # Steps whose loss or gradient norm is not finite are skipped (no update);
  # this many in a row stop the run, keeping the last good checkpoint.
  max_skipped_steps: int = 10
  # A training loss above spike_factor x the mean of the last 100 is logged
  # as a spike (train/loss_spike); 0 disables.
  spike_factor: float = 3.0
  # Each batch is split into this many microbatches whose gradients are
  # summed inside the jitted step (data.batch_size must divide evenly).
  grad_accum_steps: int = 1
  # Peak TFLOP/s of one device for the MFU the loop logs; 0: the dense bf16
  # peak of a known chip (training/utilisation.py), else MFU is n/a (CPUs).
  peak_tflops: float = 0.0
  # Fault injection for tests: comma-separated steps whose loss is made NaN.
  fault_nan_steps: str | int = ""
  # Fault injection for tests: "P@S" makes process P raise at step S.
  fault_raise: str = ""



@dataclasses.dataclass(frozen=True)
class Config:
  """Every section of a run, as read from a config file."""

  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optimizer: OptimizerConfig = dataclasses.field(
      default_factory=OptimizerConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)


def from_dict(data: dict) -> Config:
  """Builds and validates a Config from plain data, merged key by key onto
  the defaults (so a mapping such as optimizer.param_groups keeps its
  default entries when a file or an override adds one)."""
  cfg = build_dataclass(Config, merge(to_dict(Config()), data), "")
  validate(cfg)
  return cfg


def load_config(path: str | os.PathLike | None,
                overrides: list[str] | tuple[str, ...] = ()) -> Config:
  """Reads `path` (following `base:`), applies overrides, validates."""
  data = read_yaml(pathlib.Path(path)) if path else {}
  return from_dict(apply_overrides(data, list(overrides)))


def save_config(cfg: Config, path: str | os.PathLike) -> None:
  path = pathlib.Path(path)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
  os.replace(tmp, path)


def fault_steps(t: TrainConfig) -> frozenset[int]:
  """The steps of ``train.fault_nan_steps``."""
  text = str(t.fault_nan_steps).strip()
  return frozenset(int(x) for x in text.split(",")) if text else frozenset()


def fault_raise(t: TrainConfig) -> tuple[int, int] | None:
  """(process, step) of ``train.fault_raise``, or None."""
  text = str(t.fault_raise).strip()
  if not text:
    return None
  process, _, step = text.partition("@")
  return int(process), int(step)


def validate(cfg: Config) -> None:
  """Every section's rules, then those that span sections."""
  validate_model(cfg.model)
  if memory_geometry(cfg.model).placement:
    memory_recipe(cfg.model)  # the combinations the memory stages cannot run
  validate_data(cfg.data, cfg.model.vocab_size)
  validate_train(cfg.train)
  validate_optimizer(cfg.optimizer)
  o, t = cfg.optimizer, cfg.train
  require(cfg.data.batch_size % t.grad_accum_steps == 0,
          "train.grad_accum_steps", t.grad_accum_steps,
          f"must divide data.batch_size={cfg.data.batch_size}")
  require(o.warmup_steps < t.steps, "optimizer.warmup_steps", o.warmup_steps,
          f"must be smaller than train.steps={t.steps}")
  validate_mesh(cfg.mesh)


def validate_train(t: TrainConfig) -> None:
  """The rules of the ``train`` section."""
  for key in ("steps", "log_every", "eval_every", "checkpoint_every",
              "max_to_keep", "max_skipped_steps", "grad_accum_steps"):
    require(getattr(t, key) > 0, f"train.{key}", getattr(t, key),
            "must be a positive integer")
  require(t.max_to_keep >= 2, "train.max_to_keep", t.max_to_keep,
          "must be at least 2, so that a damaged latest checkpoint has a "
          "predecessor to fall back on")
  require(t.spike_factor == 0 or t.spike_factor > 1, "train.spike_factor",
          t.spike_factor, "must be 0 (off) or greater than 1")
  try:
    fault_steps(t)
  except ValueError:
    raise ConfigError(f"train.fault_nan_steps: got {t.fault_nan_steps!r}; "
                      "expected comma-separated step numbers, e.g. '5,6'") from None
  try:
    fault_raise(t)
  except ValueError:
    raise ConfigError(f"train.fault_raise: got {t.fault_raise!r}; expected "
                      "PROCESS@STEP, e.g. '1@3'") from None
  require(t.peak_tflops >= 0, "train.peak_tflops", t.peak_tflops,
          "must be >= 0 (0: the device's known peak, or n/a)")
  require(t.eval_batches >= 0, "train.eval_batches", t.eval_batches,
          "must be >= 0 (0 means derived)")
  require(bool(t.run_dir), "train.run_dir", t.run_dir, "must be a directory path")


def validate_optimizer(o: OptimizerConfig) -> None:
  """The rules of the ``optimizer`` section."""
  require(o.warmup_steps >= 0, "optimizer.warmup_steps", o.warmup_steps,
          "must be >= 0 (0 means derived)")
  require(o.lr > 0, "optimizer.lr", o.lr, "must be > 0")
  require(0.0 <= o.min_lr_ratio <= 1.0, "optimizer.min_lr_ratio",
          o.min_lr_ratio, "must lie in [0, 1]")
  require(0.0 <= o.b1 < 1.0, "optimizer.b1", o.b1, "must lie in [0, 1)")
  require(0.0 <= o.b2 < 1.0, "optimizer.b2", o.b2, "must lie in [0, 1)")
  require(o.eps > 0, "optimizer.eps", o.eps, "must be > 0")
  require(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay,
          "must be >= 0")
  require(o.grad_clip >= 0, "optimizer.grad_clip", o.grad_clip,
          "must be >= 0 (0 disables clipping)")
  require("default" in o.param_groups, "optimizer.param_groups",
          sorted(o.param_groups), "must define a 'default' group")
  for name, g in o.param_groups.items():
    require(g.lr_multiplier > 0, f"optimizer.param_groups.{name}.lr_multiplier",
            g.lr_multiplier, "must be > 0")
    require(g.multiplier_decay_steps >= 0,
            f"optimizer.param_groups.{name}.multiplier_decay_steps",
            g.multiplier_decay_steps, "must be >= 0")
