"""Running per-token work on each device's own tokens.

Activations are split over every batch axis (``data``, ``fsdp``, ``expert``,
``memory``; see rules.py). Some steps of the memory layer and the MoE (top-k,
sorting assignments by expert, the layers' explicit collectives) are written
per device with ``jax.shard_map``: left to XLA's partitioner they gather every
token onto every device first. These helpers give those functions the token
split and the padding they need.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ultramem_jax.parallel.rules import BATCH_AXES


def active_mesh():
  """The abstract mesh in context, or None when there is none or it has a
  single device (then the plain single-device code runs)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return None
  return mesh


def axis_size(mesh, name: str) -> int:
  return dict(mesh.shape).get(name, 1)


def batch_axes(mesh) -> tuple[str, ...]:
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def token_shards(mesh) -> int:
  """Number of pieces the tokens are split into."""
  return math.prod(axis_size(mesh, a) for a in batch_axes(mesh))


def on_tokens(mesh, ndim: int, axis: int = 0) -> P:
  """PartitionSpec splitting dimension `axis` over the batch axes."""
  spec = [None] * ndim
  spec[axis] = batch_axes(mesh)
  return P(*spec)


def pad_tokens(x: jax.Array | None, n: int, axis: int = 0) -> jax.Array | None:
  """x with zeros appended along `axis` up to length n."""
  if x is None:
    return None
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, n - x.shape[axis])
  return jnp.pad(x, pad)


def shard_tokens(fn: Callable, mesh, args: tuple, token_axis: int = 0,
                 out_ndims: tuple[int, ...] = (3, 4)):
  """fn(first, *rest) on each device's tokens: the first argument split over
  the batch axes on `token_axis`, the others replicated; outputs (of the
  given ranks) split likewise."""
  in_specs = ((on_tokens(mesh, args[0].ndim, token_axis),)
              + tuple(P() for _ in args[1:]))
  out_specs = tuple(on_tokens(mesh, nd, token_axis) for nd in out_ndims)
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)(*args)


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """``lax.top_k`` over the last axis of x [N, ...], each device on its own
  tokens (XLA's partitioner otherwise gathers every token's scores onto
  every device before a top-k)."""
  mesh = active_mesh()
  if mesh is None or x.shape[0] % token_shards(mesh):
    return jax.lax.top_k(x, k)
  spec = on_tokens(mesh, x.ndim)
  return jax.shard_map(lambda x: tuple(jax.lax.top_k(x, k)), mesh=mesh,
                       in_specs=spec, out_specs=(spec, spec), check_vma=False)(x)
