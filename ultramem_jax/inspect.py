"""Parameter and FLOP counts of a config, from ``jax.eval_shape`` (nothing is
allocated, so a 7B config answers in seconds).

    python -m ultramem_jax.inspect configs/tiny_dense.yaml [key=value ...]

prints one JSON object. The conventions:

- ``embedding_params``: the token-embedding matrix, plus the output matrix
  when it is not tied.
- ``non_embedding_params``: everything else (what the paper's tables call
  "total" parameters).
- ``activated_non_embedding_params``: non-embedding parameters a token
  touches; FFN kinds that touch only part of their weights (MoE, memory
  layers) say how much through an ``activated_param_count()`` method.
- ``activated_params``: parameters touched per token: the activated
  non-embedding ones, the whole output matrix (every logit is computed) and,
  when untied, one row of the input embedding. With tied embeddings this is
  the paper's "active" count at 227M (non-embedding + one vocab x d matrix).
- ``flops_per_token``: forward FLOPs, 2 per multiply-add: every activated
  weight matrix once, the output matrix, and attention scores and values
  over a full context of ``data.seq_len`` (4 * L * seq_len * heads * head_dim;
  no causal halving). FFN kinds may refine their part with
  ``flops_per_token()``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import jax
from flax import nnx

from ultramem_jax.config import Config, ConfigError, load_config
from ultramem_jax.memory_geometry import memory_geometry
from ultramem_jax.model.transformer import Transformer
from ultramem_jax.parallel.mesh import single_device_mesh, use_mesh


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _matrix_count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree) if len(x.shape) >= 2)


def resolved_vocab(cfg: Config) -> int:
  """model.vocab_size, or the size the configured tokenizer will have."""
  if cfg.model.vocab_size:
    return cfg.model.vocab_size
  return cfg.data.bpe_vocab_size if cfg.data.tokenizer == "bpe" else 257


def abstract_model(cfg: Config) -> Transformer:
  model_cfg = dataclasses.replace(cfg.model, vocab_size=resolved_vocab(cfg))
  with use_mesh(single_device_mesh()):
    return nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))


def inspect_config(cfg: Config) -> dict:
  model = abstract_model(cfg)
  m = cfg.model
  vocab, d = resolved_vocab(cfg), m.d_model
  params = nnx.state(model, nnx.Param)
  total = _count(params)
  embedding = vocab * d * (1 if m.tie_embeddings else 2)

  activated_blocks, block_matrix_flops = 0, 0
  for block in model.blocks:
    other = [block.attn, block.attn_norm, block.ffn_norm]
    activated_blocks += sum(_count(nnx.state(x, nnx.Param)) for x in other)
    block_matrix_flops += 2 * _matrix_count(nnx.state(block.attn, nnx.Param))
    for layer in (block.ffn, block.memory):
      if layer is None:
        continue
      if hasattr(layer, "activated_param_count"):
        activated_blocks += layer.activated_param_count()
      else:
        activated_blocks += _count(nnx.state(layer, nnx.Param))
      if hasattr(layer, "flops_per_token"):
        block_matrix_flops += layer.flops_per_token()
      else:
        block_matrix_flops += 2 * _matrix_count(nnx.state(layer, nnx.Param))
  activated_non_embedding = activated_blocks + d  # + the final norm
  attention_flops = 4 * m.n_layers * cfg.data.seq_len * m.n_heads * m.attn_head_dim
  head_flops = 2 * vocab * d
  return {
      "total_params": total,
      "embedding_params": embedding,
      "non_embedding_params": total - embedding,
      "activated_non_embedding_params": activated_non_embedding,
      "activated_params": activated_non_embedding + vocab * d
                          + (0 if m.tie_embeddings else d),
      "flops_per_token": block_matrix_flops + attention_flops + head_flops,
      "attention_flops_per_token": attention_flops,
      "vocab_size": vocab,
      "d_model": d,
      "n_layers": m.n_layers,
      "seq_len": cfg.data.seq_len,
      "ffn_kind": m.ffn.kind,
      **_memory_summary(model, cfg),
  }


def _memory_summary(model: Transformer, cfg: Config) -> dict:
  """Sizes of the memory layers, if any (``memory`` key)."""
  geo = memory_geometry(cfg.model)
  if not geo.placement:
    return {}
  mem = cfg.model.memory
  tables = [b.memory.table for b in model.blocks
            if b.memory is not None and b.memory.table is not None]
  if model.memory_table is not None:
    tables.append(model.memory_table)
  table_params = sum(_count(nnx.state(t, nnx.Param)) for t in tables)
  return {"memory": {
      "layers": [f"{s}:{t}" if s != t else str(s) for s, t in geo.placement],
      "keys_per_side": geo.keys_per_side,
      "value_blocks": geo.blocks,
      "table_rows": geo.table_rows,
      "tables": len(tables),
      "table_params": table_params,
      "rows_read_per_token_per_layer": mem.heads * mem.top_m,
      "value_dim": cfg.model.value_dim,
      "pre_value_dim": mem.pre_value_dim,
  }}


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help"):
    print(__doc__)
    return 0 if argv else 2
  try:
    cfg = load_config(argv[0], argv[1:])
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(inspect_config(cfg), indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
