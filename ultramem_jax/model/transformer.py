"""Decoder-only Transformer whose FFN slot is chosen by config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ultramem_jax.config import ModelConfig
from ultramem_jax.model.attention import Attention
from ultramem_jax.model.common import RMSNorm, dtype_of, linear_std, normal_param
from ultramem_jax.model.ffn import build_ffn
from ultramem_jax.parallel.rules import constrain

_ACT = ("activation_batch", "activation_length", "activation_embed")


class Block(nnx.Module):
  """x = x + Attn(RMSNorm(x)); x = x + FFN(RMSNorm(x))."""

  def __init__(self, cfg: ModelConfig, layer_index: int, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, cfg, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg.d_model, cfg, rngs=rngs)
    self.ffn = build_ffn(cfg, layer_index, rngs=rngs)

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    x = constrain(x + self.attn(self.attn_norm(x), positions), _ACT)
    return constrain(x + self.ffn(self.ffn_norm(x)), _ACT)


class Transformer(nnx.Module):
  """tokens [B, T] -> float32 logits [B, T, vocab]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if cfg.vocab_size <= 0:
      raise ValueError("model.vocab_size must be set (it is filled from the "
                       "tokenizer when a run is built)")
    self.tie_embeddings = cfg.tie_embeddings
    pdt = dtype_of(cfg.param_dtype)
    self.dtype = dtype_of(cfg.dtype)
    self.token_embed = normal_param(rngs, linear_std(cfg),
                                    (cfg.vocab_size, cfg.d_model),
                                    ("vocab", "embed"), pdt)
    self.blocks = nnx.List(
        [Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = normal_param(rngs, linear_std(cfg),
                                  (cfg.d_model, cfg.vocab_size),
                                  ("embed", "vocab"), pdt)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = jnp.take(self.token_embed[...], tokens, axis=0).astype(self.dtype)
    x = constrain(x, _ACT)
    for block in self.blocks:
      x = block(x, positions)
    x = self.final_norm(x)
    if self.tie_embeddings:
      head = self.token_embed[...].astype(self.dtype).T
    else:
      head = self.lm_head[...].astype(self.dtype)
    logits = jnp.einsum("btd,dv->btv", x, head,
                        preferred_element_type=jnp.float32)
    return constrain(logits, ("activation_batch", "activation_length",
                              "activation_vocab"))


def build_model(cfg: ModelConfig, seed: int) -> Transformer:
  """Builds the model under the current mesh and logical rules (see
  ``parallel.mesh.use_mesh``); parameters are placed as they are created."""
  return Transformer(cfg, rngs=nnx.Rngs(params=seed))
