"""Decoder-only Transformer whose FFN slot is chosen by config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ultramem_jax.memory_geometry import memory_geometry
from ultramem_jax.model import moe as _moe  # noqa: F401  registers ffn kind "moe"
from ultramem_jax.model.attention import Attention
from ultramem_jax.model.common import (LayerMetric, RMSNorm, compute_weight,
                                       dtype_of, linear_std, normal_param)
from ultramem_jax.model.config import ModelConfig
from ultramem_jax.model.ffn import build_ffn
from ultramem_jax.model.kv_cache import KVCache, LayerCache
from ultramem_jax.model.memory.init import calibrate_memory
from ultramem_jax.model.memory.layer import MemoryLayer, MemoryTable
from ultramem_jax.parallel.rules import constrain

_ACT = ("activation_batch", "activation_length", "activation_embed")


def _rms(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


class Block(nnx.Module):
  """x = x + Attn(RMSNorm(x)); h = RMSNorm(x); x = x + FFN(h) + Mem(h).

  ``memory`` = (memory-layer index, destination block): a memory layer reads
  this block's h. When the destination is this block its output joins the
  FFN's (UltraMemV2: every block); otherwise (UltraMem v1's skip layers) it
  is returned, and the Transformer adds it after the destination block.
  With ``model.memory.replace_ffn`` the block has no FFN (Memory+, PKM, PEER).
  """

  def __init__(self, cfg: ModelConfig, layer_index: int, *, rngs: nnx.Rngs,
               memory: tuple[int, int] | None = None):
    self.index = layer_index
    self.attn_norm = RMSNorm(cfg.d_model, cfg, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg.d_model, cfg, rngs=rngs)
    replaced = memory is not None and cfg.memory.replace_ffn
    self.ffn = None if replaced else build_ffn(cfg, layer_index, rngs=rngs)
    self.memory = (MemoryLayer(cfg, memory[0], rngs=rngs,
                               own_table=not cfg.memory.share_values)
                   if memory is not None else None)
    self.memory_target = memory[1] if memory is not None else None

  def __call__(self, x: jax.Array, positions: jax.Array,
               memory_table: MemoryTable | None = None
               ) -> tuple[jax.Array, jax.Array | None]:
    """Returns (x, output of a skip memory layer to add later, or None)."""
    return self._rest(x, self.attn(self.attn_norm(x), positions), memory_table)

  def extend(self, x: jax.Array, positions: jax.Array, cache: KVCache,
             memory_table: MemoryTable | None = None
             ) -> tuple[jax.Array, jax.Array | None, LayerCache]:
    """The block for generation (kv_cache.py): attention reads and extends
    this layer's cache. Returns __call__'s pair and the layer's cache."""
    a, layer_cache = self.attn.extend(
        self.attn_norm(x), positions, cache.layers[self.index],
        cache.length, cache.visible(x.shape[1]))
    return *self._rest(x, a, memory_table), layer_cache

  def _rest(self, x: jax.Array, attn_out: jax.Array,
            memory_table: MemoryTable | None
            ) -> tuple[jax.Array, jax.Array | None]:
    """Everything after attention: the residual, FFN and memory layer."""
    x = constrain(x + attn_out, _ACT)
    h = self.ffn_norm(x)
    y = self.ffn(h) if self.ffn is not None else None
    deferred = None
    if self.memory is not None:
      mem = self.memory(h, memory_table)
      if y is not None:
        sg = jax.lax.stop_gradient
        self.memory.sow(LayerMetric, "out_rms_over_ffn",
                        sg(_rms(mem) / jnp.maximum(_rms(y), 1e-30)))
      if self.memory_target == self.index:
        y = mem if y is None else y + mem
      else:
        deferred = mem
    if y is not None:
      x = x + y
    return constrain(x, _ACT), deferred


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
    geo = memory_geometry(cfg)
    reads = {src: (l, dst) for l, (src, dst) in enumerate(geo.placement)}
    self.memory_table = (MemoryTable(cfg, geo.table_rows, rngs=rngs)
                         if cfg.memory.share_values and geo.placement else None)
    self.blocks = nnx.List(
        [Block(cfg, i, rngs=rngs, memory=reads.get(i))
         for i in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = normal_param(rngs, linear_std(cfg),
                                  (cfg.d_model, cfg.vocab_size),
                                  ("embed", "vocab"), pdt)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits, _ = self._forward(tokens, positions, None)
    return logits

  def extend(self, tokens: jax.Array, cache: KVCache
             ) -> tuple[jax.Array, KVCache]:
    """Runs tokens [B, T] that continue the cached ones (a prompt, then one
    generated token at a time; see kv_cache.py): (logits [B, T, vocab], the
    cache holding them too). Positions come from the cache. Equals the
    logits of ``self(all tokens so far)`` at the new positions."""
    t = tokens.shape[1]
    logits, layers = self._forward(tokens, cache.positions(t), cache)
    return logits, cache.advance(layers, t)

  def _forward(self, tokens: jax.Array, positions: jax.Array,
               cache: KVCache | None
               ) -> tuple[jax.Array, list[LayerCache]]:
    """Logits, and every layer's updated cache when `cache` is given."""
    x = jnp.take(self.token_embed[...], tokens, axis=0).astype(self.dtype)
    x = constrain(x, _ACT)
    later: dict[int, jax.Array] = {}
    layers: list[LayerCache] = []
    for i, block in enumerate(self.blocks):
      if cache is None:
        x, deferred = block(x, positions, self.memory_table)
      else:
        x, deferred, layer_cache = block.extend(x, positions, cache,
                                                self.memory_table)
        layers.append(layer_cache)
      if deferred is not None:
        t = block.memory_target
        later[t] = deferred if t not in later else later[t] + deferred
      if i in later:
        x = constrain(x + later.pop(i), _ACT)
    x = self.final_norm(x)
    # compute_weight: float32 weights stay unrounded on CPU (common.py).
    if self.tie_embeddings:
      head = compute_weight(self.token_embed[...], self.dtype).T
    else:
      head = compute_weight(self.lm_head[...], self.dtype)
    logits = jnp.einsum("btd,dv->btv", x, head,
                        preferred_element_type=jnp.float32)
    return constrain(logits, ("activation_batch", "activation_length",
                              "activation_vocab")), layers


def build_model(cfg: ModelConfig, seed: int) -> Transformer:
  """Builds the model under the current mesh and logical rules (see
  ``parallel.mesh.use_mesh``); parameters are placed as they are created.
  Memory layers are then calibrated (the paper's score normalisation and
  Eq. 26 value init, ``model.memory.init: paper``)."""
  model = Transformer(cfg, rngs=nnx.Rngs(params=seed))
  calibrate_memory(model, cfg, seed)
  return model
