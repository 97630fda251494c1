"""The jitted train and evaluation steps.

The model and optimizer travel through ``jax.jit`` as one ``nnx.State``
(split once by the caller); the train step donates it so parameters and
optimizer moments are updated in place. The objective and its metrics are
training/loss.py's (re-exported here: ``loss_fn``, ``token_losses``, ...).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ultramem_jax.model.memory.layer import memory_utilisation, refresh_memory
from ultramem_jax.training.accumulate import accumulated_gradients
# Re-exported: callers and tests take the loss from the step module.
from ultramem_jax.training.loss import (loss_fn, mean_loss, pop_sown,  # noqa: F401
                                        token_losses)


def make_train_step(graphdef: nnx.GraphDef, usage_window: int = 100,
                    grad_accum_steps: int = 1) -> Callable:
  """(state, batch) -> (state, metrics); state is donated. Metrics hold
  'loss', 'total_loss', 'grad_norm', 'skipped' (1 when the objective or the
  gradient norm was not finite and the update was skipped), 'aux/*' and
  'layers/*'. With `grad_accum_steps` k > 1 the batch runs as k
  microbatches whose gradients are summed (training/accumulate.py), with
  the same objective, gradients and metrics as the whole batch at once.

  After the update, memory layers recompute their Tucker vectors u, v from
  the updated cores (outside the gradient) and report the fraction of their
  rows read in the last `usage_window` steps (``slot_utilisation``)."""

  def train_step(state: nnx.State, batch: dict):
    model, optimizer = nnx.merge(graphdef, state)
    if grad_accum_steps == 1:
      (total, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(
          model, batch)
    else:
      total, metrics, grads = accumulated_gradients(model, batch,
                                                    grad_accum_steps)
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
