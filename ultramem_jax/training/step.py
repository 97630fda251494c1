"""The loss and the jitted train and evaluation steps.

The model and optimizer travel through ``jax.jit`` as one ``nnx.State``
(split once by the caller); the train step donates it so parameters and
optimizer moments are updated in place.

Layers may sow ``AuxLoss`` scalars (added to the objective, e.g. the MoE
load-balance and router z-losses) and ``LayerMetric`` values (logged only).
The reported ``loss`` is always the language-model cross-entropy, so runs of
different layer kinds compare directly; the auxiliary terms are reported
beside it under ``aux/<name>`` (summed over layers) and the objective that
was differentiated as ``total_loss``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ultramem_jax.model.common import AuxLoss, LayerMetric
from ultramem_jax.model.memory.layer import memory_utilisation, refresh_memory


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


def mean_loss(losses: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """The mean of per-token `losses`, or with `weights` (a loss mask, e.g.
  the answer tokens of task rows) their weighted mean over the whole batch,
  ``sum(losses * weights) / sum(weights)`` (0 when every weight is 0)."""
  if weights is None:
    return jnp.mean(losses)
  w = weights.astype(losses.dtype)
  total = jnp.sum(w)
  return jnp.sum(losses * w) / jnp.where(total > 0, total, 1.0)


def loss_fn(model: nnx.Module, batch: dict) -> tuple[jax.Array, dict]:
  """(objective, metrics): cross-entropy plus every sown AuxLoss. The
  cross-entropy is the mean over the batch's tokens, or over its weighted
  tokens when the batch has ``weights`` (task rows: ``data.task_loss``)."""
  ce = mean_loss(token_losses(model, batch), batch.get("weights"))
  aux: dict[str, jax.Array] = {}
  for key, value in pop_sown(model, AuxLoss).items():
    name = f"aux/{key.rsplit('/', 1)[-1]}"
    aux[name] = aux.get(name, 0.0) + value
  layers = {f"layers/{k}": v for k, v in pop_sown(model, LayerMetric).items()}
  total = ce + sum(aux.values())
  if "nan_fault" in batch:  # train.fault_nan_steps: NaN there, 0 elsewhere
    total = total * (1.0 + batch["nan_fault"])
  return total, {"loss": ce, "total_loss": total, **aux, **layers}


def make_train_step(graphdef: nnx.GraphDef, usage_window: int = 100) -> Callable:
  """(state, batch) -> (state, metrics); state is donated. Metrics hold
  'loss', 'total_loss', 'grad_norm', 'skipped' (1 when the objective or the
  gradient norm was not finite and the update was skipped), 'aux/*' and
  'layers/*'.

  After the update, memory layers recompute their Tucker vectors u, v from
  the updated cores (outside the gradient) and report the fraction of their
  rows read in the last `usage_window` steps (``slot_utilisation``)."""

  def train_step(state: nnx.State, batch: dict):
    model, optimizer = nnx.merge(graphdef, state)
    (total, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch)
    # A non-finite objective poisons the gradients, so the optimizer's
    # apply_if_finite wrapper skips this update (see training/optimizer.py).
    poison = jnp.where(jnp.isfinite(total), 0.0, jnp.nan)
    grads = jax.tree.map(lambda g: g + poison.astype(g.dtype), grads)
    grad_norm = optax.global_norm(grads)
    metrics["grad_norm"] = grad_norm
    metrics["skipped"] = (~jnp.isfinite(grad_norm)).astype(jnp.int32)
    optimizer.update(model, grads)
    refresh_memory(model)
    metrics.update(memory_utilisation(model, usage_window))
    return nnx.state((model, optimizer)), metrics

  return jax.jit(train_step, donate_argnums=0)


def make_eval_step(graphdef: nnx.GraphDef) -> Callable:
  """(state, batch with 'weights') -> (sum of weighted losses, sum of weights)."""

  def eval_step(state: nnx.State, batch: dict):
    model, _ = nnx.merge(graphdef, state)
    losses = token_losses(model, batch)
    w = batch["weights"]
    return jnp.sum(losses * w), jnp.sum(w)

  return jax.jit(eval_step)
