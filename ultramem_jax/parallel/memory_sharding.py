"""Value tables over the ``memory`` mesh axis (spec section 5), with the
collectives written out in ``jax.shard_map``.

Tokens are sharded over every batch axis (``data``, ``fsdp``, ``expert``,
``memory``); the M devices of a memory group each hold a slice of every
table, never the whole of one:

- **column** (default, the reference implementations'): each device holds
  all rows and Dv/M columns (Dp/M of the pre-values). The group all-gathers
  its kept indices, scores and pre-value inputs; every device reads its
  column slice for all of the group's tokens; the pre-value dot is a partial
  dot plus a psum of S numbers per token; an all-to-all returns full-width
  outputs to the tokens' owners.
- **row** (vocab-parallel style): each device holds R/M rows of full width.
  The group all-gathers its indices, scores and inputs; each device reads
  the rows it owns (the others masked to weight 0), the pre-value dot is
  completed by a psum, and a reduce-scatter sums the partial outputs and
  returns each token's to its owner.

``read`` is the single-device weighted read (the Pallas kernel or the pure-
JAX path), ``pre_products`` the single-device <z, P[p]>; both run on local
shards only.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ultramem_jax.parallel.tokens import (active_mesh, axis_size, on_tokens,
                                          pad_tokens, token_shards)

MEMORY = "memory"


def whole_cores(hc: int, m: int) -> bool:
  """Column sharding over m devices keeps each device's columns within whole
  cores (of hc) only when one count divides the other."""
  return hc % m == 0 or m % hc == 0


def group_size(mesh) -> int:
  return axis_size(mesh, MEMORY)


class _Read(NamedTuple):
  """What the per-device bodies need besides the arrays."""
  group: int              # M, devices of the memory group
  cores: int              # hc
  num_blocks: int         # E
  dtype: object
  read: Callable
  pre_products: Callable
  act: Callable


def _gather(x):
  return jax.lax.all_gather(x, MEMORY, axis=0, tiled=True)


def _group(slots, weights, blocks):
  """The memory group's kept indices, scores (float32) and blocks."""
  return _gather(slots), _gather(weights).astype(jnp.float32), _gather(blocks)


def _column(c: _Read, slots, weights, blocks, values, z=None, pre_values=None):
  """Column sharding on one device: Dv/M columns of every row."""
  m, hc = c.group, c.cores
  if m == 1:   # no group: the fused single-device read
    return c.read(slots, weights, values, blocks, z, pre_values).astype(c.dtype)
  idx = jax.lax.axis_index(MEMORY)
  slots, w, blocks = _group(slots, weights, blocks)
  # The cores owning this device's columns.
  per = max(hc // m, 1)
  w = jax.lax.dynamic_slice_in_dim(w, idx * hc // m if hc >= m else idx // (m // hc),
                                   per, axis=2)
  if pre_values is not None:   # partial dot over this device's Dp/M columns, then psum
    width = pre_values.shape[1]
    z_cols = jax.lax.dynamic_slice_in_dim(_gather(z), idx * width, width, axis=1)
    a = jax.lax.psum(c.pre_products(z_cols, slots, pre_values), MEMORY)
    w = w * c.act(a)[..., None]
  o = c.read(slots, w, values, blocks)                      # [Ng, E*Dv/M]
  o = o.reshape(o.shape[0], c.num_blocks, -1)
  o = jax.lax.all_to_all(o, MEMORY, 0, 2, tiled=True)       # [Nl, E, Dv]
  return o.reshape(o.shape[0], -1).astype(c.dtype)


def _row(c: _Read, slots, weights, blocks, values, z=None, pre_values=None):
  """Row sharding on one device: R/M rows of full width."""
  idx, rows = jax.lax.axis_index(MEMORY), values.shape[0]
  slots, w, blocks = _group(slots, weights, blocks)
  local = slots - idx * rows
  mine = (local >= 0) & (local < rows)
  local = jnp.where(mine, local, 0)
  w = jnp.where(mine[..., None], w, 0.0)
  if pre_values is not None:   # each row lives on one device: psum completes the dot
    a = jnp.where(mine, c.pre_products(_gather(z), local, pre_values), 0.0)
    w = w * c.act(jax.lax.psum(a, MEMORY))[..., None]
  o = c.read(local, w, values, blocks)                      # partial [Ng, E*Dv]
  return jax.lax.psum_scatter(o, MEMORY, scatter_dimension=0,
                              tiled=True).astype(c.dtype)


def sharded_read(slots, weights, values, *, z, pre_values, blocks,
                 num_blocks: int, dtype, mode: str, read: Callable,
                 pre_products: Callable, act: Callable):
  """o [N, E * Dv] of the spec's step 6, tokens sharded over the batch axes,
  tables over ``memory`` by `mode` (``column`` or ``row``).

  read(slots, w, values, blocks[, z, pre_values]) is the single-device read
  (float32 [n, E * Dv_local]); pre_products(z, slots, P) the single-device
  <z, P[p]>; act the pre-value activation."""
  mesh = active_mesh()
  n, hc = weights.shape[0], weights.shape[2]
  shards = token_shards(mesh)
  if n % shards:   # e.g. decoding one sequence: pad with weight-0 tokens
    size = -(-n // shards) * shards
    out = sharded_read(
        pad_tokens(slots, size), pad_tokens(weights, size), values,
        z=pad_tokens(z, size), pre_values=pre_values,
        blocks=pad_tokens(blocks, size), num_blocks=num_blocks, dtype=dtype,
        mode=mode, read=read, pre_products=pre_products, act=act)
    return out[:n]
  m = group_size(mesh)
  if mode == "column" and not whole_cores(hc, m):
    raise ValueError(f"model.memory.table_sharding=column: the {hc} cores and "
                     f"the memory axis of {m} devices must divide one another")
  if blocks is None:
    blocks = jnp.zeros_like(slots)
  body = functools.partial(_column if mode == "column" else _row,
                           _Read(m, hc, num_blocks, dtype, read, pre_products, act))
  table = P(None, MEMORY) if mode == "column" else P(MEMORY, None)
  args = [slots, weights, blocks, values]
  specs = [on_tokens(mesh, 2, 0), on_tokens(mesh, 3, 0), on_tokens(mesh, 2, 0), table]
  if pre_values is not None:
    args += [z, pre_values]
    specs += [on_tokens(mesh, 2, 0), table]
  return jax.shard_map(body, mesh=mesh, in_specs=tuple(specs),
                       out_specs=on_tokens(mesh, 2, 0), check_vma=False)(*args)
