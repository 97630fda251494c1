"""AdamW with warm-up + cosine decay, global clipping and labelled groups.

Every parameter gets a label: the ``param_group`` metadata of its variable
when a layer sets one (the memory layers label their value tables
``values``), else ``no_decay`` for vectors (norm scales) and ``default`` for
everything else. Each label has its own learning-rate multiplier, optionally
decaying linearly to 1x, and its own weight-decay switch
(``optimizer.param_groups`` in the config).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ultramem_jax.training.config import OptimizerConfig, ParamGroupConfig


def lr_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to lr, then cosine decay to lr * min_lr_ratio."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
      decay_steps=total_steps, end_value=cfg.lr * cfg.min_lr_ratio)


def multiplier_schedule(group: ParamGroupConfig) -> optax.Schedule:
  """lr_multiplier, decaying linearly to 1 over multiplier_decay_steps."""
  m, horizon = group.lr_multiplier, group.multiplier_decay_steps
  if not horizon or m == 1.0:
    return lambda step: jnp.asarray(m, jnp.float32)
  return lambda step: 1.0 + (m - 1.0) * jnp.clip(1.0 - step / horizon, 0.0, 1.0)


def _default_label(variable: nnx.Variable) -> str:
  """The variable's ``param_group``, else by its rank, not counting the
  ``layers`` axis of scanned blocks (a stacked norm scale is a vector per
  layer)."""
  meta = variable.get_metadata()
  if meta.get("param_group"):
    return meta["param_group"]
  stacked = tuple(meta.get("out_sharding") or ())[:1] == ("layers",)
  return ("no_decay" if jnp.ndim(variable[...]) - stacked <= 1
          else "default")


def param_labels(model: nnx.Module) -> dict[tuple, str]:
  """Label of every parameter, keyed by its path in the model."""
  return {path: _default_label(var)
          for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _path_key(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
               for k in path)


def make_optimizer(model: nnx.Module, cfg: OptimizerConfig,
                   total_steps: int) -> nnx.Optimizer:
  labels = param_labels(model)
  missing = sorted(set(labels.values()) - set(cfg.param_groups))
  if missing:
    raise ValueError(f"optimizer.param_groups: the model has parameters "
                     f"labelled {missing} but no group defines them; defined: "
                     f"{sorted(cfg.param_groups)}")
  base = lr_schedule(cfg, total_steps)

  def group_tx(group: ParamGroupConfig) -> optax.GradientTransformation:
    mult = multiplier_schedule(group)
    return optax.adamw(
        learning_rate=lambda step: base(step) * mult(step), b1=cfg.b1, b2=cfg.b2,
        eps=cfg.eps, weight_decay=cfg.weight_decay if group.weight_decay else 0.0)

  def label_tree(tree):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: labels[_path_key(path)], tree,
        is_leaf=lambda x: isinstance(x, nnx.Variable))

  used = sorted(set(labels.values()))
  tx = optax.multi_transform({g: group_tx(cfg.param_groups[g]) for g in used},
                             label_tree)
  if cfg.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
  # Non-finite gradients leave parameters and moments untouched; the loop
  # counts such steps and stops after train.max_skipped_steps in a row.
  tx = optax.apply_if_finite(tx, max_consecutive_errors=2 ** 30)
  return nnx.Optimizer(model, tx, wrt=nnx.Param)
