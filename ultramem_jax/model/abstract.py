"""The model of a run config as shapes only (``nnx.eval_shape``: nothing is
allocated, so a 7B config answers in seconds), for counting parameters and
checking the mesh before anything is built."""

from __future__ import annotations

import dataclasses
from typing import Protocol

from flax import nnx

from ultramem_jax.data.config import DataConfig
from ultramem_jax.model.config import ModelConfig
from ultramem_jax.model.transformer import Transformer
from ultramem_jax.parallel.mesh import single_device_mesh, use_mesh


class RunConfig(Protocol):
  """What these functions read of the root config (training/config.py)."""

  model: ModelConfig
  data: DataConfig


def resolved_vocab(cfg: RunConfig) -> int:
  """model.vocab_size, or the size the configured tokenizer will have."""
  if cfg.model.vocab_size:
    return cfg.model.vocab_size
  return cfg.data.bpe_vocab_size if cfg.data.tokenizer == "bpe" else 257


def abstract_model(cfg: RunConfig, unrolled: bool = False) -> Transformer:
  """The Transformer of `cfg` with abstract parameters (shapes, dtypes and
  logical sharding names), its vocabulary resolved as ``resolved_vocab``.
  `unrolled`: one block per layer even with ``model.scan_layers`` (the
  same parameters; what per-layer counts walk)."""
  model_cfg = dataclasses.replace(cfg.model, vocab_size=resolved_vocab(cfg))
  if unrolled:
    model_cfg = dataclasses.replace(model_cfg, scan_layers=False)
  with use_mesh(single_device_mesh()):
    return nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
