"""Model FLOPs per token of a config, the one formula that ``inspect``
prints and that the train loop turns into TFLOP/s and MFU.

Forward FLOPs per token, 2 per multiply-add:

    matrix    = 2 * (every activated weight matrix of the blocks: attention
                q, k, v, o; the FFN, or for MoE the router and the top-k
                experts; memory layers by their stages' counts)
    attention = 4 * L * T * heads * head_dim   (scores q.k and the weighted
                sum of values over a full context of T = data.seq_len; no
                causal halving, as the model computes every pair)
    head      = 2 * vocab * d                  (the output matrix)

Training FLOPs per token = 3 * forward: the backward pass costs twice the
forward (a gradient with respect to the input and one with respect to the
weights of every matrix product, the attention products included). This is
PaLM's and MaxText's convention, 6 N + 12 L T d for a dense model with N
activated matrix parameters, heads * head_dim = d and the head counted in N.
Model FLOPs count what the model needs, not what the hardware runs: neither
rematerialisation nor gradient accumulation's routing pass is included.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from flax import nnx

from ultramem_jax.model.abstract import RunConfig, abstract_model, resolved_vocab
from ultramem_jax.model.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class TokenFlops:
  """Forward FLOPs per token by part, and the activated non-embedding
  parameters the same walk over the blocks counts."""
  matrix: int
  attention: int
  head: int
  activated_non_embedding_params: int

  @property
  def forward(self) -> int:
    return self.matrix + self.attention + self.head

  @property
  def train(self) -> int:
    """Forward and backward: 3x the forward."""
    return 3 * self.forward


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _matrix_count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree) if len(x.shape) >= 2)


def token_flops(model: Transformer, cfg: RunConfig) -> TokenFlops:
  """The counts of `model` (abstract or real, blocks not scanned) built
  from `cfg`. FFN kinds and memory layers that touch only part of their
  weights say so through ``activated_param_count()`` and
  ``flops_per_token()``; other layers count every matrix."""
  m = cfg.model
  activated, matrix = 0, 0
  for block in model.blocks:
    others = [block.attn, block.attn_norm, block.ffn_norm]
    activated += sum(_count(nnx.state(x, nnx.Param)) for x in others)
    matrix += 2 * _matrix_count(nnx.state(block.attn, nnx.Param))
    for layer in (block.ffn, block.memory):
      if layer is None:
        continue
      if hasattr(layer, "activated_param_count"):
        activated += layer.activated_param_count()
      else:
        activated += _count(nnx.state(layer, nnx.Param))
      if hasattr(layer, "flops_per_token"):
        matrix += layer.flops_per_token()
      else:
        matrix += 2 * _matrix_count(nnx.state(layer, nnx.Param))
  attention = 4 * m.n_layers * cfg.data.seq_len * m.n_heads * m.attn_head_dim
  head = 2 * resolved_vocab(cfg) * m.d_model
  return TokenFlops(matrix, attention, head, activated + m.d_model)  # + final norm


def config_flops(cfg: RunConfig) -> TokenFlops:
  """:func:`token_flops` of `cfg`'s abstract model (nothing allocated).
  Scanned layers have the FLOPs of unrolled ones, so the model is built
  unrolled for the count."""
  model_cfg = cfg.model
  if getattr(model_cfg, "scan_layers", False):
    model_cfg = dataclasses.replace(model_cfg, scan_layers=False)
  unrolled = dataclasses.replace(cfg, model=model_cfg)
  return token_flops(abstract_model(unrolled), unrolled)
