"""The training objective: the language-model cross-entropy plus what the
layers sow.

Layers may sow ``AuxLoss`` scalars (added to the objective, e.g. the MoE
load-balance and router z-losses) and ``LayerMetric`` values (logged only).
The reported ``loss`` is always the language-model cross-entropy, so runs of
different layer kinds compare directly; the auxiliary terms are reported
beside it under ``aux/<name>`` (summed over layers) and the objective that
was differentiated as ``total_loss``.

:func:`objective` computes a batch's part of a larger batch's objective,
so that gradient accumulation (training/accumulate.py) adds microbatches
up to exactly the whole batch; :func:`loss_fn` is the whole batch at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ultramem_jax.model.common import (AuxLoss, BalanceFraction, LayerMetric,
                                       RmsRatio, rms_ratio)


def token_losses(model: nnx.Module, batch: dict) -> jax.Array:
  """Per-token cross-entropy (nats) of the next-token targets, float32."""
  logits = model(batch["inputs"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])


def pop_sown(model: nnx.Module, kind: type) -> dict[str, jax.Array]:
  """Removes what layers sowed as `kind`; keys are slash-joined paths such as
  ``blocks/3/ffn/load_balance``, values the sum of what was sown there."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.pop(model, kind)):
    values = var.get_value()
    out["/".join(map(str, path))] = sum(values[1:], values[0])
  return out


def loss_normaliser(batch: dict) -> jax.Array:
  """What the summed token losses of `batch` are divided by: its token
  count, or with ``weights`` their sum (1 when every weight is 0)."""
  if "weights" not in batch:
    return jnp.asarray(batch["targets"].size, jnp.float32)
  total = jnp.sum(batch["weights"].astype(jnp.float32))
  return jnp.where(total > 0, total, 1.0)


def mean_loss(losses: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """The mean of per-token `losses`, or with `weights` (a loss mask, e.g.
  the answer tokens of task rows) their weighted mean over the whole batch,
  ``sum(losses * weights) / sum(weights)`` (0 when every weight is 0)."""
  if weights is None:
    return jnp.mean(losses)
  w = weights.astype(losses.dtype)
  total = jnp.sum(w)
  return jnp.sum(losses * w) / jnp.where(total > 0, total, 1.0)


def objective(model: nnx.Module, batch: dict, normaliser: jax.Array | None = None,
              share: float = 1.0) -> tuple[jax.Array, tuple[dict, dict]]:
  """(objective, (summed metrics, averaged metrics)) of `batch` as one part
  of a larger batch: the token losses are summed and divided by
  `normaliser` (the larger batch's; default: this batch's, as
  :func:`loss_normaliser`), every sown AuxLoss is multiplied by `share`.
  The objectives and summed metrics ('loss', 'total_loss', 'aux/*') of
  parts that cover a batch add up to the batch's; the averaged ones
  ('layers/*': LayerMetrics, and RmsRatios as their mean squares) are
  token means, whose mean over equal parts is the batch's."""
  losses = token_losses(model, batch)
  weights = batch.get("weights")
  if normaliser is None:
    normaliser = loss_normaliser(batch)
  w = jnp.ones_like(losses) if weights is None else weights.astype(losses.dtype)
  ce = jnp.sum(losses * w) / normaliser
  aux: dict[str, jax.Array] = {}
  for key, value in pop_sown(model, AuxLoss).items():
    name = f"aux/{key.rsplit('/', 1)[-1]}"
    aux[name] = aux.get(name, 0.0) + share * value
  layers = {f"layers/{k}": v for k, v in pop_sown(model, LayerMetric).items()}
  ratios = {f"layers/{k}": v for k, v in pop_sown(model, RmsRatio).items()}
  nnx.pop(model, BalanceFraction)  # read only by training/accumulate.py
  total = ce + sum(aux.values())
  if "nan_fault" in batch:  # train.fault_nan_steps: NaN there, 0 elsewhere
    total = total * (1.0 + batch["nan_fault"])
  return total, ({"loss": ce, "total_loss": total, **aux},
                 {"means": layers, "ratios": ratios})


def finish_metrics(sums: dict, averaged: dict) -> dict:
  """The logged metrics from :func:`objective`'s two groups: the ratios
  divided out."""
  ratios = {k: rms_ratio(v) for k, v in averaged["ratios"].items()}
  return {**sums, **averaged["means"], **ratios}


def loss_fn(model: nnx.Module, batch: dict) -> tuple[jax.Array, dict]:
  """(objective, metrics): cross-entropy plus every sown AuxLoss. The
  cross-entropy is the mean over the batch's tokens, or over its weighted
  tokens when the batch has ``weights`` (task rows: ``data.task_loss``)."""
  total, (sums, averaged) = objective(model, batch)
  return total, finish_metrics(sums, averaged)
