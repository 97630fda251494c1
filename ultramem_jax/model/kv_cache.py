"""The attention key/value cache used for generation.

The cache holds, for every attention layer, the rotated keys and the values
of the tokens seen so far in fixed-size buffers of ``max_len`` slots,
[B, max_len, kv_heads, head_dim]. ``Transformer.extend(tokens, cache)`` runs
T new tokens through the model, writes their keys and values at slots
``length .. length + T - 1`` (``lax.dynamic_update_slice``: one slot index
for the whole batch) and returns the logits and the advanced cache; the
prompt is one such call (prefill), each generated token another (decode).

Prompts of different lengths are left-padded: row b's tokens occupy slots
``start[b] ..`` and the slots before ``start[b]`` hold padding that no query
sees. Positions (for the rotary embedding) count from the row's first real
token, ``slot - start[b]``, so every row computes exactly what an unpadded
forward pass over its own tokens computes.

Only attention mixes tokens: the FFN, the MoE (dropless routing) and the
memory layers act on each token alone, so the cache needs nothing else.
The cache is a pytree of arrays passed in and out of jitted functions
explicitly (as in the Flax Gemma sampler), not model state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from ultramem_jax.model.common import dtype_of
from ultramem_jax.model.config import ModelConfig
from ultramem_jax.parallel.rules import constrain

# Cache buffers are split over the batch like the activations.
_CACHE_AXES = ("activation_batch", "activation_length", None, None)


class LayerCache(struct.PyTreeNode):
  """One attention layer's keys (after the rotary embedding) and values,
  each [B, max_len, kv_heads, head_dim]."""
  k: jax.Array
  v: jax.Array

  def write(self, k: jax.Array, v: jax.Array, index: jax.Array) -> "LayerCache":
    """The cache with k, v [B, T, kv_heads, head_dim] stored at slots
    ``index .. index + T - 1``."""
    at = (0, index, 0, 0)
    put = lambda buf, x: constrain(
        jax.lax.dynamic_update_slice(buf, x.astype(buf.dtype), at), _CACHE_AXES)
    return LayerCache(put(self.k, k), put(self.v, v))


class KVCache(struct.PyTreeNode):
  """Every layer's :class:`LayerCache` and the slot bookkeeping.

  start: [B] int32, the first slot of each row's real tokens (left padding
    fills the slots before it).
  length: [] int32, the number of slots written so far (the next write
    goes there).
  """
  layers: tuple[LayerCache, ...]
  start: jax.Array
  length: jax.Array

  @classmethod
  def create(cls, cfg: ModelConfig, batch: int, max_len: int,
             start: jax.Array | None = None) -> "KVCache":
    """An empty cache of `max_len` slots for `batch` rows, in the model's
    activation dtype; `start` [B] as above (0: no padding)."""
    shape = (batch, max_len, cfg.kv_heads, cfg.attn_head_dim)
    zeros = lambda: constrain(jnp.zeros(shape, dtype_of(cfg.dtype)), _CACHE_AXES)
    if start is None:
      start = jnp.zeros((batch,), jnp.int32)
    return cls(layers=tuple(LayerCache(zeros(), zeros())
                            for _ in range(cfg.n_layers)),
               start=jnp.asarray(start, jnp.int32),
               length=jnp.zeros((), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.layers[0].k.shape[1]

  def slots(self, t: int) -> jax.Array:
    """[T] slots the next t tokens are written to."""
    return self.length + jnp.arange(t, dtype=jnp.int32)

  def positions(self, t: int) -> jax.Array:
    """[B, T] positions of the next t tokens: slot minus the row's start."""
    return self.slots(t)[None, :] - self.start[:, None]

  def visible(self, t: int) -> jax.Array:
    """[B, T, max_len] bool: slot s is visible to new token t of row b iff
    start[b] <= s <= its own slot (slots past it are not written yet)."""
    s = jnp.arange(self.max_len, dtype=jnp.int32)
    causal = s[None, :] <= self.slots(t)[:, None]             # [T, S]
    real = s[None, :] >= self.start[:, None]                  # [B, S]
    return causal[None] & real[:, None, :]

  def advance(self, layers: tuple[LayerCache, ...], t: int) -> "KVCache":
    """The cache after t tokens were written into `layers`."""
    return self.replace(layers=tuple(layers), length=self.length + t)
