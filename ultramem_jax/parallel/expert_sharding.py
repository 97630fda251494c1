"""Experts over the ``expert`` mesh axis (spec section 5), dropless, with the
collectives written out in ``jax.shard_map``.

Tokens are split over every batch axis; the X devices of an expert group
(devices that differ only in their ``expert`` coordinate) each hold E/X
experts. Per device, with its n tokens and their a = n*k assignments sorted
by expert:

1. all-gather the per-expert counts c[s, e] of the group's X senders;
2. ragged all-to-all: the rows for expert e go to the device owning e,
   landing grouped by local expert (for each local expert, sender 0's rows,
   then sender 1's, ...), so the receiver needs no sort;
3. grouped SwiGLU over the received rows with the local experts' weights;
4. the reverse ragged all-to-all puts every output back in its sender's
   sorted order, where the routing weights and the scatter-add to tokens
   are applied (as on one device).

``jax.lax.ragged_all_to_all`` runs on TPU and GPU; XLA:CPU does not
implement it, so on CPU the same exchange is emulated with a dense
``all_to_all`` of worst-case size (X times the ragged bytes out, X^2 back
from the worst-case receive buffer). Both take the same offsets, so the
bookkeeping tested on CPU is what runs on accelerators.
The receive buffer is worst-case sized (X*a rows: every sender could route
everything to one device), as in MaxText's dropless expert parallelism.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ultramem_jax.parallel.tokens import (active_mesh, axis_size, on_tokens,
                                          pad_tokens, token_shards)

EXPERT = "expert"


def ragged_all_to_all(operand, output, input_offsets, send_sizes,
                      output_offsets, recv_sizes, *, axis_name: str,
                      emulate: bool | None = None):
  """``jax.lax.ragged_all_to_all`` (same arguments and result), or its dense
  emulation when `emulate` (default: on the CPU backend).

  The emulation assumes what the callers here guarantee: the rows sent to
  one device belong to at most one of its slices, and the slices received
  do not overlap in `output`."""
  if emulate is None:
    emulate = jax.default_backend() == "cpu"
  if not emulate:
    return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes,
                                     output_offsets, recv_sizes,
                                     axis_name=axis_name)
  x = jax.lax.axis_size(axis_name)
  slices, rows = input_offsets.shape[0], operand.shape[0]
  r = jnp.arange(rows, dtype=jnp.int32)
  # Where each of my rows lands on each device (out of range: not sent).
  inside = ((r[None] >= input_offsets[:, None])
            & (r[None] < (input_offsets + send_sizes)[:, None]))
  target = jnp.where(inside, output_offsets[:, None] + r[None] - input_offsets[:, None],
                     output.shape[0])
  target = jnp.min(target.reshape(x, slices // x, rows), axis=1)     # [X, rows]
  sent = jnp.broadcast_to(operand, (x,) + operand.shape).reshape((x * rows,)
                                                                  + operand.shape[1:])
  got = jax.lax.all_to_all(sent, axis_name, 0, 0, tiled=True)
  where = jax.lax.all_to_all(target.reshape(-1), axis_name, 0, 0, tiled=True)
  return output.at[where].set(got, mode="drop")


def _exchange(xs, counts, experts_fn: Callable, weights: tuple, emulate):
  """Steps 1-4 for one device: xs [a, d] its assignments sorted by expert,
  counts [E] per expert. Returns the expert outputs [a, d] in xs's order."""
  x = jax.lax.axis_size(EXPERT)
  me = jax.lax.axis_index(EXPERT)
  (a, d), e = xs.shape, counts.shape[0]
  el = e // x
  a2a = lambda *args: ragged_all_to_all(*args, axis_name=EXPERT, emulate=emulate)
  # 1. counts of every sender: c[s, r, j] rows from s for expert r*el + j.
  all_counts = jax.lax.all_gather(counts, EXPERT)                    # [X, E]
  c = all_counts.reshape(x, x, el)
  size = jnp.sum(c, axis=0)                                          # [r, j]
  group_start = jnp.cumsum(size, axis=1) - size                      # on r
  before = jnp.cumsum(c, axis=0) - c                                 # senders < s
  start = jnp.cumsum(all_counts, axis=1) - all_counts                # [s, E]
  mine = lambda t: jax.lax.dynamic_index_in_dim(t, me, axis=0, keepdims=False)
  from_s = mine(jnp.swapaxes(c, 0, 1))                # [s, j] rows from s for my j
  # 2. my rows for expert (r, j) land on r at group_start[r, j] + before[me, r, j].
  received = a2a(xs, jnp.zeros((x * a, d), xs.dtype), mine(start), counts,
                 (group_start + mine(before)).reshape(-1), from_s.reshape(-1))
  # 3. local experts; rows past the received ones are ignored.
  ys = experts_fn(received, mine(size), *weights)
  # 4. back: sender s's rows for my expert j, to their place in s's order.
  back_start = mine(group_start)[None, :] + mine(jnp.swapaxes(before, 0, 1))
  return a2a(ys, jnp.zeros((a, d), ys.dtype), back_start.reshape(-1),
             from_s.reshape(-1),
             jax.lax.dynamic_slice_in_dim(start, me * el, el, axis=1).reshape(-1),
             counts)


def dispatch(x: jax.Array, experts: jax.Array, weights: jax.Array,
             expert_weights: tuple[jax.Array, ...], *, num_experts: int,
             experts_fn: Callable, exchange: Callable | None = None) -> jax.Array:
  """Dropless MoE on one device's tokens x [n, d] (experts, weights [n, k]):
  sort the n*k assignments by expert, run the experts (`exchange`, if
  given, sends the rows to the experts' owners and back), then the weighted
  scatter-add y_t = sum_{a: token(a)=t} w_a Expert_{e_a}(x_t). float32."""
  n, k = experts.shape
  flat_e = experts.reshape(-1)
  order = jnp.argsort(flat_e, stable=True)
  src = order // k                                      # token of each row
  counts = jnp.bincount(flat_e, length=num_experts).astype(jnp.int32)
  run = exchange or experts_fn
  ys = run(x[src], counts, *expert_weights)
  ys = ys.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
  return jnp.zeros((n, x.shape[1]), jnp.float32).at[src].add(ys)


def expert_parallel(x: jax.Array, experts: jax.Array, weights: jax.Array,
                    expert_weights: tuple[jax.Array, ...], *, num_experts: int,
                    experts_fn: Callable, emulate: bool | None = None) -> jax.Array:
  """y [N, d] float32 = sum_j weights[n, j] * Expert_{experts[n, j]}(x_n)
  under the mesh in context: tokens split over the batch axes, the expert
  weights ([E, ...] each) over ``expert``.

  experts_fn(rows [R, d] sorted by local expert, group_sizes [E_local],
  *local expert weights) -> [R, d] is the single-device grouped SwiGLU;
  rows past sum(group_sizes) must not matter."""
  mesh = active_mesh()
  n = x.shape[0]
  shards = token_shards(mesh)
  if n % shards:   # e.g. decoding one sequence: pad with weight-0 tokens
    size = -(-n // shards) * shards
    return expert_parallel(pad_tokens(x, size), pad_tokens(experts, size),
                           pad_tokens(weights, size), expert_weights,
                           num_experts=num_experts, experts_fn=experts_fn,
                           emulate=emulate)[:n]
  exchange = None
  if axis_size(mesh, EXPERT) > 1:
    exchange = lambda xs, counts, *w: _exchange(xs, counts, experts_fn, w, emulate)
  local = lambda x, experts, weights, *w: dispatch(
      x, experts, weights, w, num_experts=num_experts, experts_fn=experts_fn,
      exchange=exchange)
  specs = (on_tokens(mesh, 2),) * 3 + (P(EXPERT),) * len(expert_weights)
  return jax.shard_map(local, mesh=mesh, in_specs=specs,
                       out_specs=on_tokens(mesh, 2),
                       check_vma=False)(x, experts, weights, *expert_weights)
