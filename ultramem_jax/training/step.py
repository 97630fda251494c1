"""The loss and the jitted train and evaluation steps.

The model and optimizer travel through ``jax.jit`` as one ``nnx.State``
(split once by the caller); the train step donates it so parameters and
optimizer moments are updated in place.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def token_losses(model: nnx.Module, batch: dict) -> jax.Array:
  """Per-token cross-entropy (nats) of the next-token targets, float32."""
  logits = model(batch["inputs"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])


def loss_fn(model: nnx.Module, batch: dict) -> jax.Array:
  return jnp.mean(token_losses(model, batch))


def make_train_step(graphdef: nnx.GraphDef) -> Callable:
  """(state, batch) -> (state, {'loss', 'grad_norm'}); state is donated."""

  def train_step(state: nnx.State, batch: dict):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
    grad_norm = optax.global_norm(grads)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), {"loss": loss, "grad_norm": grad_norm}

  return jax.jit(train_step, donate_argnums=0)


def make_eval_step(graphdef: nnx.GraphDef) -> Callable:
  """(state, batch with 'weights') -> (sum of weighted losses, sum of weights)."""

  def eval_step(state: nnx.State, batch: dict):
    model, _ = nnx.merge(graphdef, state)
    losses = token_losses(model, batch)
    w = batch["weights"]
    return jnp.sum(losses * w), jnp.sum(w)

  return jax.jit(eval_step)
