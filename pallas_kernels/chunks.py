"""Vector helpers shared by the TPU and Triton bodies of ``value_read``:
the column chunks of multi-core scoring (core c owns columns
c*Dv/hc ... (c+1)*Dv/hc - 1) and the value blocks of implicit value
expansion. Plain jnp on values already loaded from refs, so both backends
lower them."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def chunk_ids(dv: int, width: int, hc: int) -> jax.Array:
  """[1, 1, width] core index of each column (>= hc past Dv: padding)."""
  return jax.lax.broadcasted_iota(jnp.int32, (1, 1, width), 2) // (dv // hc)


def column_weights(w: list[jax.Array], chunk: jax.Array) -> jax.Array:
  """Per-core weights [bt, S] each -> per-column weights: [bt, S, 1] for one
  core (broadcast), else [bt, S, width] with padding columns 0."""
  if len(w) == 1:
    return w[0][:, :, None]
  out = jnp.where(chunk == 0, w[0][:, :, None], 0.0)
  for c in range(1, len(w)):
    out = jnp.where(chunk == c, w[c][:, :, None], out)
  return out


def select_block(blk: jax.Array | None, per_block: list[jax.Array]) -> jax.Array:
  """per_block[b] [bt, 1, D] -> for each kept slot the one of its value
  block blk [bt, S, 1] (block 0 everywhere when blk is None)."""
  if blk is None:
    return per_block[0]
  out = jnp.where(blk == 0, per_block[0], 0.0)
  for b in range(1, len(per_block)):
    out = jnp.where(blk == b, per_block[b], out)
  return out


def core_sums(prod: jax.Array, chunk: jax.Array, hc: int) -> list[jax.Array]:
  """prod [bt, S, width] -> hc sums over each core's columns, [bt, S] each."""
  if hc == 1:
    return [jnp.sum(prod, axis=2)]
  return [jnp.sum(jnp.where(chunk == c, prod, 0.0), axis=2) for c in range(hc)]
