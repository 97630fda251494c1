"""Causal multi-head attention with rotary positions and grouped-query heads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ultramem_jax.config import ModelConfig
from ultramem_jax.model.common import dtype_of, linear_std, normal_param, output_std


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
    dt = self.dtype
    q = jnp.einsum("btd,dnh->btnh", x, self.wq[...].astype(dt))
    k = jnp.einsum("btd,dnh->btnh", x, self.wk[...].astype(dt))
    v = jnp.einsum("btd,dnh->btnh", x, self.wv[...].astype(dt))
    q = rotary(q, positions, self.theta)
    k = rotary(k, positions, self.theta)
    b, t = x.shape[:2]
    groups = self.n_heads // self.n_kv_heads
    q = q.reshape(b, t, self.n_kv_heads, groups, self.head_dim)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k,
                        preferred_element_type=jnp.float32)
    scores = scores * self.head_dim ** -0.5
    causal = positions[:, :, None] >= positions[:, None, :]  # [B, T, S]
    scores = jnp.where(causal[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    out = out.reshape(b, t, self.n_heads, self.head_dim)
    return jnp.einsum("btnh,nhd->btd", out, self.wo[...].astype(dt))
