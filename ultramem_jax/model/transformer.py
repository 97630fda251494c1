"""Decoder-only Transformer whose FFN slot is chosen by config.

The blocks run one after another (``blocks`` is an ``nnx.List``) or, with
``model.scan_layers``, as one stacked block under ``nnx.scan`` (scan.py);
either way each block runs under the ``model.remat`` policy (remat.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ultramem_jax.memory_geometry import memory_geometry
from ultramem_jax.model import moe as _moe  # noqa: F401  registers ffn kind "moe"
from ultramem_jax.model.attention import Attention
from ultramem_jax.model.common import (RMSNorm, compute_weight,
                                       dtype_of, linear_std, normal_param,
                                       sow_rms_ratio)
from ultramem_jax.model.config import ModelConfig
from ultramem_jax.model.ffn import build_ffn
from ultramem_jax.model.kv_cache import KVCache, LayerCache
from ultramem_jax.model.memory.init import calibrate_memory
from ultramem_jax.model.memory.layer import MemoryLayer, MemoryTable
from ultramem_jax.model.remat import remat
from ultramem_jax.model.scan import (resow_per_layer, scan_blocks, scan_extend,
                                     stack_modules, unstack_module)
from ultramem_jax.parallel.rules import constrain

_ACT = ("activation_batch", "activation_length", "activation_embed")


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
    return self.extend_layer(x, positions, cache.layers[self.index],
                             cache.length, cache.visible(x.shape[1]),
                             memory_table)

  def extend_layer(self, x: jax.Array, positions: jax.Array,
                   layer_cache: LayerCache, length: jax.Array,
                   visible: jax.Array, memory_table: MemoryTable | None = None
                   ) -> tuple[jax.Array, jax.Array | None, LayerCache]:
    """:meth:`extend` given this layer's own cache (scanned layers pass
    each layer's cache through the scan)."""
    a, layer_cache = self.attn.extend(self.attn_norm(x), positions,
                                      layer_cache, length, visible)
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
        sow_rms_ratio(self.memory, "out_rms_over_ffn", mem, y)
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
    self.remat = cfg.remat
    self.scanned = False
    self.blocks = nnx.List(
        [Block(cfg, i, rngs=rngs, memory=reads.get(i))
         for i in range(cfg.n_layers)])
    if cfg.scan_layers:
      stack_blocks(self)
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
    if self.scanned:
      x, layers = self._scanned(x, positions, cache)
    else:
      x, layers = self._unrolled(x, positions, cache)
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

  def _scanned(self, x: jax.Array, positions: jax.Array,
               cache: KVCache | None) -> tuple[jax.Array, list[LayerCache]]:
    """The stacked blocks under one scan; what they sowed is sown again
    per layer, under the paths an unrolled model uses."""
    layers: list[LayerCache] = []
    if cache is None:
      x = scan_blocks(self.blocks, x, positions, self.remat)
    else:
      x, layers = scan_extend(self.blocks, x, positions, cache.layers,
                              cache.length, cache.visible(x.shape[1]))
    resow_per_layer(self, "blocks")
    return x, layers

  def _unrolled(self, x: jax.Array, positions: jax.Array,
                cache: KVCache | None) -> tuple[jax.Array, list[LayerCache]]:
    """The blocks one after another, each under the remat policy; skip
    memory layers' outputs are added after their destination block."""
    call = remat(lambda block, x, positions, table: block(x, positions, table),
                 self.remat)
    later: dict[int, jax.Array] = {}
    layers: list[LayerCache] = []
    for i, block in enumerate(self.blocks):
      if cache is None:
        x, deferred = call(block, x, positions, self.memory_table)
      else:
        x, deferred, layer_cache = block.extend(x, positions, cache,
                                                self.memory_table)
        layers.append(layer_cache)
      if deferred is not None:
        t = block.memory_target
        later[t] = deferred if t not in later else later[t] + deferred
      if i in later:
        x = constrain(x + later.pop(i), _ACT)
    return x, layers


def stack_blocks(model: Transformer) -> None:
  """Puts `model`'s blocks into the scanned layout (``model.scan_layers``):
  one block whose variables are stacked on a leading ``layers`` axis."""
  model.blocks = stack_modules(list(model.blocks))
  model.scanned = True


def unstack_blocks(model: Transformer) -> None:
  """The inverse of :func:`stack_blocks`: the unrolled list of blocks, each
  with its own index again."""
  blocks = unstack_module(model.blocks)
  for i, block in enumerate(blocks):
    block.index = i
    if block.memory is not None:
      block.memory_target = block.memory.index = i
  model.blocks = nnx.List(blocks)
  model.scanned = False


def build_model(cfg: ModelConfig, seed: int) -> Transformer:
  """Builds the model under the current mesh and logical rules (see
  ``parallel.mesh.use_mesh``); parameters are placed as they are created.
  Memory layers are then calibrated (the paper's score normalisation and
  Eq. 26 value init, ``model.memory.init: paper``).
  With ``model.scan_layers`` the blocks are built and calibrated unrolled,
  then stacked, so a seed gives the same model in either layout."""
  unrolled = dataclasses.replace(cfg, scan_layers=False)
  model = Transformer(unrolled, rngs=nnx.Rngs(params=seed))
  calibrate_memory(model, cfg, seed)
  if cfg.scan_layers:
    stack_blocks(model)
  return model
