"""Gradient accumulation (``train.grad_accum_steps`` = k): one optimizer
step over a batch run as k microbatches inside the jitted step, with the
objective, gradients and logged metrics of the whole batch at once (to
float rounding), so k trades memory for time and nothing else.

Microbatch j holds the rows j, j + k, j + 2k, ... of the batch, so each
device keeps its own rows. A ``lax.scan`` over the microbatches sums
their gradients; the pieces are exact because:

- cross-entropy: each microbatch divides its summed token losses by the
  whole batch's token count (or weight sum, for task rows), so the parts
  add up to the whole batch's mean;
- auxiliary losses are token means (router z-loss), functions of the
  parameters (core penalty) or balance losses c * sum_e f_e p_e, all
  multiplied by 1/k. A balance loss is linear in the token mean p but not
  in the routed fraction f, which has no gradient: a forward pass over the
  microbatches first collects each layer's f (``BalanceFraction``, summed
  to the whole batch's), which every microbatch then uses instead of its
  own (``model.common.balance_fraction``). That pass costs one forward of
  the batch and runs only when a layer sows a fraction (MoE with
  ``load_balance_coef > 0``, memory layers with ``key_balance > 0``);
- layer metrics are token means or parameter functions (averaged over
  microbatches); RMS ratios are combined as mean squares, then divided;
- memory-layer statistics (``MemoryStat``: a call counter and the call at
  which each row was last read) only grow in a forward pass, so starting
  every microbatch from the step's state and keeping the elementwise
  maximum leaves what one pass over the whole batch leaves;
- the Tucker refresh and the slot utilisation follow the update, once
  per step, as without accumulation.

Not exact: capacity-limited MoE dispatch (``capacity_factor > 0``) keeps
each expert's first C = ceil(cf * n * k / E) assignments of the tokens it
sees at once, so with microbatches the capacity is per microbatch and
other tokens may be dropped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ultramem_jax.model.common import (BalanceFraction, WholeBatchFraction,
                                       whole_batch_attribute)
from ultramem_jax.model.memory.layer import MemoryStat
from ultramem_jax.model.scan import split_layer_path
from ultramem_jax.parallel.rules import constrain
from ultramem_jax.training.loss import (finish_metrics, loss_normaliser,
                                        objective, token_losses)


def split_microbatches(batch: dict, k: int) -> tuple[dict, dict]:
  """(row arrays as [k, B/k, ...], microbatch j = rows j, j+k, ...; the
  scalars, such as ``nan_fault``, which every microbatch shares)."""
  rows, scalars = {}, {}
  for key, x in batch.items():
    if x.ndim == 0:
      scalars[key] = x
      continue
    b = x.shape[0]
    rows[key] = jnp.swapaxes(x.reshape(b // k, k, *x.shape[1:]), 0, 1)
  return rows, scalars


def _microbatch(rows: dict, scalars: dict) -> dict:
  """One microbatch's rows (kept batch-sharded on the mesh) and the scalars."""
  out = {k: constrain(v, ("activation_batch",) + (None,) * (v.ndim - 1))
         for k, v in rows.items()}
  return {**out, **scalars}


def _module_at(model: nnx.Module, path: tuple) -> nnx.Module:
  node = model
  for key in path:
    node = node[key] if isinstance(key, int) else getattr(node, key)
  return node


def whole_batch_fractions(graphdef, params, rest, rows: dict,
                          scalars: dict) -> dict[tuple, jax.Array]:
  """{path of a sown BalanceFraction: the whole batch's fraction}, from a
  forward pass over every microbatch; {} (and no pass) when the model sows
  none."""

  def forward(mb: dict) -> dict[tuple, jax.Array]:
    model = nnx.merge(graphdef, params, rest, copy=True)
    token_losses(model, _microbatch(mb, scalars))
    out = {}
    for path, var in nnx.to_flat_state(nnx.pop(model, BalanceFraction)):
      values = var.get_value()
      out[tuple(path)] = sum(values[1:], values[0])
    return out

  first = jax.tree.map(lambda x: x[0], rows)
  if not jax.eval_shape(forward, first):
    return {}
  fractions = jax.lax.map(forward, rows)
  return {path: jnp.mean(f, axis=0) for path, f in fractions.items()}


def supply_fractions(model: nnx.Module,
                     fractions: dict[tuple, jax.Array]) -> None:
  """Sets each whole-batch fraction on the layer that sows it. A scanned
  stack (``model.scan_layers``) re-sows its layers' fractions on the model
  under their unrolled paths (``blocks/3/ffn/load_balance_fraction``):
  those are stacked again and set on the stacked layer, whose scan hands
  layer i its own row."""
  per_layer: dict[tuple, dict[int, jax.Array]] = {}
  for path, value in fractions.items():
    resown = split_layer_path(str(path[0])) if len(path) == 1 else None
    if resown is not None:
      container, i, rest = resown
      per_layer.setdefault((container, rest), {})[i] = value
      continue
    setattr(_module_at(model, path[:-1]), whole_batch_attribute(path[-1]),
            WholeBatchFraction(value))
  for (container, rest), by_layer in per_layer.items():
    stacked = jnp.stack([by_layer[i] for i in sorted(by_layer)])
    setattr(_module_at(getattr(model, container), rest[:-1]),
            whole_batch_attribute(rest[-1]), WholeBatchFraction(stacked))


def accumulated_gradients(model: nnx.Module, batch: dict, k: int
                          ) -> tuple[jax.Array, dict, nnx.State]:
  """(objective, metrics, gradients) of `batch` run as `k` microbatches,
  equal to ``nnx.value_and_grad(loss_fn)`` of the whole batch; `model`'s
  memory statistics are updated as that call would."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rows, scalars = split_microbatches(batch, k)
  normaliser = loss_normaliser(batch)
  fractions = whole_batch_fractions(graphdef, params, rest, rows, scalars)

  def micro_objective(params, mb):
    micro = nnx.merge(graphdef, params, rest, copy=True)
    supply_fractions(micro, fractions)
    total, parts = objective(micro, _microbatch(mb, scalars), normaliser, 1.0 / k)
    return total, (parts, nnx.state(micro, MemoryStat))

  def one(carry, mb):
    grads, stats = carry
    (total, (parts, new_stats)), g = jax.value_and_grad(
        micro_objective, has_aux=True)(params, mb)
    stats = jax.tree.map(jnp.maximum, stats, new_stats)
    return (jax.tree.map(jnp.add, grads, g), stats), (total, parts)

  zeros = jax.tree.map(jnp.zeros_like, params)
  (grads, stats), (totals, (sums, averaged)) = jax.lax.scan(
      one, (zeros, nnx.state(model, MemoryStat)), rows)
  nnx.update(model, stats)
  sums = jax.tree.map(lambda x: jnp.sum(x, axis=0), sums)
  averaged = jax.tree.map(lambda x: jnp.mean(x, axis=0), averaged)
  return jnp.sum(totals), finish_metrics(sums, averaged), grads
