"""Causal multi-head attention with rotary positions and grouped-query heads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ultramem_jax.model.common import (compute_weight, dtype_of, linear_std,
                                       normal_param, output_std)
from ultramem_jax.model.config import ModelConfig
from ultramem_jax.model.kv_cache import LayerCache


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotates pairs (i, i + H/2) of the last axis by position * theta^(-2i/H).

  x: [B, T, heads, H]; positions: [B, T] integers.
  """
  half = x.shape[-1] // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[..., None, None] * freq  # [B,T,1,half]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Attention(nnx.Module):
  """Causal self-attention; `n_kv_heads < n_heads` gives grouped-query attention."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.attn_head_dim
    pdt = dtype_of(cfg.param_dtype)
    std = linear_std(cfg)
    self.n_heads, self.n_kv_heads, self.head_dim = h, kv, hd
    self.theta = cfg.rope_theta
    self.dtype = dtype_of(cfg.dtype)
    self.wq = normal_param(rngs, std, (d, h, hd), ("embed", "q_heads", "head_dim"), pdt)
    self.wk = normal_param(rngs, std, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pdt)
    self.wv = normal_param(rngs, std, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pdt)
    self.wo = normal_param(rngs, output_std(cfg), (h, hd, d),
                           ("q_heads", "head_dim", "embed"), pdt)

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """x: [B, T, d]; positions: [B, T]. Token t attends to tokens s <= t."""
    q, k, v = self._project(x, positions)
    causal = positions[:, :, None] >= positions[:, None, :]  # [B, T, S]
    return self._output(attend(q, k, v, causal, self.dtype))

  def extend(self, x: jax.Array, positions: jax.Array, cache: LayerCache,
             index: jax.Array, visible: jax.Array
             ) -> tuple[jax.Array, LayerCache]:
    """Attention of T new tokens over the cache (generation, kv_cache.py).

    x: [B, T, d]; positions: [B, T]; the new keys and values are written at
    slots ``index .. index + T - 1`` and the queries attend to the cache
    slots marked in visible [B, T, max_len]. Returns (output, cache).
    """
    q, k, v = self._project(x, positions)
    cache = cache.write(k, v, index)
    return self._output(attend(q, cache.k, cache.v, visible, self.dtype)), cache

  def _project(self, x: jax.Array, positions: jax.Array):
    """Queries, keys (both rotated) and values, [B, T, heads, head_dim]."""
    dt = self.dtype   # compute_weight: float32 weights stay unrounded on CPU
    proj = lambda w: jnp.einsum("btd,dnh->btnh", x, compute_weight(w, dt)).astype(dt)
    q, k, v = proj(self.wq[...]), proj(self.wk[...]), proj(self.wv[...])
    return rotary(q, positions, self.theta), rotary(k, positions, self.theta), v

  def _output(self, out: jax.Array) -> jax.Array:
    """[B, T, heads, head_dim] -> [B, T, d]."""
    return jnp.einsum("btnh,nhd->btd", out,
                      compute_weight(self.wo[...], self.dtype)).astype(self.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
           dtype) -> jax.Array:
  """softmax(q k^T / sqrt(H)) v over the keys allowed by `mask`.

  q: [B, T, heads, H]; k, v: [B, S, kv_heads, H] (each kv head serves
  heads / kv_heads query heads); mask: [B, T, S] bool. Scores and the
  softmax are float32. Returns [B, T, heads, H] in `dtype`.
  """
  b, t, n_heads, hd = q.shape
  n_kv = k.shape[2]
  q = q.reshape(b, t, n_kv, n_heads // n_kv, hd)
  scores = jnp.einsum("btkgh,bskh->bkgts", q, k,
                      preferred_element_type=jnp.float32)
  scores = scores * hd ** -0.5
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
  return out.reshape(b, t, n_heads, hd)
